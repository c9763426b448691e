"""Plain weight averaging: no alignment, every transform is the identity (the baseline that shows
why alignment is needed)."""

from __future__ import annotations

from ccamerge.methods.base import AlignContext, Alignment, Method, identity_transforms


def align_average(ctx: AlignContext) -> Alignment:
    """Plain averaging: every transform is the identity."""
    return Alignment(identity_transforms(ctx))


METHOD = Method("average", "Plain averaging of weights, no alignment.", align_average, None,
                exact=True)
