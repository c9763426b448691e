"""Where the solves' float64 factorisations run: the host, or the statistics' GPU.

The methods hold their matrices as numpy float64 arrays on the host; the cubic steps (``eigh`` of
each regularised covariance block, the SVD of the whitened cross-covariance) dominate a solve at
the widths of wide models (a 4096-wide ``eigh`` takes tens of seconds on two CPU cores). When the
statistics were collected on a CUDA device, those factorisations run there, still in float64
(cuSOLVER), for matrices of at least :data:`DEVICE_MIN_SIZE` rows: below that the copies and the
launch cost more than the factorisation saves. ``benchmarks/device_check.py`` times both sides per
size on a GPU machine.

:func:`solving_on` sets the device for a block of code (the API wraps each solve in it); the
functions here take and return numpy arrays whatever the device, so a method cannot tell.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
import torch

DEVICE_MIN_SIZE = 256  # rows from which a CUDA factorisation is used (see the module docstring)

_SOLVE_DEVICE: ContextVar[torch.device | None] = ContextVar("ccamerge_solve_device", default=None)


@contextmanager
def solving_on(device: torch.device | str | None) -> Iterator[None]:
    """Run the factorisations of the enclosed solves on ``device`` (``None``: the host)."""
    token = _SOLVE_DEVICE.set(torch.device(device) if device is not None else None)
    try:
        yield
    finally:
        _SOLVE_DEVICE.reset(token)


def solve_device(rows: int) -> torch.device:
    """The device a factorisation of a matrix with ``rows`` rows runs on in this context."""
    device = _SOLVE_DEVICE.get()
    if device is not None and device.type == "cuda" and rows >= DEVICE_MIN_SIZE:
        return device
    return torch.device("cpu")


def _tensor(m: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(m, dtype=np.float64)).to(device)


def _host(t: torch.Tensor) -> np.ndarray:
    return t.cpu().numpy()


def eigh(sym: np.ndarray, device: torch.device | None = None
         ) -> tuple[np.ndarray, np.ndarray]:
    """``(eigenvalues [n] ascending, eigenvectors [n, n])`` of a symmetric ``[n, n]`` float64
    matrix (torch's LAPACK on the host, faster than numpy's; cuSOLVER on a CUDA solve device).
    ``device``: run there whatever the size and context (to time one side)."""
    eig, q = torch.linalg.eigh(_tensor(sym, device or solve_device(len(sym))))
    return _host(eig), _host(q)


def svd(m: np.ndarray, full_matrices: bool = True, device: torch.device | None = None
        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(U [p, p], s [min(p, q)], V [q, q])`` of ``m`` ``[p, q]`` in float64 (``full_matrices``
    False: ``U [p, k]``, ``V [q, k]`` with ``k = min(p, q)``); note ``V``, not ``V^T``.
    ``device``: as for :func:`eigh`."""
    u, s, vh = torch.linalg.svd(_tensor(m, device or solve_device(max(m.shape))),
                                full_matrices=full_matrices)
    return _host(u), _host(s), _host(vh).T


def polar(m: np.ndarray) -> np.ndarray:
    """``U V^T`` of the thin SVD ``m = U diag(s) V^T`` (``[p, q]``, on the host): the matrix with
    orthonormal columns (or rows) nearest ``m``; for ``m = A^T B`` the orthogonal Procrustes
    rotation taking ``B`` onto ``A``."""
    left, _, right = np.linalg.svd(m, full_matrices=False)
    return left @ right
