"""ZipIt! (Stoica et al., 2024): merge all models' features jointly by greedy matching.

All ``N * n`` features of a merge point are nodes; the most similar pair of groups is merged until
``n`` groups remain. The similarity of two groups is the lowest correlation between their members.
A merge of two groups that already share a model is a *same-model* merge: it spends that model's
budget (``beta * n`` merges) and its similarity is discounted to ``alpha * s + (1 - alpha) * (-1)``
(``alpha = 1``: no discount, ``alpha = 0``: last resort). Each merged feature averages its group;
each original feature is "unmerged" as a copy of its group's feature.
"""

from __future__ import annotations

import numpy as np

from ccamerge.methods.base import AlignContext, Alignment, Method, Option, identity_transforms
from ccamerge.transform import Transform


def _shares_spent_model(group_models: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """``[G, G]`` pairs of groups sharing a model whose same-model budget is spent."""
    spent = group_models[:, budget <= 0].astype(np.int64)
    return (spent @ spent.T) > 0


def greedy_groups(corr: np.ndarray, n_models: int, width: int, *, alpha: float,
                  beta: float) -> list[list[int]]:
    """Partition the ``N*width`` features (rows of ``corr`` ``[N*width, N*width]``, model-major)
    into ``width`` groups by greedy agglomeration."""
    total = n_models * width
    sim = corr.astype(np.float64).copy()
    np.fill_diagonal(sim, -np.inf)
    group_models = np.zeros((total, n_models), bool)
    group_models[np.arange(total), np.arange(total) // width] = True
    gm = group_models.astype(np.int64)
    shared = (gm @ gm.T) > 0
    budget = np.full(n_models, int(np.floor(beta * width)))
    blocked = _shares_spent_model(group_models, budget)
    members = {k: [k] for k in range(total)}
    for _ in range(total - width):
        scores = np.where(shared, alpha * sim + (alpha - 1.0), sim)
        scores[blocked] = -np.inf
        if not np.isfinite(scores).any():  # every budget spent: merge the best pair anyway
            scores = sim
        a, b = np.unravel_index(int(np.argmax(scores)), scores.shape)
        was_spent = budget <= 0
        budget -= (group_models[a] & group_models[b]).astype(int)
        members[a] += members.pop(b)
        group_models[a] |= group_models[b]
        merged = np.minimum(sim[a], sim[b])
        sim[a, :], sim[:, a] = merged, merged
        sim[b, :], sim[:, b] = -np.inf, -np.inf
        sim[a, a] = -np.inf
        shared[a, :] = shared[:, a] = (group_models.astype(np.int64) @ group_models[a]) > 0
        if (was_spent != (budget <= 0)).any():
            blocked = _shares_spent_model(group_models, budget)
        else:
            blocked[a, :] = blocked[:, a] = (group_models[:, budget <= 0].astype(np.int64)
                                             @ group_models[a, budget <= 0]) > 0
    return [sorted(group) for group in members.values()]


def _order(groups: list[list[int]], width: int, reference: int) -> list[list[int]]:
    """Groups holding reference units first, in the reference's unit order (so that merging a
    model with itself is the identity), then the rest."""
    def key(group):
        ref_units = [k % width for k in group if k // width == reference]
        return (0, min(ref_units)) if ref_units else (1, min(group))
    return sorted(groups, key=key)


def zipit_transforms(corr: np.ndarray, n_models: int, width: int, *, alpha: float, beta: float,
                     reference: int = 0) -> tuple[list[Transform], list[int]]:
    """Per-model transforms for uniform averaging, and the group sizes.

    For model m, ``T = N * M_m^T`` (``M_m`` ``[width, width]`` averages each group) and
    ``T_inv = U_m^T`` (``U_m`` copies a group's feature back to each of its members).
    """
    groups = _order(greedy_groups(corr, n_models, width, alpha=alpha, beta=beta), width, reference)
    merge = np.zeros((n_models, width, width))
    unmerge = np.zeros((n_models, width, width))
    for f, group in enumerate(groups):
        for k in group:
            merge[k // width, f, k % width] = 1.0 / len(group)
            unmerge[k // width, k % width, f] = 1.0
    transforms = [Transform(n_models * merge[m].T, unmerge[m].T.copy()) for m in range(n_models)]
    return transforms, [len(g) for g in groups]


def align_zipit(ctx: AlignContext, *, alpha: float, beta: float) -> Alignment:
    """ZipIt! on every merge point: one joint correlation matrix ``[N*n, N*n]`` of all models'
    units, greedy groups, a merge map per model."""
    result = Alignment(identity_transforms(ctx))
    n_models = len(ctx.states)
    for point in ctx.spec.points:
        p = ctx.stats[point.name]
        joint = np.block([[p.corr(i, j) for j in range(n_models)] for i in range(n_models)])
        transforms, groups = zipit_transforms(joint, n_models, point.width, alpha=alpha, beta=beta,
                                              reference=ctx.reference)
        for i, t in enumerate(transforms):
            result.transforms[i][point.name] = t
        result.details[point.name] = {i: {"group_sizes": groups} for i in ctx.others}
    return result


METHOD = Method("zipit", "ZipIt!: greedy joint matching of all models' features, same-model "
                "merges allowed.", align_zipit, "all",
                {"alpha": Option(0.3, float, "similarity kept by a merged group (0..1)", 0.0,
                                 maximum=1.0),
                 "beta": Option(0.125, float, "fraction of a model's units that may merge within "
                                "the model", 0.0, maximum=1.0)}, joint=True)
