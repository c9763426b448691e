"""The shared space's spectrum: how much structure all N models share at once (gcca, MAXVAR).

:func:`ccamerge.methods.gcca.solve_shared` returns, per merge point, eigenvalues ``lambda_k``
``[k]`` (between 0 and N; 1 when a direction is one model's alone, N when every model has it)
and per model i the block ``V_i`` ``[r_i, k]`` of the eigenvectors. Model i's variate along
shared direction k is ``u_ik = x_i w_ik`` with the MAXVAR directions ``W_i = Q_i L_i^-1/2 V_i``
``[live_i, k]`` (unscaled: their lengths carry each model's weight in the direction), and the
shared (consensus) variate is their sum ``g_k = sum_i u_ik``. On any set of samples, with that
set's unregularised covariances ``C_ij``, the variates have the covariances::

    K_k[i, j] = w_ik^T C_ij w_jk          ([k, N, N] over all directions)

from which this module reads, per direction, the mean pairwise correlation of the N variates
(``rho``, mean over i < j of ``corr(u_i, u_j)``) and each model's correlation with the consensus
``corr(u_ik, g_k)``. On the fitting statistics with gamma = 0 these obey ``lambda_k = sum_i
corr(u_ik, g_k)^2`` (so a copy of every model gives 1 each and ``lambda = N``); for N = 2,
``lambda_k = 1 + rho_k`` with rho_k CCA's canonical correlations. gcca itself reports
``(lambda_k - 1) / (N - 1)`` as rho: the mean pairwise correlation when every model carries the
direction equally (always for N = 2) and gamma = 0; for the first direction at gamma = 0 never
below it (lambda_1 is the top eigenvalue of its variates' correlation matrix), and a ridge
gamma > 0 shrinks it, like CCA's singular values. Measured on held-out statistics,
the directions' correlations show what generalises (as :mod:`ccamerge.analysis.spectra` does for
CCA's pairs).

Pure numpy on collected statistics (every covariance block: ``pairs="all"``).
"""

from __future__ import annotations

import numpy as np

from ccamerge.errors import CcamergeError
from ccamerge.methods import get_method
from ccamerge.methods.gcca import SharedSpace, solve_shared
from ccamerge.stats import PointStatistics, Statistics


def shared_directions(space: SharedSpace) -> list[np.ndarray]:
    """MAXVAR directions ``W_i = Q_i L_i^-1/2 V_i`` ``[live_i, k]`` per model (unit
    coordinates of its live units), column k giving model i's variate of shared direction k."""
    return [b.whitener[:, :b.rank] @ v for b, v in zip(space.bases, space.blocks, strict=True)]


def variate_covariances(point: PointStatistics, space: SharedSpace,
                        directions: list[np.ndarray]) -> np.ndarray:
    """``K`` ``[k, N, N]``: covariances of the N models' variates per shared direction on
    ``point``'s (unregularised) statistics."""
    n, k = len(directions), directions[0].shape[1]
    out = np.zeros((k, n, n))
    for i in range(n):
        for j in range(i, n):
            c = point.cov(i, j)[np.ix_(space.bases[i].live, space.bases[j].live)]
            out[:, i, j] = out[:, j, i] = np.einsum("ak,ab,bk->k", directions[i], c,
                                                    directions[j])
    return out


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    root = np.sqrt(np.clip(den, 0.0, None))
    return np.clip(np.divide(num, root, out=np.zeros_like(root), where=root > 0), -1.0, 1.0)


def mean_pairwise(cov: np.ndarray) -> np.ndarray:
    """``[k]`` mean over model pairs i < j of ``corr(u_i, u_j)`` from ``cov`` ``[k, N, N]``."""
    var = np.diagonal(cov, axis1=1, axis2=2)  # [k, N]
    corr = _safe_ratio(cov, var[:, :, None] * var[:, None, :])
    upper = np.triu_indices(cov.shape[1], 1)
    return corr[:, upper[0], upper[1]].mean(axis=1)


def with_consensus(cov: np.ndarray) -> np.ndarray:
    """``[N, k]``: ``corr(u_ik, g_k)`` of each model's variate with the sum of all of them,
    from ``cov`` ``[k, N, N]``."""
    var = np.diagonal(cov, axis1=1, axis2=2)  # [k, N]
    return _safe_ratio(cov.sum(axis=2), var * cov.sum(axis=(1, 2))[:, None]).T


def variance_share(point: PointStatistics, space: SharedSpace, i: int,
                   direction: np.ndarray) -> float:
    """Share of model i's total (live, unregularised) variance lying in the span of its k
    shared directions ``direction`` ``[live_i, k]``: 1 when they span all its features, below
    when it is wider or richer than the space the models share."""
    live = space.bases[i].live
    c = point.cov(i, i)[np.ix_(live, live)]
    total = float(np.trace(c))
    if total <= 0:
        return 0.0
    cw = c @ direction
    return float(np.trace(cw @ np.linalg.pinv(direction.T @ cw, hermitian=True) @ cw.T) / total)


def _measured(point: PointStatistics, space: SharedSpace,
              directions: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(rho [k], consensus [N, k])`` of the shared directions on ``point``'s statistics."""
    cov = variate_covariances(point, space, directions)
    return mean_pairwise(cov), with_consensus(cov)


def _model_rows(fit_point: PointStatistics, space: SharedSpace, directions: list[np.ndarray],
                fit_cons: np.ndarray, held_cons: np.ndarray | None) -> list[dict]:
    """Per model: how well it spans the shared space and follows the consensus."""
    return [{"model": i, "width": b.width, "dead": b.dead, "rank": b.rank, "gamma": b.gamma,
             "cond_shared": space.gram_condition(i),
             "variance_share": variance_share(fit_point, space, i, directions[i]),
             "mean_consensus_fit": float(fit_cons[i].mean()),
             "mean_consensus_heldout": None if held_cons is None else float(held_cons[i].mean())}
            for i, b in enumerate(space.bases)]


def shared_spectrum_row(fit_point: PointStatistics, eval_point: PointStatistics | None,
                        num_models: int, *, gamma: float, relative: bool) -> dict:
    """One merge point, JSON-able. Arrays ``[k]`` (shared directions, eigenvalue order):
    ``eigenvalues``, ``rho_eigen`` (``(lambda - 1) / (N - 1)``, gcca's rho), ``rho_fit`` /
    ``rho_heldout`` (mean pairwise correlation of the variates on the fitting / held-out
    statistics); ``consensus_fit`` / ``consensus_heldout`` ``[N][k]`` (each model's
    correlation with the consensus variate); ``mean_<array>`` of the ``[k]`` ones; ``models``
    (per model: ``cond_shared``, ``variance_share``, mean consensus correlations, dead units,
    rank, ridge). Held-out entries are None without ``eval_point``."""
    space = solve_shared(fit_point, num_models, gamma=gamma, relative=relative)
    directions = shared_directions(space)
    rho_fit, cons_fit = _measured(fit_point, space, directions)
    rho_held, cons_held = (None, None) if eval_point is None else _measured(
        eval_point, space, directions)
    arrays = {"eigenvalues": space.eigenvalues, "rho_eigen": space.rho, "rho_fit": rho_fit,
              "rho_heldout": rho_held}
    row = {"name": fit_point.name, "num_models": num_models, "directions": len(space.eigenvalues),
           "widths": list(fit_point.widths), "samples": fit_point.count,
           "heldout_samples": None if eval_point is None else eval_point.count}
    for key, values in arrays.items():
        row[key] = None if values is None else np.asarray(values, float).tolist()
        row[f"mean_{key}"] = None if values is None else float(np.mean(values))
    row["consensus_fit"] = cons_fit.tolist()
    row["consensus_heldout"] = None if cons_held is None else cons_held.tolist()
    row["models"] = _model_rows(fit_point, space, directions, cons_fit, cons_held)
    return row


def shared_spectrum_rows(fit_stats: Statistics, eval_stats: Statistics | None, *,
                         gamma: float | None = None, relative: bool | None = None) -> list[dict]:
    """:func:`shared_spectrum_row` for every merge point (depth order) of statistics with every
    covariance block; ``gamma``, ``relative`` default to the gcca method's."""
    if fit_stats.num_models > 2 and fit_stats.pairs != "all":
        raise CcamergeError("the shared spectrum needs every covariance block: collect the "
                            "statistics with pairs='all'")
    given = {k: v for k, v in (("gamma", gamma), ("relative", relative)) if v is not None}
    opts = get_method("gcca").resolve(given)
    return [shared_spectrum_row(point, None if eval_stats is None else eval_stats[name],
                                fit_stats.num_models, gamma=opts["gamma"],
                                relative=opts["relative"])
            for name, point in fit_stats.points.items()]
