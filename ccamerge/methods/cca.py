"""CCA Merge: the CCA solve for one merge point (covariances in, canonical correlations and the
map T out), the one per-pair entry point every analysis uses (:func:`solve_pair`) and the method.

Reference X = model 0 features, Y = model i features (rows are samples, width n)::

    S_xx = C_xx + g_x I,  S_yy = C_yy + g_y I,  S_xy = C_xy
    M = S_xx^-1/2 S_xy S_yy^-1/2 = U diag(rho) V^T
    T = S_yy^-1/2 V U^T S_xx^1/2        (a feature row y goes to y @ T in X's basis)
    T_inv = S_xx^-1/2 U V^T S_yy^1/2

Units with zero variance ("dead") carry no information and make the problem degenerate, so they
are paired dead-to-dead by identity outside the SVD and CCA is solved on the live units.

Different widths (X has ``n`` units, Y has ``m``): ``M`` is ``[n, m]`` with ``k = min(n, m)``
canonical pairs, and the thin ``U_k`` ``[n, k]``, ``V_k`` ``[m, k]`` give the rectangular maps
``T = S_yy^-1/2 V_k U_k^T S_xx^1/2`` ``[m, n]`` and ``T_inv = S_xx^-1/2 U_k V_k^T S_yy^1/2``
``[n, m]`` (``T_inv T = I_n`` when ``n <= m`` and the correlations are 1). The relative ridge is
then ``gamma * tr(C) / k`` on both sides (the variance per canonical direction; with equal
widths ``k = n`` and it is the mean unit variance as before). This makes the maps exact for a
model whose units are duplicated: if ``y = [x, x]`` (``m = 2n``), in the coordinates
``s = (y_1 + y_2) / sqrt 2 = sqrt 2 x`` and ``d = 0`` the blocks are ``S_ss = 2 C + g_y I``,
``S_dd = g_y I``, ``C_xs = sqrt 2 C``, and ``g_y = 2 g_x`` (the trace doubles, ``k = n``) makes
``S_ss = 2 S_xx``: ``M`` is symmetric, ``U = V`` in C's eigenbasis, and ``T = [I; I] / 2``,
``T_inv = [I, I]`` for any ``gamma``. Merged into the narrow model, the wide one's producers
``T^T [W; W] = W`` and consumers ``[W'/2, W'/2] T_inv^T = W'`` are the narrow model's weights;
merged into the wide model, the narrow one becomes ``[W; W]`` and ``[W'/2, W'/2]``: the function
is kept either way (a per-unit ridge, ``tr(C) / m``, would shrink the duplicated side's
directions and miss by ``sqrt(2 (c + g) / (2 c + g))`` per eigenvalue ``c``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ccamerge import linalg
from ccamerge.errors import CcamergeError
from ccamerge.methods.base import AlignContext, Alignment, Method, Option, per_model
from ccamerge.methods.narrow import narrow_point
from ccamerge.stats import PointStatistics
from ccamerge.transform import Transform

EIG_FLOOR = 1e-12
MAX_GAMMA = 1e6  # beyond this the ridge swamps every covariance (relative or absolute units)
NEAR_EXACT_GAMMA = 1e-4  # relative ridge of "nearly unregularised" CCA (spectra, diagnosis)


def psd_eigh(s: np.ndarray, floor: float = EIG_FLOOR) -> tuple[np.ndarray, np.ndarray]:
    """``(eigenvalues [n] ascending, eigenvectors [n, n])`` of a symmetric PSD matrix ``[n, n]``:
    symmetrised, float64 ``eigh`` (:func:`ccamerge.linalg.eigh`: on the host or the solve's GPU),
    eigenvalues clamped at ``floor * max(eig)`` (an SVD of a slightly indefinite matrix gives
    wrong roots)."""
    eig, q = linalg.eigh(0.5 * (s + s.T))
    top = max(float(eig[-1]), 1e-300) if len(eig) else 1.0
    return np.clip(eig, floor * top, None), q


def sym_powers(s: np.ndarray, powers: tuple[float, ...],
               floor: float = EIG_FLOOR) -> list[np.ndarray]:
    """``[S^p for p in powers]`` of a symmetric PSD matrix ``[n, n]`` (see :func:`psd_eigh`)."""
    eig, q = psd_eigh(s, floor)
    return [(q * eig**p) @ q.T for p in powers]


def condition_number(s: np.ndarray) -> float:
    eig = np.linalg.eigvalsh(0.5 * (s + s.T))
    return float(np.inf) if eig[0] <= 0 else float(eig[-1] / eig[0])


def _condition(eig: np.ndarray) -> float:
    """Condition number from the ascending eigenvalues ``[n]`` of a regularised block."""
    if not len(eig):
        return 1.0
    return float(np.inf) if eig[0] <= 0 else float(eig[-1] / eig[0])


@dataclass(frozen=True)
class Eigen:
    """Eigendecomposition ``S = Q diag(values) Q^T`` of a regularised covariance block."""

    values: np.ndarray   # [n] ascending, clamped > 0
    vectors: np.ndarray  # [n, n] orthonormal columns

    def power(self, p: float) -> np.ndarray:
        """``S^p`` ``[n, n]``."""
        return (self.vectors * self.values**p) @ self.vectors.T


@dataclass(frozen=True)
class CCAResult:
    """Fitted quantities; ``rho`` ``[n]`` descending (dead pairs last, as 0). The merge needs only
    ``T``, ``T_inv``, ``rho`` and the health numbers; the canonical directions ``U``, ``V`` (in the
    units' basis, sign-fixed), the whitening maps and ``m`` are computed when first read."""

    rho: np.ndarray
    T: np.ndarray
    T_inv: np.ndarray
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
    eigen_x: Eigen = field(repr=False)
    eigen_y: Eigen = field(repr=False)
    u_eig: np.ndarray = field(repr=False)  # [live_x, k] U in S_xx's eigenbasis: U = Q_x u_eig
    v_eig: np.ndarray = field(repr=False)  # [live_y, k] V = Q_y v_eig (k = min(live_x, live_y))
    m_eig: np.ndarray = field(repr=False)  # [live_x, live_y] m in the eigenbases: Q_x^T m Q_y

    @cached_property
    def _directions(self) -> tuple[np.ndarray, np.ndarray]:
        u = self.eigen_x.vectors @ self.u_eig
        return _fix_signs(u, self.eigen_y.vectors @ self.v_eig)

    @property
    def U(self) -> np.ndarray:  # noqa: N802 - [live_x, k] canonical directions of X (whitened)
        return self._directions[0]

    @property
    def V(self) -> np.ndarray:  # noqa: N802 - [live_y, k] canonical directions of Y (whitened)
        return self._directions[1]

    @cached_property
    def w_x(self) -> np.ndarray:
        """``S_xx^-1/2`` ``[live, live]``: the whitening map of X."""
        return self.eigen_x.power(-0.5)

    @cached_property
    def w_y(self) -> np.ndarray:
        return self.eigen_y.power(-0.5)

    @cached_property
    def m(self) -> np.ndarray:
        """``[live_x, live_y]`` whitened cross-covariance ``S_xx^-1/2 C_xy S_yy^-1/2``
        (``= U diag(rho) V^T``)."""
        return self.eigen_x.vectors @ self.m_eig @ self.eigen_y.vectors.T


def regulariser(c: np.ndarray, gamma: float, relative: bool, units: int | None = None) -> float:
    """Absolute ridge for covariance ``c`` ``[n, n]``: ``gamma`` or ``gamma * tr(c) / units``
    (default ``units = n``; between models of different widths, the number of canonical
    directions, see the module docstring)."""
    if gamma < 0:
        raise CcamergeError(f"gamma must be >= 0, got {gamma}")
    return gamma * float(np.trace(c)) / max(units or len(c), 1) if relative else gamma


def ridge_units(widths: list[int], live: list[int]) -> int | None:
    """The ``units`` of the relative ridge: None (each block's own) when the models' ``widths``
    are equal, else the fewest ``live`` units of any model (the shared directions)."""
    return None if len(set(widths)) == 1 else min(live)


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


def _align_null_space(u: np.ndarray, rho: np.ndarray, v: np.ndarray, qx: np.ndarray,
                      qy: np.ndarray, tol: float = 1e-9) -> np.ndarray:
    """For canonical pairs with rho ~ 0 (rank-deficient but live features) the SVD may rotate U's
    columns arbitrarily against V's; replace them by the rotation of that block closest to V's,
    so that U V^T there is the projector when the two sides span the same space (a model merged
    with itself gets T = I). ``u`` ``[live_x, k]``, ``v`` ``[live_y, k]`` are in the eigenbases
    ``qx``, ``qy`` (the directions in the units' basis are ``qx @ u``, ``qy @ v``)."""
    null = rho <= tol * max(float(rho[0]) if len(rho) else 0.0, 1e-30)
    if not null.any():
        return u
    ux, vy = _same_rows(qx @ u[:, null], qy @ v[:, null])
    u = u.copy()
    u[:, null] = u[:, null] @ linalg.polar(ux.T @ vy)
    return u


def _same_rows(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``a`` ``[p, k]`` and ``b`` ``[q, k]`` with zero rows appended to the shorter, so units
    compare position by position between models of different widths."""
    rows = max(len(a), len(b))
    return tuple(np.vstack([x, np.zeros((rows - len(x), x.shape[1]))]) for x in (a, b))


def _fix_signs(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Make the largest-magnitude entry of each column of U positive (flipping V alike); T is
    unchanged, plots are reproducible."""
    signs = np.sign(u[np.abs(u).argmax(0), np.arange(u.shape[1])])
    signs[signs == 0] = 1.0
    return u * signs, v * signs


def _eigen(block: np.ndarray, cache: dict | None, key) -> Eigen:
    """:class:`Eigen` of ``block``, reused from ``cache[key]`` when there (the reference's block
    recurs for every other model)."""
    if cache is None:
        return Eigen(*psd_eigh(block))
    if key not in cache:
        cache[key] = Eigen(*psd_eigh(block))
    return cache[key]


def cca(c_xx: np.ndarray, c_yy: np.ndarray, c_xy: np.ndarray, *, gamma: float = 0.0,
        relative: bool = False, dead_tol: float = 1e-9, cache: dict | None = None) -> CCAResult:
    """Regularised CCA between covariances ``c_xx`` ``[n, n]``, ``c_yy`` ``[m, m]`` and
    cross-covariance ``c_xy`` ``[n, m]``. Returns T ``[m, n]`` mapping Y's features into X's
    basis (``m != n``: models of different widths, see the module docstring).

    Solved in the eigenbases ``S = Q diag(l) Q^T`` of the regularised blocks (one ``eigh`` each,
    which also gives the condition numbers): the SVD of ``l_x^-1/2 Q_x^T C_xy Q_y l_y^-1/2 =
    u s v^T`` gives ``T = Q_y l_y^-1/2 v u^T l_x^1/2 Q_x^T`` and ``T_inv = Q_x l_x^-1/2 u v^T
    l_y^1/2 Q_y^T``, the same maps as through the matrix roots with five products instead of
    twelve. ``cache``: a dict shared by calls with the same ``c_xx`` (one reference, several
    models), so its eigendecomposition is computed once."""
    n, n_y = len(c_xx), len(c_yy)
    if not (np.isfinite(c_xx).all() and np.isfinite(c_yy).all() and np.isfinite(c_xy).all()):
        raise CcamergeError("covariances contain NaN/inf; the activations were not finite")
    live_x, live_y, px, py, dead_x, dead_y = _live_split(c_xx, c_yy, dead_tol)
    sxx = c_xx[np.ix_(live_x, live_x)]
    syy = c_yy[np.ix_(live_y, live_y)]
    units = ridge_units([n, n_y], [len(live_x), len(live_y)])
    gx, gy = regulariser(sxx, gamma, relative, units), regulariser(syy, gamma, relative, units)
    sxx, syy = sxx + gx * np.eye(len(live_x)), syy + gy * np.eye(len(live_y))
    ex = _eigen(sxx, cache, (live_x.tobytes(), gx))
    ey = Eigen(*psd_eigh(syy))
    rx, ry = np.sqrt(ex.values), np.sqrt(ey.values)
    m = (ex.vectors.T @ c_xy[np.ix_(live_x, live_y)] @ ey.vectors) / rx[:, None] / ry[None, :]
    u, rho, v = linalg.svd(m)
    u, v = u[:, :len(rho)], v[:, :len(rho)]  # [live_x, k], [live_y, k]: the canonical pairs
    u = _align_null_space(u, rho, v, ex.vectors, ey.vectors)
    vu = v @ u.T  # [live_y, live_x]
    T = np.zeros((n_y, n))
    T_inv = np.zeros((n, n_y))
    T[np.ix_(live_y, live_x)] = (ey.vectors / ry) @ vu @ (rx[:, None] * ex.vectors.T)
    T_inv[np.ix_(live_x, live_y)] = (ex.vectors / rx) @ vu.T @ (ry[:, None] * ey.vectors.T)
    T[py, px] = 1.0
    T_inv[px, py] = 1.0
    rho_full = np.concatenate([np.clip(rho, 0.0, 1.0), np.zeros(n - len(rho))])
    return CCAResult(rho_full, T, T_inv, gx, gy, live_x, live_y, dead_x, dead_y,
                     _condition(ex.values), _condition(ey.values), sxx, syy, ex, ey, u, v, m)


def solve_pair(point: PointStatistics, reference: int, other: int, *, gamma: float | None = None,
               relative: bool | None = None, cache: dict | None = None) -> CCAResult:
    """CCA between models ``reference`` (X) and ``other`` (Y) at one merge point, from its
    collected statistics; ``gamma`` and ``relative`` default to the method's registry defaults.
    Every quantity that shows CCA (merging, spectra, feature matching, teaching, diagnosis)
    comes from here. ``cache``: see :func:`cca` (one dict per point and reference)."""
    options = METHOD.resolve({k: v for k, v in (("gamma", gamma), ("relative", relative))
                              if v is not None})
    return cca(point.cov(reference, reference), point.cov(other, other),
               point.cov(reference, other), cache=cache, **options)


def solve_near_exact(point: PointStatistics, reference: int, other: int) -> CCAResult:
    """:func:`solve_pair` at :data:`NEAR_EXACT_GAMMA` (relative): the canonical correlations the
    data supports, with a ridge only large enough to keep the solve well posed."""
    return solve_pair(point, reference, other, gamma=NEAR_EXACT_GAMMA, relative=True)


def align_cca(ctx: AlignContext, *, gamma: float, relative: bool) -> Alignment:
    """CCA Merge: T from the regularised CCA of reference and model i features (the
    reference's eigendecomposition at each point is computed once for all models); narrowed
    to ``ctx.widths`` where that is below the reference's (:mod:`ccamerge.methods.narrow`)."""
    caches: dict[str, dict] = {}
    loadings: dict[str, list[np.ndarray]] = {}

    def solve(name, i):
        fit = solve_pair(ctx.stats[name], ctx.reference, i, gamma=gamma, relative=relative,
                         cache=caches.setdefault(name, {}))
        width = ctx.narrowed(name, len(fit.T_inv))
        if width is not None:
            loadings.setdefault(name, []).append(reference_loadings(fit)[:width])
        return Transform(fit.T, fit.T_inv), {
            "rho": fit.rho, "cond_xx": fit.cond_xx, "cond_yy": fit.cond_yy,
            "dead_x": len(fit.dead_x), "dead_y": len(fit.dead_y)}
    result = per_model(ctx, solve)
    for name, rows in loadings.items():
        narrow_point(result, name, ctx.stats[name], ctx.reference, np.vstack(rows),
                     ctx.narrowed(name, len(rows[0][0])))
    return result


def reference_loadings(fit: CCAResult) -> np.ndarray:
    """``[k, n]`` the reference units' loadings on the canonical variates, best first: ``U^T
    S_xx^1/2`` (``x ~ c L`` for the unit-variance variates ``c = x S_xx^-1/2 U``), zero
    columns for the dead units paired outside the solve."""
    n = len(fit.T_inv)
    live = fit.live_x
    out = np.zeros((fit.U.shape[1], n))
    out[:, live] = fit.U.T @ fit.eigen_x.power(0.5)
    return out


METHOD = Method("cca", "CCA Merge: linear maps from canonical correlation analysis.", align_cca,
                "reference",
                {"gamma": Option(0.1, float, "ridge added to the covariances", 0.0,
                                 maximum=MAX_GAMMA),
                 "relative": Option(True, bool, "gamma in units of each layer's mean variance "
                                    "(tr(S)/n); false = absolute, as in the paper's code",
                                    negative_flag="absolute")}, mixed_widths=True,
                target_width=True)
