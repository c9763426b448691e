"""Shrunk singular values against the correlations canonical pairs reach (method.md section 8).

With a ridge gamma > 0 the singular values ``s_k`` of ``M = S_xx^-1/2 C_xy S_yy^-1/2`` are shrunk
towards 0; they are not correlations. Canonical pair k has the directions ``a_k = S_xx^-1/2 u_k``
and ``b_k = S_yy^-1/2 v_k`` (in the coordinates of the live units, from
:func:`ccamerge.methods.cca.solve_pair`). The correlation the pair reaches on any set of samples,
with that set's unregularised covariances ``C``, is::

    corr(X a_k, Y b_k) = a_k^T C_xy b_k / sqrt(a_k^T C_xx a_k * b_k^T C_yy b_k)

On the statistics the fit came from it is at least ``s_k`` (the ridge only shrinks); on held-out
images it is what generalises. Unregularised CCA on few samples per feature overfits: its
fitting-data correlations approach 1 even between unrelated features (:func:`noise_level`), the
held-out ones do not. The Hungarian-matched unit pairs are measured the same way, so both methods
are compared on the same held-out images.

Pure numpy on collected statistics; :func:`ccamerge.api.spectrum` collects them (fitting and
held-out) and returns these rows.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from ccamerge.methods.cca import CCAResult, solve_near_exact, solve_pair
from ccamerge.stats import PointStatistics, Statistics

HOLDOUT = 0.2  # share of the training images held out to measure correlations on
MIN_HELDOUT = 10  # fewer held-out images than this and nothing is held out


def directions(fit: CCAResult) -> tuple[np.ndarray, np.ndarray]:
    """Canonical directions in unit coordinates: ``A = S_xx^-1/2 U`` ``[live_x, k]`` and
    ``B = S_yy^-1/2 V`` ``[live_y, k]``, one column per canonical pair, ``k = min(live)``."""
    k = min(len(fit.live_x), len(fit.live_y))
    return fit.w_x @ fit.U[:, :k], fit.w_y @ fit.V[:, :k]


def _quadratic(a: np.ndarray, c: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a_k^T c b_k`` per column k: ``[k]`` for ``a`` ``[p, k]``, ``c`` ``[p, q]``, ``b``
    ``[q, k]``."""
    return np.einsum("ik,ij,jk->k", a, c, b)


def pair_correlations(a: np.ndarray, b: np.ndarray, c_xx: np.ndarray, c_yy: np.ndarray,
                      c_xy: np.ndarray) -> np.ndarray:
    """Pearson correlation of ``X a_k`` and ``Y b_k`` per column k ``[k]``, from the covariances
    of X ``[S, p]`` and Y ``[S, q]``: ``c_xx`` ``[p, p]``, ``c_yy`` ``[q, q]``, ``c_xy``
    ``[p, q]``; ``a`` ``[p, k]``, ``b`` ``[q, k]``. 0 where a projection has no variance."""
    var = np.clip(_quadratic(a, c_xx, a), 0, None) * np.clip(_quadratic(b, c_yy, b), 0, None)
    den = np.sqrt(var)
    out = np.divide(_quadratic(a, c_xy, b), den, out=np.zeros_like(den), where=den > 0)
    return np.clip(out, -1.0, 1.0)


def reached(fit: CCAResult, point: PointStatistics, reference: int, other: int) -> np.ndarray:
    """The correlations ``[n]`` that ``fit``'s canonical pairs reach on ``point``'s statistics
    (the fitting ones or held-out ones), in the fit's order, the paired dead units last as 0
    (like ``fit.rho``)."""
    a, b = directions(fit)
    lx, ly = fit.live_x, fit.live_y
    corr = pair_correlations(a, b, point.cov(reference, reference)[np.ix_(lx, lx)],
                             point.cov(other, other)[np.ix_(ly, ly)],
                             point.cov(reference, other)[np.ix_(lx, ly)])
    return np.concatenate([corr, np.zeros(len(fit.rho) - len(corr))])


def matched(fit_point: PointStatistics, eval_point: PointStatistics, reference: int,
            other: int) -> np.ndarray:
    """Correlations ``[min(n_ref, n_other)]`` on ``eval_point``'s statistics of the unit pairs
    that the Hungarian match on ``fit_point``'s correlations pairs (reference unit order; models
    of different widths: each unit of the narrower model once)."""
    rows, cols = linear_sum_assignment(fit_point.corr(reference, other), maximize=True)
    return eval_point.corr(reference, other)[rows, cols]


def noise_level(samples: int, p: int, q: int) -> float:
    """The largest canonical correlation that ``p`` and ``q`` unrelated (independent) features
    reach by chance on ``samples`` samples: the upper edge of Wachter's law,
    ``sqrt(c1 (1 - c2)) + sqrt(c2 (1 - c1))`` squared, with ``c1 = p / S`` and ``c2 = q / S``
    (square-rooted; 1 when ``p + q >= S``, where CCA can fit anything)."""
    c1, c2 = p / max(samples, 1), q / max(samples, 1)
    if c1 + c2 >= 1:
        return 1.0
    return float(np.sqrt(c1 * (1 - c2)) + np.sqrt(c2 * (1 - c1)))


def _desc(values: np.ndarray) -> list[float]:
    return np.sort(np.asarray(values, float))[::-1].tolist()


def _mean(values) -> float | None:
    return None if values is None else float(np.mean(values))


def spectrum_row(fit_point: PointStatistics, eval_point: PointStatistics | None, reference: int,
                 other: int, *, gamma: float | None = None,
                 relative: bool | None = None) -> dict:
    """One merge point and model pair, JSON-able. Arrays ``[n]``: ``shrunk`` (singular values
    at gamma), ``reached_fit`` / ``reached_heldout`` (what those pairs reach on the fitting /
    held-out statistics, canonical order), ``exact_fit`` / ``exact_heldout`` (the same for
    nearly unregularised CCA), ``matched_fit`` / ``matched_heldout`` (matched unit pairs,
    sorted descending); ``mean_<array>`` for each; held-out entries are None without
    ``eval_point``. Also ``noise_level``, sizes, ridge, condition numbers and dead units."""
    fit = solve_pair(fit_point, reference, other, gamma=gamma, relative=relative)
    exact = solve_near_exact(fit_point, reference, other)
    arrays = {"shrunk": fit.rho, "reached_fit": reached(fit, fit_point, reference, other),
              "exact_fit": reached(exact, fit_point, reference, other),
              "matched_fit": _desc(matched(fit_point, fit_point, reference, other)),
              "reached_heldout": None, "exact_heldout": None, "matched_heldout": None}
    if eval_point is not None:
        arrays |= {"reached_heldout": reached(fit, eval_point, reference, other),
                   "exact_heldout": reached(exact, eval_point, reference, other),
                   "matched_heldout": _desc(matched(fit_point, eval_point, reference, other))}
    widths = fit_point.widths[reference], fit_point.widths[other]
    row = {"name": fit_point.name, "model": other, "width": widths[0],
           "samples": fit_point.count, "samples_per_feature": fit_point.count / max(widths),
           "heldout_samples": None if eval_point is None else eval_point.count,
           "noise_level": noise_level(fit_point.count, len(fit.live_x), len(fit.live_y)),
           "gamma_x": fit.gamma_x, "gamma_y": fit.gamma_y,
           "cond_xx": fit.cond_xx, "cond_yy": fit.cond_yy,
           "dead_reference": len(fit_point.dead_units(reference)),
           "dead_model": len(fit_point.dead_units(other))}
    for key, values in arrays.items():
        row[key] = None if values is None else np.asarray(values, float).tolist()
        row[f"mean_{key}"] = _mean(values)
    return row


def spectrum_rows(fit_stats: Statistics, eval_stats: Statistics | None, *,
                  gamma: float | None = None, relative: bool | None = None) -> list[dict]:
    """:func:`spectrum_row` for every merge point (depth order) and non-reference model."""
    ref = fit_stats.reference
    others = [i for i in range(fit_stats.num_models) if i != ref]
    return [spectrum_row(point, None if eval_stats is None else eval_stats[name], ref, i,
                         gamma=gamma, relative=relative)
            for name, point in fit_stats.points.items() for i in others]
