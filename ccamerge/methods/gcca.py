"""Generalized CCA Merge (``gcca``): one shared space for all N models at once (MAXVAR).

CCA Merge solves N - 1 separate two-set problems, each between the reference and one model. Here
one multi-set problem is solved for every merge point, symmetric in the N models. Model i has
features ``x_i`` (rows are samples, width ``n_i``), covariances ``C_ij = cov(x_i, x_j)``::

    S_i = C_ii + g_i I                         (ridge g_i: ``gamma``, absolute or relative, as cca;
                                                between different widths tr(C_ii) / min_j n_j)
    A   = [C_ij] with S_i on the diagonal      (block covariance, [sum n_i, sum n_i])
    D   = diag(S_1, ..., S_N)                  (block diagonal)
    A w = lambda D w,  top k eigenpairs        (MAXVAR; w = [W_1; ...; W_N], W_i [n_i, k])

Whitening each block turns this into one symmetric eigenproblem: with ``S_i = Q_i L_i Q_i^T``,
``B = D^-1/2 A D^-1/2`` has identity diagonal blocks and ``B_ij = L_i^-1/2 Q_i^T C_ij Q_j
L_j^-1/2``; ``B V = V diag(lambda)``, ``V = [V_1; ...; V_N]`` orthonormal, ``W_i = Q_i L_i^-1/2
V_i``. Column k of every ``x_i W_i`` is model i's coordinate along shared direction k; these are
the directions in which all models' features correlate best at once: ``lambda_k = 1 + (N - 1)
rho_k`` with ``rho_k`` the mean correlation of the N variates (for N = 2, rho are exactly CCA's
canonical correlations and ``W_1, W_2 = A, B / sqrt 2`` its canonical directions).

Each model then gets k orthonormal whitened directions: ``O_i = polar(V_i diag(lambda)^1/2)``
``[r_i, k]`` (``V_i diag(lambda)^1/2`` is model i's covariance with the k unit-variance consensus
variates), ``W_i = Q_i L_i^-1/2 O_i``, so ``W_i^T S_i W_i = I``: every model spans the whole
shared space (the raw blocks ``V_i`` need not: for N >= 3 a direction shared by some models only
has a near-zero block in the others, and inverting it blows the merge up). The shared space's
coordinates have no ReLU meaning, so the merged model's units are the reference's; the unmerge
map of a model is ``G_i = W_i^T S_i`` ``[k, n_i]`` (its S-weighted least-squares left inverse)::

    T_i     = W_i G_ref     [n_i, n_ref]   (merge: a feature row x_i goes to x_i T_i)
    T_inv_i = W_ref G_i     [n_ref, n_i]   (unmerge),      T_ref = I

A rotation of the shared space within degenerate eigenvalues (``V -> V R``) leaves every ``T_i``
unchanged, and for N = 2 (``V_1, V_2 = U, V / sqrt 2``, ``O_1, O_2 = U, V``) the transforms are
CCA Merge's ``T = S_yy^-1/2 V U^T S_xx^1/2`` exactly. The shared space itself
does not depend on the reference: the transforms to reference s are those to reference r
followed by ``T_s^-1`` (``T_i^(s) = T_i^(r) (T_s^(r))^-1`` when k is full), so the merged
weights for different references differ only by a change of basis; the reference only decides
the coordinates in which the merged ReLUs (and BatchNorm vectors) act. A family of permuted twins
``x_i = x P_i`` gives ``T_i = P_i^T P_ref``: the exact permutation.

Units with zero variance (dead) are left out of the solve and paired dead-to-dead with the
reference's by identity (as cca does); so are live directions of zero variance (a rank-deficient
block): they are matched to the reference's by the orthogonal Procrustes map between the two
null spaces, so that copies of one model merge to it. ``shared_width``: how many shared directions k
to keep (0: all, up to the narrowest model's live rank); with fewer, every other model reaches
the reference's basis through a rank-k map (the reference keeps its own units).

``consensus_units``: merge into units that no model owns instead of the reference's
(:mod:`ccamerge.methods.consensus_units`). Every model's units are written in shared
coordinates, ``G_i = W_i^T S_i``; they are matched to a common order there (alternating
Hungarian matching and averaging, ``min sum_i ||G_i P_i - G*||^2``), and the merged model's
units ``L*`` average the matched models' units: their orthogonal frames (polar factors) on the
orthogonal group and their covariances (a plain mean of the loadings cancels and is
ill-conditioned). ``T_i = W_i L*`` and ``T_inv_i = L*^-1 G_i`` for every model, the reference
included (directions outside the shared space are averaged after a Procrustes rotation of each
model's). ``T_i T_inv_j = W_i G_j`` is still gcca's map from model i to model j: only the basis
of the average moves, from the reference's units to the consensus units, so the result depends
on the set of models and not on the reference or their order. For N = 2 the merged units sit
midway between the matched units of the two models (not CCA Merge, though ``T_1 T_inv_0`` is
CCA Merge's T). The models themselves are transformed, so an interpolation's endpoints under
this option are the models in the consensus basis, not the models (the basis change is dense).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ccamerge import linalg
from ccamerge.errors import CcamergeError
from ccamerge.methods import consensus_units as consensus
from ccamerge.methods.base import AlignContext, Alignment, Method, Option, identity_transforms
from ccamerge.methods.cca import (
    MAX_GAMMA,
    _condition,
    _dead,
    _same_rows,
    psd_eigh,
    regulariser,
    ridge_units,
)
from ccamerge.methods.narrow import full_loadings, narrow_point
from ccamerge.stats import PointStatistics
from ccamerge.transform import Transform

NULL_TOL = 1e-9  # a live direction with variance below this fraction of the largest is null


@dataclass(frozen=True)
class ModelBasis:
    """One model's units at one merge point, split for the solve: ``live`` unit indices (in the
    solve) and ``paired`` dead units (matched by identity outside it); in the live units' space
    the eigenvectors ``vectors`` ``[live, live]`` of ``S_i``, the ``rank`` of nonzero variance
    first, then the null directions, with their eigenvalues ``values`` ``[live]`` (ridge
    included)."""

    width: int
    live: np.ndarray
    paired: np.ndarray
    dead: int
    vectors: np.ndarray
    values: np.ndarray
    rank: int
    gamma: float
    condition: float

    @property
    def whitener(self) -> np.ndarray:
        """``S_i^-1/2`` in the eigenbasis, ``Q L^-1/2`` ``[live, live]``."""
        return self.vectors / np.sqrt(self.values)

    @property
    def dewhitener(self) -> np.ndarray:
        """``L^1/2 Q^T`` ``[live, live]``, the inverse of :attr:`whitener`."""
        return (self.vectors * np.sqrt(self.values)).T


def model_basis(c_ii: np.ndarray, n_paired: int, *, gamma: float, relative: bool,
                dead_tol: float = 1e-9, null_tol: float = NULL_TOL,
                units: int | None = None) -> ModelBasis:
    """:class:`ModelBasis` of a covariance ``c_ii`` ``[n, n]`` regularised with ``gamma``; its
    last ``n_paired`` dead units are left out of the solve (cca's rule, for N models).
    ``units``: the relative ridge's divisor (see :func:`ccamerge.methods.cca.ridge_units`)."""
    width = len(c_ii)
    dead = np.flatnonzero(_dead(c_ii, dead_tol))
    paired = dead[len(dead) - n_paired:] if n_paired else dead[:0]
    live = np.setdiff1d(np.arange(width), paired)
    block = c_ii[np.ix_(live, live)]
    g = regulariser(block, gamma, relative, units)
    values, vectors = psd_eigh(block + g * np.eye(len(live)))
    raw = values - g
    keep = raw > null_tol * max(float(raw.max()) if len(raw) else 0.0, 1e-30)
    order = np.concatenate([np.flatnonzero(keep)[::-1], np.flatnonzero(~keep)])
    return ModelBasis(width, live, paired, len(dead), vectors[:, order], values[order],
                      int(keep.sum()), g, _condition(values))


def whitened_blocks(point: PointStatistics, bases: list[ModelBasis]) -> np.ndarray:
    """``B`` ``[R, R]`` (``R = sum r_i``): identity diagonal blocks, ``B_ij = L_i^-1/2 Q_i^T C_ij
    Q_j L_j^-1/2`` on the models' nonzero-variance directions."""
    factors = [b.whitener[:, :b.rank] for b in bases]  # [live_i, r_i]
    edges = np.concatenate([[0], np.cumsum([b.rank for b in bases])])
    out = np.eye(int(edges[-1]))
    for i, (bi, fi) in enumerate(zip(bases, factors, strict=True)):
        for j in range(i + 1, len(bases)):
            c = point.cov(i, j)[np.ix_(bi.live, bases[j].live)]
            block = fi.T @ c @ factors[j]
            out[edges[i]:edges[i + 1], edges[j]:edges[j + 1]] = block
            out[edges[j]:edges[j + 1], edges[i]:edges[i + 1]] = block.T
    return out


@dataclass(frozen=True)
class SharedSpace:
    """The MAXVAR solution of one merge point: ``eigenvalues`` ``[k]`` descending, the blocks
    ``V_i`` ``[r_i, k]`` of the orthonormal eigenvectors (in each model's whitened eigenbasis),
    the models' bases and whether all shared directions were kept (``full``)."""

    eigenvalues: np.ndarray
    blocks: list[np.ndarray]
    bases: list[ModelBasis]
    full: bool = True

    @property
    def rho(self) -> np.ndarray:
        """``[k]`` mean correlation of the N variates of each direction,
        ``(lambda - 1)/(N - 1)``."""
        return (self.eigenvalues - 1.0) / max(len(self.blocks) - 1, 1)

    def padded(self, i: int) -> np.ndarray:
        """``O_i = polar(V_i diag(lambda)^1/2)`` ``[live_i, k]`` (zero rows for model i's null
        directions): the orthonormal whitened directions of model i closest to its
        covariance with the consensus variates (``V_i diag(lambda)^1/2``)."""
        o = linalg.polar(self.blocks[i] * np.sqrt(self.eigenvalues))
        return np.vstack([o, np.zeros((len(self.bases[i].live) - len(o), o.shape[1]))])

    def projection(self, i: int) -> np.ndarray:
        """``W_i = Q_i L_i^-1/2 O_i`` ``[live_i, k]``: model i's live features to shared
        coordinates (``W_i^T S_i W_i = I``)."""
        return self.bases[i].whitener @ self.padded(i)

    def unmerge(self, i: int) -> np.ndarray:
        """``G_i = W_i^T S_i = O_i^T L_i^1/2 Q_i^T`` ``[k, live_i]``: shared coordinates back
        to model i's live units (the S-weighted least-squares left inverse of ``W_i``)."""
        return self.padded(i).T @ self.bases[i].dewhitener

    def complement(self, i: int) -> np.ndarray:
        """Orthonormal basis ``[live_i, live_i - k]`` of model i's whitened directions outside
        the shared space (its null directions and any it has beyond the narrowest model's)."""
        u, _, _ = np.linalg.svd(self.padded(i), full_matrices=True)
        return u[:, self.padded(i).shape[1]:]

    def gram_condition(self, i: int) -> float:
        """Condition number of ``V_i^T V_i`` ``[k, k]`` (how well model i spans the space)."""
        return float(np.linalg.cond(self.blocks[i].T @ self.blocks[i]))


def solve_shared(point: PointStatistics, num_models: int, *, gamma: float, relative: bool,
                 width: int = 0) -> SharedSpace:
    """MAXVAR generalized CCA of the ``num_models`` models at ``point`` (every covariance block
    collected), keeping ``width`` shared directions (0: all the narrowest model offers)."""
    if num_models < 2:
        raise CcamergeError(f"gcca needs at least 2 models, got {num_models}")
    blocks = [point.cov(i, j) for i in range(num_models) for j in range(i, num_models)]
    if not all(np.isfinite(c).all() for c in blocks):
        raise CcamergeError("covariances contain NaN/inf; the activations were not finite")
    n_paired = min(len(_dead_units(point.cov(i, i))) for i in range(num_models))
    widths = [len(point.cov(i, i)) for i in range(num_models)]
    units = ridge_units(widths, [w - n_paired for w in widths])
    bases = [model_basis(point.cov(i, i), n_paired, gamma=gamma, relative=relative, units=units)
             for i in range(num_models)]
    narrowest = min(b.width for b in bases)
    if width > narrowest:
        raise CcamergeError(f"gcca width {width} exceeds the narrowest model's width {narrowest} "
                            f"at merge point {point.name}; use 0 (all) or at most {narrowest}")
    rank = min(b.rank for b in bases)
    k = rank if width == 0 else min(width, rank)
    values, vectors = linalg.eigh(whitened_blocks(point, bases))  # [sum r_i, sum r_i]: the cost
    values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k]
    edges = np.concatenate([[0], np.cumsum([b.rank for b in bases])])
    split = [vectors[edges[i]:edges[i + 1]] for i in range(num_models)]
    return SharedSpace(values.copy(), split, bases, full=width == 0)


def _dead_units(c: np.ndarray, rel_tol: float = 1e-9) -> np.ndarray:
    return np.flatnonzero(_dead(c, rel_tol))


def _complement_map(space: SharedSpace, i: int, j: int) -> np.ndarray:
    """``[live_i, live_j]``: model i's directions outside the shared space onto model j's, by
    the orthogonal Procrustes map between them (cca's rule for its rho = 0 pairs: the units
    compared position by position), so that copies of a model merge to it."""
    a, b = space.bases[i], space.bases[j]
    ea, eb = space.complement(i), space.complement(j)
    if not ea.shape[1] or not eb.shape[1]:
        return np.zeros((len(a.live), len(b.live)))
    ua, ub = _same_rows(a.vectors @ ea, b.vectors @ eb)  # unit-space directions, by position
    return a.whitener @ ea @ linalg.polar(ua.T @ ub) @ eb.T @ b.dewhitener


def _pair_dead(out: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
    """Identity between the dead units left out of the solve, in order."""
    out[rows, cols] = 1.0


def transform_to(space: SharedSpace, i: int, reference: int) -> Transform:
    """Model i's merge map ``T_i = W_i G_ref`` ``[n_i, n_ref]`` and unmerge map ``T_inv_i =
    W_ref G_i`` ``[n_ref, n_i]``; with every shared direction kept, the directions outside the
    shared space and the dead units are matched to the reference's outside the solve."""
    bi, br = space.bases[i], space.bases[reference]
    if i == reference:
        return Transform.identity(bi.width)
    T = np.zeros((bi.width, br.width))
    T_inv = np.zeros((br.width, bi.width))
    T[np.ix_(bi.live, br.live)] = space.projection(i) @ space.unmerge(reference)
    T_inv[np.ix_(br.live, bi.live)] = space.projection(reference) @ space.unmerge(i)
    if space.full:
        T[np.ix_(bi.live, br.live)] += _complement_map(space, i, reference)
        T_inv[np.ix_(br.live, bi.live)] += _complement_map(space, reference, i)
    _pair_dead(T, bi.paired, br.paired)
    _pair_dead(T_inv, br.paired, bi.paired)
    return Transform(T, T_inv)


def _padded_rho(space: SharedSpace, width: int) -> np.ndarray:
    """``[width]`` the shared directions' mean correlations, descending, zeros after the k
    directions (as cca reports its dead pairs)."""
    rho = np.clip(space.rho, 0.0, 1.0)
    return np.concatenate([rho, np.zeros(max(width - len(rho), 0))])


def align_gcca(ctx: AlignContext, *, gamma: float, relative: bool, shared_width: int,
               consensus_units: bool) -> Alignment:
    """Generalized CCA Merge: one shared space per merge point for all models, every model
    mapped into the reference's unit basis through it, or into consensus units (see the module
    docstring)."""
    result = Alignment(identity_transforms(ctx))
    n_models = len(ctx.states)
    for point in ctx.spec.points:
        space = solve_shared(ctx.stats[point.name], n_models, gamma=gamma, relative=relative,
                             width=shared_width)
        units = consensus.consensus_units(space) if consensus_units else None
        ref = space.bases[ctx.reference]
        result.details[point.name] = {}
        for i in range(n_models):
            result.transforms[i][point.name] = (transform_to(space, i, ctx.reference)
                                                if units is None
                                                else consensus.consensus_transform(space, units, i))
            if i == ctx.reference:
                continue
            result.details[point.name][i] = {
                "rho": _padded_rho(space, ref.width), "eigenvalues": space.eigenvalues,
                "shared_width": len(space.eigenvalues), "cond_xx": ref.condition,
                "cond_yy": space.bases[i].condition, "cond_shared": space.gram_condition(i),
                "dead_x": ref.dead, "dead_y": space.bases[i].dead}
            if units is not None:
                result.details[point.name][i] |= {
                    "consensus_distance": float(units.distances[i]),
                    "reference_distance": float(units.distances[ctx.reference]),
                    "cond_consensus": consensus.condition(units)}
        _narrow(result, ctx, point.name, space, units)
    return result


def _narrow(result: Alignment, ctx: AlignContext, name: str, space: SharedSpace,
            units=None) -> None:
    """Narrow the point to ``ctx.widths`` (:mod:`ccamerge.methods.narrow`), the units picked
    from the merged units' loadings on the top shared directions: the reference's ``G_ref``
    ``[k, n_ref]``, or the consensus units' ``G*``."""
    ref = space.bases[ctx.reference]
    width = ctx.narrowed(name, ref.width)
    if width is None:
        return
    if units is None:
        loadings = full_loadings(space.unmerge(ctx.reference), ref.live, ref.width)
    else:
        home = space.bases[units.start]
        loadings = full_loadings(units.loadings[:len(space.eigenvalues)], home.live, home.width)
    narrow_point(result, name, ctx.stats[name], ctx.reference, loadings[:width], width)


METHOD = Method("gcca", "Generalized CCA Merge: one shared space for all models (MAXVAR), "
                "no pairwise reference solves.", align_gcca, "all",
                {"gamma": Option(0.1, float, "ridge added to the covariances", 0.0,
                                 maximum=MAX_GAMMA),
                 "relative": Option(True, bool, "gamma in units of each layer's mean variance "
                                    "(tr(S)/n); false = absolute", negative_flag="absolute"),
                 "shared_width": Option(0, int, "shared directions kept per merge point (0: all, "
                                        "up to the narrowest model's width)", 0),
                 "consensus_units": Option(False, bool, "merge into consensus units (every "
                                           "model's units matched and averaged in the shared "
                                           "space) instead of the reference's units; equal "
                                           "widths")},
                mixed_widths=True, target_width=True)
