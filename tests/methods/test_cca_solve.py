"""The CCA solve in the eigenbases against the matrix-root formulas of method.md section 3."""

import numpy as np
import pytest

from ccamerge.methods.cca import cca, condition_number, sym_powers


def _covs(x, y):
    joint = np.cov(np.hstack([x, y]).T)
    n = x.shape[1]
    return joint[:n, :n], joint[n:, n:], joint[:n, n:]


def _root_formulas(c_xx, c_yy, c_xy, g):
    """T, T_inv, rho, M via S^(+-1/2) (numpy only), on covariances without dead units."""
    sxx, syy = c_xx + g * np.eye(len(c_xx)), c_yy + g * np.eye(len(c_yy))
    evx, qx = np.linalg.eigh(sxx)
    evy, qy = np.linalg.eigh(syy)
    h_x, ih_x = (qx * evx**0.5) @ qx.T, (qx * evx**-0.5) @ qx.T
    h_y, ih_y = (qy * evy**0.5) @ qy.T, (qy * evy**-0.5) @ qy.T
    m = ih_x @ c_xy @ ih_y
    u, rho, vt = np.linalg.svd(m)
    return ih_y @ vt.T @ u.T @ h_x, ih_x @ u @ vt @ h_y, rho, m, ih_x, ih_y


@pytest.fixture
def pair():
    rng = np.random.default_rng(5)
    x = np.maximum(rng.normal(size=(3000, 12)) @ rng.normal(size=(12, 12)), 0.0)
    y = x @ rng.normal(size=(12, 12)) + rng.normal(size=(3000, 12))
    return _covs(x, y)


def test_eigenbasis_solve_equals_the_matrix_root_formulas(pair):
    c_xx, c_yy, c_xy = pair
    fit = cca(c_xx, c_yy, c_xy, gamma=0.05, relative=False)
    T, T_inv, rho, m, ih_x, ih_y = _root_formulas(c_xx, c_yy, c_xy, 0.05)
    np.testing.assert_allclose(fit.T, T, atol=1e-10)
    np.testing.assert_allclose(fit.T_inv, T_inv, atol=1e-10)
    np.testing.assert_allclose(fit.rho, rho, atol=1e-12)
    np.testing.assert_allclose(fit.m, m, atol=1e-12)
    np.testing.assert_allclose(fit.w_x, ih_x, atol=1e-10)
    np.testing.assert_allclose(fit.w_y, ih_y, atol=1e-10)
    np.testing.assert_allclose((fit.U * fit.rho) @ fit.V.T, m, atol=1e-10)  # lazy directions
    np.testing.assert_allclose(fit.U.T @ fit.U, np.eye(12), atol=1e-10)


def test_condition_numbers_come_from_the_same_eigendecomposition(pair):
    fit = cca(*pair, gamma=0.1, relative=True)
    assert fit.cond_xx == pytest.approx(condition_number(fit.s_xx), rel=1e-9)
    assert fit.cond_yy == pytest.approx(condition_number(fit.s_yy), rel=1e-9)
    half, inv_half = sym_powers(fit.s_xx, (0.5, -0.5))
    np.testing.assert_allclose(half @ inv_half, np.eye(12), atol=1e-10)


def test_a_shared_cache_reuses_the_reference_block_and_changes_nothing(pair):
    c_xx, c_yy, c_xy = pair
    rng = np.random.default_rng(6)
    r = rng.normal(size=(12, 12))
    others = [(c_yy, c_xy), (r.T @ c_xx @ r + np.eye(12), c_xx @ r)]
    cache: dict = {}
    for c_oo, c_xo in others:
        shared = cca(c_xx, c_oo, c_xo, gamma=0.1, relative=True, cache=cache)
        alone = cca(c_xx, c_oo, c_xo, gamma=0.1, relative=True)
        np.testing.assert_array_equal(shared.T, alone.T)
        np.testing.assert_array_equal(shared.T_inv, alone.T_inv)
    assert len(cache) == 1  # one reference block, one decomposition
    dead = c_xx.copy()
    dead[3], dead[:, 3] = 0.0, 0.0
    zero_y = c_yy.copy()
    zero_y[5], zero_y[:, 5] = 0.0, 0.0
    cca(dead, zero_y, c_xy, gamma=0.1, relative=True, cache=cache)
    assert len(cache) == 2  # other live units: its own entry
