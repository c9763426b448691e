"""Permutation by activation matching: each reference unit is paired with the unit of model i it
correlates with most, jointly, by a linear assignment (Hungarian) on the Pearson correlations
``[n, n]`` of their activations."""

from __future__ import annotations

import numpy as np

from ccamerge.methods.base import AlignContext, Alignment, Method, hungarian, per_model
from ccamerge.transform import Transform


def align_permute(ctx: AlignContext) -> Alignment:
    """Activation matching: Hungarian assignment on the Pearson correlation of units."""
    def solve(name, i):
        corr = ctx.stats[name].corr(ctx.reference, i)
        perm = hungarian(corr)
        return Transform.from_permutation(perm), {"matched_corr": corr[np.arange(len(perm)), perm]}
    return per_model(ctx, solve)


METHOD = Method("permute", "Permutation by activation matching (Hungarian on unit correlations).",
                align_permute, "reference", exact=True)
