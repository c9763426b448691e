"""OT fusion (Singh and Jaggi, 2020) with uniform masses: the transport plan between the units of
the reference and of model i under the squared Euclidean distance of their activation vectors.
With equal widths the exact plan is a permutation (Birkhoff), found exactly by a linear
assignment on the cost ``[n, n]``.

Different widths (reference ``n`` units, model i ``m``): the plan ``P`` ``[n, m]`` has row sums
``1/n`` and column sums ``1/m``. Masses that are multiples of ``1/L`` (``L = lcm(n, m)``) make it
an assignment between ``L / n`` copies of each reference unit and ``L / m`` of each model unit,
solved exactly (a transportation problem with integral supplies has an integral optimum); for a
large ``L`` it is solved as a linear programme. Each reference unit becomes the mean of the model
units it receives, ``T = n P^T`` ``[m, n]``, and a consumer reads the sum of the units it sent,
``T_inv = m P`` ``[n, m]``: for a model with every unit twice, ``T = [I; I] / 2`` and ``T_inv =
[I, I]`` (the function kept), and with equal widths both are the permutation.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linear_sum_assignment, linprog

from ccamerge.errors import CcamergeError
from ccamerge.methods.base import AlignContext, Alignment, Method, hungarian, per_model
from ccamerge.transform import Transform

MAX_COPIES = 4096  # largest lcm(n, m) solved as an assignment between unit copies


def transport_plan(cost: np.ndarray) -> np.ndarray:
    """The exact optimal plan ``P`` ``[n, m]`` (rows sum to ``1/n``, columns to ``1/m``) for
    ``cost`` ``[n, m]``."""
    n, m = cost.shape
    copies = math.lcm(n, m)
    if copies > MAX_COPIES:
        return _plan_by_linprog(cost)
    rows, cols = np.repeat(np.arange(n), copies // n), np.repeat(np.arange(m), copies // m)
    r, c = linear_sum_assignment(cost[np.ix_(rows, cols)])
    plan = np.zeros((n, m))
    np.add.at(plan, (rows[r], cols[c]), 1.0 / copies)
    return plan


def _plan_by_linprog(cost: np.ndarray) -> np.ndarray:
    n, m = cost.shape
    rows = np.kron(np.eye(n), np.ones(m))  # [n, n*m]: row sums
    cols = np.kron(np.ones(n), np.eye(m))  # [m, n*m]: column sums
    fit = linprog(cost.ravel(), A_eq=np.vstack([rows, cols]),
                  b_eq=np.concatenate([np.full(n, 1 / n), np.full(m, 1 / m)]), bounds=(0, None),
                  method="highs")
    if not fit.success:
        raise CcamergeError(f"ot: the transport problem between {n} and {m} units failed "
                            f"({fit.message})")
    return fit.x.reshape(n, m)


def align_ot(ctx: AlignContext) -> Alignment:
    """Exact optimal transport of every model's units onto the reference's."""
    def solve(name, i):
        p, r = ctx.stats[name], ctx.reference
        sq_x, sq_y = np.diag(p.second_moment(r, r)), np.diag(p.second_moment(i, i))
        cost = sq_x[:, None] + sq_y[None, :] - 2.0 * p.second_moment(r, i)  # [n, m], per sample
        if cost.shape[0] != cost.shape[1]:
            return _rectangular(cost, p.corr(r, i))
        perm = hungarian(-cost)
        return Transform.from_permutation(perm), {
            "transport_cost": cost[np.arange(len(perm)), perm],
            "matched_corr": p.corr(r, i)[np.arange(len(perm)), perm]}
    return per_model(ctx, solve)


def _rectangular(cost: np.ndarray, corr: np.ndarray) -> tuple[Transform, dict]:
    """The transform between widths ``n`` (reference) and ``m`` from the plan, and per reference
    unit the transported cost and correlation (averages over the units it receives)."""
    n, m = cost.shape
    plan = transport_plan(cost)  # [n, m]
    return Transform(n * plan.T, m * plan), {"transport_cost": n * (plan * cost).sum(1),
                                             "matched_corr": n * (plan * corr).sum(1)}


METHOD = Method("ot", "OT fusion: exact optimal transport on Euclidean activation distances.",
                align_ot, "reference", exact=True, mixed_widths=True)
