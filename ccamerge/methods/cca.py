"""CCA Merge: the CCA solve for one merge point (covariances in, canonical correlations and the
map T out), the one per-pair entry point every analysis uses (:func:`solve_pair`) and the method.

Reference X = model 0 features, Y = model i features (rows are samples, width n)::

    S_xx = C_xx + g_x I,  S_yy = C_yy + g_y I,  S_xy = C_xy
    M = S_xx^-1/2 S_xy S_yy^-1/2 = U diag(rho) V^T
    T = S_yy^-1/2 V U^T S_xx^1/2        (a feature row y goes to y @ T in X's basis)
    T_inv = S_xx^-1/2 U V^T S_yy^1/2

Units with zero variance ("dead") carry no information and make the problem degenerate, so they
are paired dead-to-dead by identity outside the SVD and CCA is solved on the live units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ccamerge.errors import CcamergeError
from ccamerge.methods.base import AlignContext, Alignment, Method, Option, per_model
from ccamerge.stats import PointStatistics
from ccamerge.transform import Transform

EIG_FLOOR = 1e-12
MAX_GAMMA = 1e6  # beyond this the ridge swamps every covariance (relative or absolute units)
NEAR_EXACT_GAMMA = 1e-4  # relative ridge of "nearly unregularised" CCA (spectra, diagnosis)


def sym_powers(s: np.ndarray, powers: tuple[float, ...], floor: float = EIG_FLOOR) -> list[np.ndarray]:
    """``[S^p for p in powers]`` of a symmetric PSD matrix ``[n, n]``: symmetrise, float64
    ``eigh``, clamp eigenvalues at ``floor * max(eig)`` (an SVD of a slightly indefinite matrix
    gives wrong roots)."""
    s = 0.5 * (s + s.T).astype(np.float64)
    eig, q = np.linalg.eigh(s)
    eig = np.clip(eig, floor * max(float(eig.max()), 1e-300), None)
    return [(q * eig**p) @ q.T for p in powers]


def condition_number(s: np.ndarray) -> float:
    eig = np.linalg.eigvalsh(0.5 * (s + s.T))
    return float(np.inf) if eig[0] <= 0 else float(eig[-1] / eig[0])


@dataclass(frozen=True)
class CCAResult:
    """Fitted quantities; ``rho`` ``[n]`` descending (dead pairs last, as 0)."""

    rho: np.ndarray
    T: np.ndarray
    T_inv: np.ndarray
    U: np.ndarray          # [live, live] canonical directions of X (whitened), sign-fixed
    V: np.ndarray          # [live, live] canonical directions of Y (whitened)
    gamma_x: float         # absolute regularisation actually added
    gamma_y: float
    live_x: np.ndarray     # indices of live units
    live_y: np.ndarray
    dead_x: np.ndarray
    dead_y: np.ndarray
    cond_xx: float         # condition numbers of the regularised live blocks
    cond_yy: float
    s_xx: np.ndarray       # [live, live] regularised covariances of the live units
    s_yy: np.ndarray
    w_x: np.ndarray        # S_xx^-1/2, S_yy^-1/2: the whitening maps
    w_y: np.ndarray
    m: np.ndarray          # [live_x, live_y] whitened cross-covariance = U diag(rho) V^T


def regulariser(c: np.ndarray, gamma: float, relative: bool) -> float:
    """Absolute ridge for covariance ``c`` ``[n, n]``: ``gamma`` or ``gamma * tr(c) / n``."""
    if gamma < 0:
        raise CcamergeError(f"gamma must be >= 0, got {gamma}")
    return gamma * float(np.trace(c)) / max(len(c), 1) if relative else gamma


def _dead(c: np.ndarray, rel_tol: float) -> np.ndarray:
    var = np.diag(c)
    return var <= rel_tol * max(float(var.max()), 1e-30)


def _live_split(c_xx, c_yy, rel_tol):
    """Live units of each side; the k = min(#dead) dead pairs are matched by identity, any extra
    dead units stay in the solve (the ridge keeps it well posed)."""
    dead_x, dead_y = np.flatnonzero(_dead(c_xx, rel_tol)), np.flatnonzero(_dead(c_yy, rel_tol))
    k = min(len(dead_x), len(dead_y))
    paired_x, paired_y = dead_x[len(dead_x) - k:], dead_y[len(dead_y) - k:]
    live_x = np.setdiff1d(np.arange(len(c_xx)), paired_x)
    live_y = np.setdiff1d(np.arange(len(c_yy)), paired_y)
    return live_x, live_y, paired_x, paired_y, dead_x, dead_y


def _align_null_space(u: np.ndarray, rho: np.ndarray, v: np.ndarray, tol: float = 1e-9) -> np.ndarray:
    """For canonical pairs with rho ~ 0 (rank-deficient but live features) the SVD may rotate U's
    columns arbitrarily against V's; replace them by the rotation of that block closest to V's,
    so that U V^T there is the projector when the two sides span the same space (a model merged
    with itself gets T = I)."""
    null = rho <= tol * max(float(rho[0]) if len(rho) else 0.0, 1e-30)
    if not null.any():
        return u
    a, _, bt = np.linalg.svd(u[:, null].T @ v[:, null])
    u = u.copy()
    u[:, null] = u[:, null] @ (a @ bt)
    return u


def _fix_signs(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Make the largest-magnitude entry of each column of U positive (flipping V alike); T is
    unchanged, plots are reproducible."""
    signs = np.sign(u[np.abs(u).argmax(0), np.arange(u.shape[1])])
    signs[signs == 0] = 1.0
    return u * signs, v * signs


def cca(c_xx: np.ndarray, c_yy: np.ndarray, c_xy: np.ndarray, *, gamma: float = 0.0,
        relative: bool = False, dead_tol: float = 1e-9) -> CCAResult:
    """Regularised CCA between covariances ``c_xx`` ``[n, n]``, ``c_yy`` ``[n, n]`` and
    cross-covariance ``c_xy`` ``[n, n]``. Returns T mapping Y's features into X's basis."""
    n = len(c_xx)
    if not (np.isfinite(c_xx).all() and np.isfinite(c_yy).all() and np.isfinite(c_xy).all()):
        raise CcamergeError("covariances contain NaN/inf; the activations were not finite")
    live_x, live_y, px, py, dead_x, dead_y = _live_split(c_xx, c_yy, dead_tol)
    sxx = c_xx[np.ix_(live_x, live_x)]
    syy = c_yy[np.ix_(live_y, live_y)]
    gx, gy = regulariser(sxx, gamma, relative), regulariser(syy, gamma, relative)
    sxx, syy = sxx + gx * np.eye(len(live_x)), syy + gy * np.eye(len(live_y))
    sxx_h, sxx_ih = sym_powers(sxx, (0.5, -0.5))
    syy_h, syy_ih = sym_powers(syy, (0.5, -0.5))
    m = sxx_ih @ c_xy[np.ix_(live_x, live_y)] @ syy_ih
    u, rho, vt = np.linalg.svd(m)
    u, v = _fix_signs(_align_null_space(u, rho, vt.T), vt.T)
    T = np.zeros((n, n))
    T_inv = np.zeros((n, n))
    T[np.ix_(live_y, live_x)] = syy_ih @ v @ u.T @ sxx_h
    T_inv[np.ix_(live_x, live_y)] = sxx_ih @ u @ v.T @ syy_h
    T[py, px] = 1.0
    T_inv[px, py] = 1.0
    rho_full = np.concatenate([np.clip(rho, 0.0, 1.0), np.zeros(n - len(rho))])
    return CCAResult(rho_full, T, T_inv, u, v, gx, gy, live_x, live_y, dead_x, dead_y,
                     condition_number(sxx), condition_number(syy), sxx, syy, sxx_ih, syy_ih, m)


def solve_pair(point: PointStatistics, reference: int, other: int, *, gamma: float | None = None,
               relative: bool | None = None) -> CCAResult:
    """CCA between models ``reference`` (X) and ``other`` (Y) at one merge point, from its
    collected statistics; ``gamma`` and ``relative`` default to the method's registry defaults.
    Every quantity that shows CCA (merging, spectra, feature matching, teaching, diagnosis)
    comes from here."""
    options = METHOD.resolve({k: v for k, v in (("gamma", gamma), ("relative", relative))
                              if v is not None})
    return cca(point.cov(reference, reference), point.cov(other, other),
               point.cov(reference, other), **options)


def solve_near_exact(point: PointStatistics, reference: int, other: int) -> CCAResult:
    """:func:`solve_pair` at :data:`NEAR_EXACT_GAMMA` (relative): the canonical correlations the
    data supports, with a ridge only large enough to keep the solve well posed."""
    return solve_pair(point, reference, other, gamma=NEAR_EXACT_GAMMA, relative=True)


def align_cca(ctx: AlignContext, *, gamma: float, relative: bool) -> Alignment:
    """CCA Merge: T from the regularised CCA of reference and model i features."""
    def solve(name, i):
        fit = solve_pair(ctx.stats[name], ctx.reference, i, gamma=gamma, relative=relative)
        return Transform(fit.T, fit.T_inv), {
            "rho": fit.rho, "cond_xx": fit.cond_xx, "cond_yy": fit.cond_yy,
            "dead_x": len(fit.dead_x), "dead_y": len(fit.dead_y)}
    return per_model(ctx, solve)


METHOD = Method("cca", "CCA Merge: linear maps from canonical correlation analysis.", align_cca,
                "reference",
                {"gamma": Option(0.1, float, "ridge added to the covariances", 0.0,
                                 maximum=MAX_GAMMA),
                 "relative": Option(True, bool, "gamma in units of each layer's mean variance "
                                    "(tr(S)/n); false = absolute, as in the paper's code",
                                    negative_flag="absolute")})
