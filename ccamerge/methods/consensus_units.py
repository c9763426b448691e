"""Consensus units for gcca (``consensus_units=True``): a merged unit basis that no model owns.

gcca maps every model into the reference's units through the shared space (``T_i = W_i
G_ref``), so the reference still decides where the merged ReLUs act. Here the merged model's
units are built from all N models' units at once. At one merge point, with every shared
direction kept (:mod:`ccamerge.methods.gcca`'s ``W_i``, ``G_i = W_i^T S_i`` ``[k, r]`` on the
``r`` live units), column ``u`` of ``G_i`` is unit u of model i written in shared coordinates
(its covariance with the k unit-variance shared variates; ``G_i^T G_i = S_i``). Units of
different models are comparable there, so they are matched and averaged there (permutation
generalized Procrustes)::

    min over permutations P_i and G*:   sum_i || G_i P_i - G* ||_F^2,     G* = mean_i G_i P_i

by alternation: P_i = Hungarian on ``G*^T G_i`` (maximise the matched inner products, which
for fixed G* minimises the distance), G* = the mean of the aligned loadings, until no P_i
changes (each step lowers the objective). ``||G_i P_i - G*||^2 = ||S_i^1/2 (P_i - W_i G*)||^2``
(``G_i W_i = I``): the variance by which model i's matched units differ from the centre's.
The start is every model's own loadings in turn and the lowest objective wins, so the result
depends on the set of models, not their order (the unit order of the merged model is the
winning start's: a permutation, function-neutral).

Directions outside the shared space (``m = r - k``: null directions of rank-deficient blocks,
or those ``shared_width`` drops) have no common coordinates: with ``H_i`` ``[m, r]`` model i's
loadings on its complement basis ``C_i`` (:meth:`SharedSpace.complement`), each is turned by an
orthogonal Procrustes rotation ``R_i`` ``[m, m]`` towards the others (generalized Procrustes with
the permutations fixed). Model i's aligned full loadings are ``A_i = [G_i; R_i H_i] P_i``
``[r, r]``, with ``A_i^T A_i = P_i^T S_i P_i`` (its covariance in consensus order).

The merged units are not the arithmetic mean of the ``A_i``: matched units that point in
different directions cancel in a mean, which leaves it ill-conditioned, and the unmerge
(``L*^-1``, below) then amplifies the error the ReLU makes under a dense map (VGG x1 pairs of the
reproduction: condition numbers up to 800, merges at 25-56% held-out accuracy where gcca gets
78-82%). Instead each ``A_i = F_i^* (A_i^T A_i)^1/2`` is split (polar decomposition) into an
orthogonal frame ``F_i^*`` and its covariance root, and the two are averaged apart::

    L* = polar(mean_i F_i^*) (mean_i P_i^T S_i P_i)^1/2           [r, r]

(frames: the orthogonal matrix nearest their mean; covariances: their mean), so ``L*^T L*`` is
the models' mean covariance and ``cond(L*)`` is that of its square root. With ``F_i = [O_i,
C_i]`` (orthonormal, whitened) and ``D_i = diag(I_k, R_i^T)``::

    T_i     = Q_i L_i^-1/2 F_i D_i L*        [r, r]   (merge: x_i to the consensus units)
    T_inv_i = L*^-1 D_i^T F_i^T L_i^1/2 Q_i^T          (unmerge),   T_i T_inv_i = I

(every model, the reference included, is transformed). Between two models the consensus
cancels: ``T_i T_inv_j = W_i G_j`` (+ the complement's Procrustes part), which is gcca's map of
model i into model j's units, so this option changes only the basis in which the N models are
averaged and where the merged ReLUs and BatchNorm vectors act, not how models correspond. Exact
cases: a permuted family ``x_i = x P_i`` has ``G_i = G_0 P_i``, so ``G* = G_0 P_c`` and
``T_i = P_i^T P_c``, exact permutations; copies give ``T_i = I``. A rotation of the shared
space (``G_i -> R^T G_i`` for all i) turns ``L*`` alike and leaves every ``T_i`` unchanged. For
N = 2 the two models' units are matched on ``G_0^T G_1 = S_0^1/2 U V^T S_1^1/2`` (the
cross-covariance CCA's directions would give at correlation 1) and the merged frame is the
midpoint ``polar(F_0^* + F_1^*)`` with the mean covariance: symmetric in the two models; it is
not CCA Merge (whose basis is model 0's), but ``T_1 T_inv_0`` is CCA Merge's T. Dead units paired
outside the solve go dead-to-dead by identity, as in gcca. Equal widths only.

``distances[i] = ||G_i P_i - G*||^2 / ||G*||^2``: how far model i's units are from the
consensus units (the smallest: the model nearest the consensus, an unsupervised reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ccamerge import linalg
from ccamerge.errors import CcamergeError
from ccamerge.methods.base import hungarian
from ccamerge.transform import Transform

MAX_SWEEPS = 50  # alternations of matching and averaging (they stop when no match changes)
PROCRUSTES_SWEEPS = 20


@dataclass(frozen=True)
class Consensus:
    """The consensus units of one merge point: ``perms[i]`` ``[r]`` (model i's live unit at
    each consensus position), their full loadings ``loadings`` ``L*`` ``[r, r]``, the complement
    rotations ``rotations[i]`` ``[m, m]``, ``distances`` ``[N]`` and the winning ``start``."""

    perms: list[np.ndarray]
    loadings: np.ndarray
    rotations: list[np.ndarray]
    distances: np.ndarray
    start: int


def frame(space, i: int) -> np.ndarray:
    """``F_i = [O_i, C_i]`` ``[r, r]``: model i's shared then complement whitened directions."""
    return np.hstack([space.padded(i), space.complement(i)])


def _match(loadings: list[np.ndarray], start: int) -> tuple[list[np.ndarray], np.ndarray, float]:
    """Alternate Hungarian matching to the centre and averaging, from model ``start``'s
    loadings; ``(perms, centre, objective)``."""
    centre, perms = loadings[start], None
    for _ in range(MAX_SWEEPS):
        new = [hungarian(centre.T @ g) for g in loadings]  # [r] model unit per position
        if perms is not None and all(np.array_equal(a, b) for a, b in zip(new, perms, strict=True)):
            break
        perms = new
        centre = np.mean([g[:, p] for g, p in zip(loadings, perms, strict=True)], axis=0)
    objective = sum(float(((g[:, p] - centre) ** 2).sum())
                    for g, p in zip(loadings, perms, strict=True))
    return perms, centre, objective


def _procrustes(target: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Orthogonal ``R`` ``[m, m]`` minimising ``||R source - target||`` (both ``[m, r]``)."""
    return linalg.polar(target @ source.T)


def _complements(aligned: list[np.ndarray], start: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Generalized Procrustes of the aligned complement loadings ``[m, r]``: ``(R_i, H*)``."""
    m = aligned[0].shape[0]
    rotations = [np.eye(m) for _ in aligned]
    if not m:
        return rotations, aligned[0]
    centre = aligned[start]
    for _ in range(PROCRUSTES_SWEEPS):
        rotations = [_procrustes(centre, h) for h in aligned]
        new = np.mean([r @ h for r, h in zip(rotations, aligned, strict=True)], axis=0)
        done = np.abs(new - centre).max() <= 1e-12 * max(np.abs(new).max(), 1e-30)
        centre = new
        if done:
            break
    return rotations, centre


def consensus_units(space) -> Consensus:
    """The consensus units of a :class:`ccamerge.methods.gcca.SharedSpace` (module docstring)."""
    widths = {len(b.live) for b in space.bases}
    if len({b.width for b in space.bases}) > 1 or len(widths) > 1:
        raise CcamergeError("gcca consensus_units needs models of equal widths; use the "
                            "reference's units (consensus_units false) to merge mixed widths")
    full = [frame(space, i).T @ b.dewhitener for i, b in enumerate(space.bases)]  # [r, r]
    k = len(space.eigenvalues)
    shared = [f[:k] for f in full]
    runs = [_match(shared, s) for s in range(len(full))]
    start = int(np.argmin([run[2] for run in runs]))
    perms, centre, _ = runs[start]
    rotations, _ = _complements([f[k:][:, p] for f, p in zip(full, perms, strict=True)], start)
    scale = max(float((centre ** 2).sum()), 1e-300)
    distances = np.array([float(((g[:, p] - centre) ** 2).sum()) / scale
                          for g, p in zip(shared, perms, strict=True)])
    aligned = [np.vstack([f[:k][:, p], r @ f[k:][:, p]])
               for f, p, r in zip(full, perms, rotations, strict=True)]
    return Consensus(perms, polar_mean(aligned), rotations, distances, start)


def polar_mean(aligned: list[np.ndarray]) -> np.ndarray:
    """``polar(mean_i R_i) (mean_i A_i^T A_i)^1/2`` of the aligned loadings ``A_i = R_i
    S_i^1/2`` ``[r, r]``: their frames averaged on the orthogonal group, their covariances
    averaged, so the consensus is as well conditioned as the models."""
    frames, covs = [], []
    for a in aligned:
        frames.append(linalg.polar(a))
        covs.append(a.T @ a)
    values, vectors = np.linalg.eigh(np.mean(covs, axis=0))
    root = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    return linalg.polar(np.mean(frames, axis=0)) @ root


def consensus_transform(space, units: Consensus, i: int) -> Transform:
    """Model i's merge and unmerge maps into the consensus units ``[n, n]`` (module docstring);
    the consensus positions are the winning start's units, its paired dead units last."""
    b, home = space.bases[i], space.bases[units.start]
    k = len(space.eigenvalues)
    turn = np.eye(len(b.live))
    turn[k:, k:] = units.rotations[i].T  # D_i
    into = b.whitener @ frame(space, i) @ turn  # [r, r] x_i to full consensus coordinates
    T = np.zeros((b.width, b.width))
    T_inv = np.zeros((b.width, b.width))
    T[np.ix_(b.live, home.live)] = into @ units.loadings
    T_inv[np.ix_(home.live, b.live)] = np.linalg.solve(units.loadings, turn.T @ frame(space, i).T
                                                       @ b.dewhitener)
    T[b.paired, home.paired] = 1.0
    T_inv[home.paired, b.paired] = 1.0
    return Transform(T, T_inv)


def condition(units: Consensus) -> float:
    """Condition number of ``L*`` (how far the averaging went towards cancelling units)."""
    return float(np.linalg.cond(units.loadings))
