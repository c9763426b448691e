"""Feature matching between two models at one merge point (``method.md`` section 7).

Convention (as in :mod:`ccamerge.methods.cca`): X is the reference model, Y the other model; a
feature row ``y`` ``[n]`` maps to ``y @ T`` in X's basis, so ``T`` is ``[n_y, n_x]``: row k =
unit k of Y, column j = unit j of X. The Hungarian match ``perm`` ``[n]`` pairs reference unit j
with unit ``perm[j]`` of Y (``Transform.from_permutation``: ``T[perm[j], j] = 1``).

Quantities, per column j of ``T~ = D_y T D_x^-1`` (T in correlation units, D = diag of unit std):

* top-1 share ``max_k T~_kj^2 / sum_k T~_kj^2`` (1 when one unit carries the feature);
* participation ratio ``(sum_k T~_kj^2)^2 / sum_k T~_kj^4`` (1 for a permutation, n for uniform);
* k90, how many entries hold 90% of the column's squared mass;
* agreement: whether ``argmax_k |T~_kj|`` is the Hungarian match ``perm[j]``.

Columns with no mass (dead reference units) get NaN shares and ratios, k90 = 0, and do not count
towards the agreement.

A spread-out map is not a different alignment: :func:`aligned_units` measures, per reference unit
j, how closely each alignment reproduces it (``corr(x_j, (y T)_j)`` for CCA's T and for the
permutation) and how much of CCA's mix is the matched unit (``corr((y T)_j, y_perm[j])``), fitted
on one set of statistics and measured on held-out ones. Pure numpy; the dashboard draws these
arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ccamerge.errors import CcamergeError
from ccamerge.methods.base import hungarian
from ccamerge.methods.cca import solve_pair
from ccamerge.stats import PointStatistics
from ccamerge.transform import Transform

MAX_DISPLAY = 128


def correlation_units(T: np.ndarray, std_x: np.ndarray, std_y: np.ndarray) -> np.ndarray:
    """``T~ = D_y T D_x^-1`` ``[n_y, n_x]`` for ``T`` ``[n_y, n_x]``, unit stds ``std_x`` ``[n_x]``
    and ``std_y`` ``[n_y]``. A dead reference unit (std 0) gives a zero column."""
    std_x, std_y = np.asarray(std_x, float), np.asarray(std_y, float)
    if T.shape != (len(std_y), len(std_x)):
        raise CcamergeError(f"T has shape {list(T.shape)} but the stds give "
                            f"[{len(std_y)}, {len(std_x)}]")
    inv_x = np.divide(1.0, std_x, out=np.zeros_like(std_x), where=std_x > 0)
    return std_y[:, None] * T * inv_x[None, :]


def _column_mass(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared entries ``[n_y, n_x]`` and their column sums ``[n_x]``."""
    sq = np.square(np.asarray(t, float))
    return sq, sq.sum(axis=0)


def top1_share(t: np.ndarray) -> np.ndarray:
    """``max_k t_kj^2 / sum_k t_kj^2`` per column ``[n_x]`` (NaN for an all-zero column)."""
    sq, mass = _column_mass(t)
    return np.divide(sq.max(axis=0), mass, out=np.full(mass.shape, np.nan), where=mass > 0)


def participation_ratio(t: np.ndarray) -> np.ndarray:
    """``(sum_k t_kj^2)^2 / sum_k t_kj^4`` per column ``[n_x]``: 1 for one-hot, n for uniform."""
    sq, mass = _column_mass(t)
    fourth = np.square(sq).sum(axis=0)
    return np.divide(mass**2, fourth, out=np.full(mass.shape, np.nan), where=fourth > 0)


def k90(t: np.ndarray, fraction: float = 0.9) -> np.ndarray:
    """Smallest number of entries per column ``[n_x]`` (int) holding ``fraction`` of the column's
    squared mass; 0 for an all-zero column."""
    sq, mass = _column_mass(t)
    cumulative = np.cumsum(np.sort(sq, axis=0)[::-1], axis=0)  # [n_y, n_x], descending entries
    reached = cumulative >= fraction * mass[None, :] * (1 - 1e-12)
    counts = reached.argmax(axis=0) + 1
    return np.where(mass > 0, counts, 0).astype(np.int64)


def agreement(t: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Per column ``[n_x]`` (bool): the largest ``|t_kj|`` sits at the matched unit ``perm[j]``.
    All-zero columns give False; see :func:`agreement_rate` for the share over live columns."""
    perm = np.asarray(perm)
    if len(perm) != t.shape[1]:
        raise CcamergeError(f"perm has {len(perm)} entries for {t.shape[1]} columns")
    live = np.abs(t).sum(axis=0) > 0
    return (np.abs(t).argmax(axis=0) == perm) & live


def agreement_rate(t: np.ndarray, perm: np.ndarray) -> float:
    """Share (0..1) of live columns whose argmax is the Hungarian match; NaN with no live column."""
    live = np.abs(t).sum(axis=0) > 0
    return float(agreement(t, perm)[live].mean()) if live.any() else float("nan")


def reorder_by_matching(corr: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """``corr`` ``[n_x, n_y]`` (rows reference units) with columns in matched order: entry
    ``[j, j]`` is the correlation of reference unit j with its match ``perm[j]``."""
    return np.asarray(corr)[:, np.asarray(perm)]


def permutation_matrix(perm: np.ndarray) -> np.ndarray:
    """The permutation as a ``T`` ``[n_y, n_x]``: ``P[perm[j], j] = 1``."""
    return Transform.from_permutation(perm).T


def block_reduce(matrix: np.ndarray, max_size: int = MAX_DISPLAY,
                 how: str = "mean") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aggregate ``matrix`` ``[r, c]`` into blocks so neither side exceeds ``max_size``.

    Blocks are ``ceil(r / max_size)`` rows by ``ceil(c / max_size)`` columns (the last may be
    smaller). ``how``: ``"mean"`` (keeps signs) or ``"absmax"`` (strongest entry, sign kept).
    Returns the reduced matrix ``[R, C]`` and the first index of every block, ``[R]`` and ``[C]``.
    """
    matrix = np.asarray(matrix, float)
    if matrix.ndim != 2 or max_size < 1:
        raise CcamergeError("block_reduce needs a 2-D matrix and max_size >= 1")
    if how not in ("mean", "absmax"):
        raise CcamergeError(f"how must be 'mean' or 'absmax', not {how!r}")
    (r, c), (br, bc) = matrix.shape, (-(-matrix.shape[0] // max_size),
                                      -(-matrix.shape[1] // max_size))
    rows, cols = -(-r // br), -(-c // bc)
    padded = np.full((rows * br, cols * bc), np.nan)
    padded[:r, :c] = matrix
    blocks = padded.reshape(rows, br, cols, bc).transpose(0, 2, 1, 3).reshape(rows, cols, -1)
    if how == "mean":
        reduced = np.nanmean(blocks, axis=-1)
    else:
        pick = np.argmax(np.where(np.isnan(blocks), -1.0, np.abs(blocks)), axis=-1)
        reduced = np.take_along_axis(blocks, pick[..., None], axis=-1)[..., 0]
    return reduced, np.arange(rows) * br, np.arange(cols) * bc


@dataclass(frozen=True)
class FeatureMatching:
    """Everything the feature-matching view draws for one merge point and one model pair.

    ``corr`` ``[n, n]``: Pearson correlation, rows reference units j, columns model units k.
    ``perm`` ``[n]``: Hungarian match (reference j <-> model ``perm[j]``); ``corr_matched`` =
    ``corr[:, perm]``. ``T_tilde`` ``[n, n]``: CCA map in correlation units (rows model units k,
    columns reference units j); ``perm_matrix`` the permutation in the same layout. Per reference
    unit ``[n]``: ``top1``, ``participation``, ``k90``, ``agrees``; ``rho`` ``[n]``: canonical
    correlations at ``gamma``.
    """

    name: str
    width: int
    corr: np.ndarray
    perm: np.ndarray
    corr_matched: np.ndarray
    T_tilde: np.ndarray
    perm_matrix: np.ndarray
    top1: np.ndarray
    participation: np.ndarray
    k90: np.ndarray
    agrees: np.ndarray
    agreement: float
    rho: np.ndarray

    def summary(self) -> dict:
        """JSON-able one-number summaries (means over live reference units)."""
        return {"name": self.name, "width": self.width,
                "mean_matched_corr": float(np.mean(np.diag(self.corr_matched))),
                "mean_rho": float(np.mean(self.rho)),
                "mean_top1": float(np.nanmean(self.top1))
                if np.isfinite(self.top1).any() else float("nan"),
                "mean_participation": float(np.nanmean(self.participation))
                if np.isfinite(self.participation).any() else float("nan"),
                "median_k90": float(np.median(self.k90)), "agreement": self.agreement}


def feature_matching(point: PointStatistics, reference: int, other: int, *,
                     gamma: float | None = None, relative: bool | None = None) -> FeatureMatching:
    """Correlations, Hungarian match, CCA map in correlation units and spread metrics between
    ``reference`` and ``other`` at one merge point, from its collected statistics."""
    corr = point.corr(reference, other)  # [n, n] rows reference units
    perm = hungarian(corr)
    fit = solve_pair(point, reference, other, gamma=gamma, relative=relative)
    t = correlation_units(fit.T, point.std(reference), point.std(other))
    return FeatureMatching(point.name, point.width, corr, perm, reorder_by_matching(corr, perm), t,
                           permutation_matrix(perm), top1_share(t), participation_ratio(t), k90(t),
                           agreement(t, perm), agreement_rate(t, perm), fit.rho)


# ----------------------------------------------------------------------------- aligned units
def _pearson(cov: np.ndarray, var_a: np.ndarray, var_b: np.ndarray) -> np.ndarray:
    """``cov / sqrt(var_a var_b)`` elementwise ``[n]``; NaN where a side has no variance."""
    den = np.sqrt(np.clip(var_a, 0, None) * np.clip(var_b, 0, None))
    return np.clip(np.divide(cov, den, out=np.full(den.shape, np.nan), where=den > 0), -1, 1)


def aligned_correlations(T: np.ndarray, point: PointStatistics, reference: int,
                         other: int) -> np.ndarray:
    """Per reference unit j ``[n_x]``: ``corr(x_j, (y T)_j)`` on ``point``'s statistics, how
    closely model ``other``'s features mapped by ``T`` ``[n_y, n_x]`` reproduce reference unit j
    (for a permutation, ``corr[j, perm[j]]``). NaN where either side has no variance."""
    cross = np.einsum("jk,kj->j", point.cov(reference, other), T)  # (C_xy T)_jj
    mapped = np.einsum("kj,kl,lj->j", T, point.cov(other, other), T)  # (T^T C_yy T)_jj
    return _pearson(cross, np.diag(point.cov(reference, reference)), mapped)


def mix_vs_match(T: np.ndarray, perm: np.ndarray, point: PointStatistics, other: int) -> np.ndarray:
    """Per reference unit j ``[n_x]``: ``corr((y T)_j, y_perm[j])``, how much of the mix of
    model ``other``'s units that ``T`` ``[n_y, n_x]`` builds is the one unit the Hungarian
    match ``perm`` ``[n_x]`` picks. NaN where either side has no variance."""
    c_yy, cols = point.cov(other, other), np.arange(len(perm))
    cross = (c_yy @ T)[perm, cols]
    mapped = np.einsum("kj,kl,lj->j", T, c_yy, T)
    return _pearson(cross, np.diag(c_yy)[perm], mapped)


@dataclass(frozen=True)
class AlignedUnits:
    """How closely each alignment reproduces the reference's units at one merge point, fitted on
    one set of statistics and measured on another (held-out). Per reference unit ``[n]``:
    ``cca`` (CCA-mapped features vs the reference unit), ``permute`` (the matched unit vs the
    reference unit), ``mix_vs_match`` (the CCA mix vs the matched unit) and ``variance`` (of the
    reference unit, for weighting); ``participation`` is the mean participation ratio of the
    CCA map (units per feature)."""

    name: str
    cca: np.ndarray
    permute: np.ndarray
    mix_vs_match: np.ndarray
    variance: np.ndarray
    participation: float
    held_out: bool

    def means(self) -> dict[str, float]:
        """Means over live reference units of ``cca``, ``permute`` and ``mix_vs_match``."""
        return {k: float(np.nanmean(getattr(self, k))) for k in ("cca", "permute", "mix_vs_match")}


def aligned_units(fit_point: PointStatistics, eval_point: PointStatistics | None, reference: int,
                  other: int, *, gamma: float | None = None,
                  relative: bool | None = None) -> AlignedUnits:
    """CCA's map and the Hungarian match fitted on ``fit_point``, measured on ``eval_point``
    (held-out statistics of the same point; ``fit_point`` itself when None)."""
    measured = eval_point if eval_point is not None else fit_point
    fit = solve_pair(fit_point, reference, other, gamma=gamma, relative=relative)
    perm = hungarian(fit_point.corr(reference, other))
    t_tilde = correlation_units(fit.T, fit_point.std(reference), fit_point.std(other))
    return AlignedUnits(fit_point.name, aligned_correlations(fit.T, measured, reference, other),
                        aligned_correlations(permutation_matrix(perm), measured, reference, other),
                        mix_vs_match(fit.T, perm, measured, other),
                        np.diag(measured.cov(reference, reference)).copy(),
                        float(np.nanmean(participation_ratio(t_tilde))), eval_point is not None)
