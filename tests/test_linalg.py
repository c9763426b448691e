"""ccamerge.linalg: the solves' factorisations, on the host or the statistics' GPU."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from ccamerge import linalg
from ccamerge.methods.cca import cca


def random_covariance(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((4 * n, n))
    return x.T @ x / len(x)


def test_eigh_and_svd_match_numpy():
    s = random_covariance(40)
    eig, q = linalg.eigh(s)
    np.testing.assert_allclose(eig, np.linalg.eigvalsh(s), rtol=1e-12)
    np.testing.assert_allclose((q * eig) @ q.T, s, atol=1e-12)
    m = np.random.default_rng(1).standard_normal((30, 20))
    u, sv, v = linalg.svd(m)
    assert u.shape == (30, 30) and v.shape == (20, 20) and sv.shape == (20,)
    np.testing.assert_allclose(sv, np.linalg.svd(m, compute_uv=False), rtol=1e-12)
    np.testing.assert_allclose((u[:, :20] * sv) @ v.T, m, atol=1e-12)
    u, sv, v = linalg.svd(m, full_matrices=False)
    assert u.shape == (30, 20) and v.shape == (20, 20)


def test_the_solve_device_is_the_host_unless_a_gpu_and_a_large_matrix():
    assert linalg.solve_device(10_000) == torch.device("cpu")
    with linalg.solving_on("cpu"):
        assert linalg.solve_device(10_000) == torch.device("cpu")
    with linalg.solving_on(torch.device("cuda", 0)):  # only asks; nothing runs on it
        assert linalg.solve_device(linalg.DEVICE_MIN_SIZE) == torch.device("cuda", 0)
        assert linalg.solve_device(linalg.DEVICE_MIN_SIZE - 1) == torch.device("cpu")
        with linalg.solving_on(None):
            assert linalg.solve_device(10_000) == torch.device("cpu")
        assert linalg.solve_device(10_000) == torch.device("cuda", 0)
    assert linalg.solve_device(10_000) == torch.device("cpu")  # restored


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cca_solve_on_the_gpu_equals_the_host_solve():
    n = linalg.DEVICE_MIN_SIZE + 8
    x = np.random.default_rng(2).standard_normal((6 * n, 2 * n))
    c = np.cov(x, rowvar=False)
    args = (c[:n, :n], c[n:, n:], c[:n, n:])
    host = cca(*args, gamma=0.1, relative=True)
    with linalg.solving_on("cuda"):
        device = cca(*args, gamma=0.1, relative=True)
    np.testing.assert_allclose(device.rho, host.rho, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(device.T, host.T, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("shape", [(6, 6), (9, 4), (4, 9)])
def test_polar_is_scipys_unitary_polar_factor(shape):
    m = np.random.default_rng(3).standard_normal(shape)
    u, _p = scipy.linalg.polar(m)
    np.testing.assert_allclose(linalg.polar(m), u, atol=1e-12)
