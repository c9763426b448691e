"""OT fusion (Singh and Jaggi, 2020) with uniform masses: the transport plan between the units of
the reference and of model i under the squared Euclidean distance of their activation vectors.
With equal widths the exact plan is a permutation (Birkhoff), found exactly by a linear
assignment on the cost ``[n, n]``."""

from __future__ import annotations

import numpy as np

from ccamerge.methods.base import AlignContext, Alignment, Method, hungarian, per_model
from ccamerge.transform import Transform


def align_ot(ctx: AlignContext) -> Alignment:
    """Exact optimal transport of every model's units onto the reference's."""
    def solve(name, i):
        p, r = ctx.stats[name], ctx.reference
        sq_x, sq_y = np.diag(p.second_moment(r, r)), np.diag(p.second_moment(i, i))
        cost = sq_x[:, None] + sq_y[None, :] - 2.0 * p.second_moment(r, i)  # [n, n], per sample
        perm = hungarian(-cost)
        return Transform.from_permutation(perm), {
            "transport_cost": cost[np.arange(len(perm)), perm],
            "matched_corr": p.corr(r, i)[np.arange(len(perm)), perm]}
    return per_model(ctx, solve)


METHOD = Method("ot", "OT fusion: exact optimal transport on Euclidean activation distances.",
                align_ot, "reference", exact=True)
