"""The numbers behind the teaching walk-through, computed on live models.

* :func:`swap_demo`: permuting hidden units (through the alignment spec) leaves the network's
  outputs unchanged; averaging a model with its own permuted copy breaks it; matching the units
  first recovers the permutation and the model.
* :func:`cca_steps`: the CCA solve of ``method.md`` section 3, one quantity at a time, on the
  live units of one merge point, with the checks that each step did what it should.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ccamerge.api import align, resolve_spec, score_source, train_source
from ccamerge.errors import CcamergeError
from ccamerge.evaluate import evaluate_model
from ccamerge.methods.cca import solve_pair, sym_powers
from ccamerge.stats import PointStatistics
from ccamerge.transform import (
    Transform,
    apply_transforms,
    average_states,
    random_permutations,
    reset_batchnorm,
    with_state,
)


@torch.no_grad()
def _max_output_diff(a: nn.Module, b: nn.Module, source, batch_size: int = 1024) -> float:
    """``max |a(x) - b(x)|`` over every batch of ``source`` (both in eval mode)."""
    a.eval()
    b.eval()
    return max(float((a(xb) - b(xb)).abs().max()) for xb, _ in source.batches(batch_size))


def _perm_of(transform: Transform) -> np.ndarray:
    """``perm`` ``[n]`` of a permutation transform (``T[perm[j], j] = 1``)."""
    return np.argmax(transform.T, axis=0)


def swap_demo(model: nn.Module, data, *, seed: int = 0, show: int = 12) -> dict:
    """Permute every merge point of ``model`` at random and report, on the test images:
    ``max_abs_diff`` between the outputs (~1e-6: the same function), the accuracy of the model,
    of its swapped twin, of their plain average and of their average after matching the twin
    back (``permute``); ``recovered``: share of units whose swap the matching undid. ``point``,
    ``perm``: the first merge point and the first ``show`` entries of its permutation."""
    x, test = train_source(data), score_source(data)
    spec = resolve_spec([model], x)
    perms = random_permutations(spec, seed)
    twin = with_state(model, apply_transforms(model.state_dict(), spec, perms))
    diff = _max_output_diff(model, twin, test)
    plain = with_state(model, average_states([model.state_dict(), twin.state_dict()]))
    aligned = align([model, twin], data, "permute")
    back = aligned.alignment.transforms[1]
    matched = with_state(model, average_states([model.state_dict(),
                                                apply_transforms(twin.state_dict(), spec, back)]))
    for m in (plain, matched):
        reset_batchnorm(m, x)
    # twin unit j is unit perm[j] of the model, so matching undoes the swap when it finds perm^-1
    recovered = np.mean([np.mean(_perm_of(back[p.name]) == np.argsort(_perm_of(perms[p.name])))
                         for p in spec.points])
    first = spec.points[0].name
    score = lambda m: evaluate_model(m, test)["accuracy"]  # noqa: E731
    return {"point": first, "width": spec.points[0].width,
            "perm": _perm_of(perms[first])[:show].tolist(), "max_abs_diff": diff,
            "accuracy": {"original": score(model), "swapped": score(twin),
                         "average_unaligned": score(plain), "average_matched": score(matched)},
            "recovered": float(recovered)}


@dataclass(frozen=True)
class CCASteps:
    """Every intermediate of the CCA solve on the live units (``live_x``, ``live_y``) of one point.

    Covariances ``c_xx``, ``c_yy``, ``c_xy``; ridges ``gamma_x``, ``gamma_y`` (absolute);
    ``s_xx``, ``s_yy`` regularised; ``w_x = S_xx^-1/2``, ``w_y = S_yy^-1/2`` (whitening);
    ``m = w_x S_xy w_y = U diag(rho) V^T``; ``T = w_y V U^T S_xx^1/2``, ``T_inv``. Checks (max
    absolute error): ``whitening_error`` of ``w_x S_xx w_x = I``, ``svd_error`` of the
    factorisation, ``inverse_error`` of ``T T_inv = I``, ``library_error`` against
    :func:`ccamerge.methods.cca.cca`'s T. ``eig_x``, ``eig_y``: eigenvalues of ``s_xx``, ``s_yy``.
    """

    name: str
    live_x: np.ndarray
    live_y: np.ndarray
    c_xx: np.ndarray
    c_yy: np.ndarray
    c_xy: np.ndarray
    gamma_x: float
    gamma_y: float
    s_xx: np.ndarray
    s_yy: np.ndarray
    w_x: np.ndarray
    w_y: np.ndarray
    m: np.ndarray
    u: np.ndarray
    rho: np.ndarray
    v: np.ndarray
    T: np.ndarray
    T_inv: np.ndarray
    eig_x: np.ndarray
    eig_y: np.ndarray
    whitening_error: float
    svd_error: float
    inverse_error: float
    library_error: float


def cca_steps(point: PointStatistics, reference: int, other: int, *, gamma: float | None = None,
              relative: bool | None = None) -> CCASteps:
    """The CCA solve between ``reference`` (X) and ``other`` (Y) at one merge point, step by step
    on the units :func:`ccamerge.methods.cca.cca` keeps live (dead pairs are matched outside the
    SVD): the intermediates are the library's own (:func:`solve_pair`), the checks recompute
    what each step should satisfy."""
    if reference == other:
        raise CcamergeError("pick two different models for the CCA walk-through")
    fit = solve_pair(point, reference, other, gamma=gamma, relative=relative)
    lx, ly = fit.live_x, fit.live_y
    c_xx = point.cov(reference, reference)[np.ix_(lx, lx)]
    c_yy = point.cov(other, other)[np.ix_(ly, ly)]
    c_xy = point.cov(reference, other)[np.ix_(lx, ly)]
    u, rho, v = fit.U, fit.rho[:len(fit.U)], fit.V
    sxx_half, syy_half = sym_powers(fit.s_xx, (0.5,))[0], sym_powers(fit.s_yy, (0.5,))[0]
    T = fit.w_y @ v @ u.T @ sxx_half
    T_inv = fit.w_x @ u @ v.T @ syy_half
    err = lambda a: float(np.abs(a).max()) if a.size else 0.0  # noqa: E731
    return CCASteps(point.name, lx, ly, c_xx, c_yy, c_xy, fit.gamma_x, fit.gamma_y, fit.s_xx,
                    fit.s_yy, fit.w_x, fit.w_y, fit.m, u, rho, v, T, T_inv,
                    np.linalg.eigvalsh(fit.s_xx), np.linalg.eigvalsh(fit.s_yy),
                    err(fit.w_x @ fit.s_xx @ fit.w_x - np.eye(len(lx))),
                    err(u[:, :len(rho)] * rho @ v[:, :len(rho)].T - fit.m),
                    err(T @ T_inv - np.eye(len(ly))), err(T - fit.T[np.ix_(ly, lx)]))
