"""Merging into a chosen width below the reference's (``target_width``): compression.

A method with shared (gcca) or canonical (cca) directions first brings every model i into the
reference's ``n`` units, ``T_i`` ``[n_i, n]`` (``T_ref = I``). The merged model must keep ``w <
n`` units at the point, and they must stay real ReLU units (the elementwise ReLU makes the
basis matter), so the merged units are a subset ``K`` (``|K| = w``) of the reference's units:

* **which units.** ``L`` ``[k, n]``: the reference's loadings on its shared directions, best
  first (gcca: ``G_ref = W_ref^T S_ref``; cca: ``U^T S_xx^1/2`` per pair, pairs stacked). Column
  ``j`` of ``L[:w]`` is unit ``j``'s covariance with the top ``w`` unit-variance shared variates
  ``z``, so ``x_j ~ z L[:, j]``. Column-pivoted QR of ``L[:w]`` (``scipy.linalg.qr(pivoting=
  True)``) greedily picks the ``w`` columns of largest residual norm, i.e. the units whose
  loadings span the top shared space with the largest volume: the ``w`` units that carry the
  best-correlated directions most independently. A unit duplicated in the reference has a
  residual of zero once its twin is picked, so a duplicated model keeps one copy of each unit.
* **merge.** ``T_i^w = T_i[:, K]`` ``[n_i, w]``: model i's estimate, through the shared
  space, of the kept reference units (for the reference itself the selection ``I[:, K]``).
* **unmerge.** A consumer of model i reads ``x_i``; in the merged model it reads the ``w`` units
  ``u = x_i T_i^w``, so it gets the least-squares reconstruction ``x_i ~ u B_i`` with
  ``B_i = (T^T M_i T)^-1 T^T M_i`` ``[w, n_i]`` (``M_i = E[x_i^T x_i]``, uncentred, because the
  weights carry no intercept; a ridge of ``LS_RIDGE`` of the mean diagonal keeps it posed).
  Merging into a narrower width is then a projection: the dropped units are read as their best
  linear estimate from the kept ones.

Exactness: for a permuted copy ``x_i = x P`` at the full width, ``T = P`` and ``B = P^T``. For a
model with every unit twice, ``x_i = [x, x]``, kept at the narrow width: ``T_i^w`` picks one
copy (``[I; 0]`` up to order) and ``B_i = [I, I]``, so producers become ``W`` and consumers
``[W'/2, W'/2] [I, I]^T = W'``: the function is kept, also when the duplicated model is the
reference. With ``w = n`` nothing is narrowed (``target_model`` exactly).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from ccamerge.methods.base import Alignment
from ccamerge.stats import PointStatistics
from ccamerge.transform import Transform

LS_RIDGE = 1e-9  # relative ridge of the least-squares unmerge (numerical only)


def pivot_units(loadings: np.ndarray, width: int) -> np.ndarray:
    """``[width]`` ascending unit indices: the columns of ``loadings`` ``[k, n]`` picked first
    by column-pivoted QR (the units whose loadings span the most volume)."""
    _, _, order = scipy.linalg.qr(loadings, pivoting=True, mode="economic")
    return np.sort(order[:width])


def unmerge(moment: np.ndarray, T: np.ndarray) -> np.ndarray:
    """``B = (T^T M T + r I)^-1 T^T M`` ``[w, n]``: the least-squares map from the merged units
    ``u = x T`` back to ``x`` (``M`` ``[n, n]`` the uncentred second moment of ``x``, ``T``
    ``[n, w]``)."""
    gram = T.T @ moment @ T  # [w, w]
    ridge = LS_RIDGE * max(float(np.trace(gram)) / max(len(gram), 1), 1e-30)
    return np.linalg.solve(gram + ridge * np.eye(len(gram)), T.T @ moment)


def full_loadings(loadings: np.ndarray, live: np.ndarray, width: int) -> np.ndarray:
    """``loadings`` ``[k, len(live)]`` on the live units as ``[k, width]`` (zero columns for the
    units left out of the solve)."""
    out = np.zeros((len(loadings), width))
    out[:, live] = loadings
    return out


def narrow_point(result: Alignment, name: str, point: PointStatistics, reference: int,
                 loadings: np.ndarray, width: int) -> None:
    """Replace every model's transform at merge point ``name`` by its narrowed form (module
    docstring): ``width`` reference units picked from ``loadings`` ``[k, n_ref]``, merge maps
    column-selected, unmerge maps by least squares. Records ``kept_units`` in the details."""
    units = pivot_units(loadings, width)
    for i, transforms in enumerate(result.transforms):
        T = transforms[name].T[:, units]  # [n_i, width]
        transforms[name] = Transform(T, unmerge(point.second_moment(i, i), T))
        if i != reference:
            result.details.setdefault(name, {}).setdefault(i, {})["kept_units"] = units
