import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes, subspace_angles

from ccamerge.errors import CcamergeError
from ccamerge.methods.cca import cca, sym_powers


def _covs(x, y):
    joint = np.cov(np.hstack([x, y]).T)
    n = x.shape[1]
    return joint[:n, :n], joint[n:, n:], joint[:n, n:]


@pytest.fixture
def xy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 6)) @ rng.normal(size=(6, 6))
    y = x @ rng.normal(size=(6, 6)) * 0.5 + rng.normal(size=(2000, 6))
    return x, y


def test_linear_map_is_inverted_and_fully_correlated():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1000, 5))
    r = rng.normal(size=(5, 5)) + 3 * np.eye(5)
    fit = cca(*_covs(x, x @ r), gamma=0.0)
    np.testing.assert_allclose(fit.T, np.linalg.inv(r), atol=1e-6)
    np.testing.assert_allclose(fit.rho, 1.0, atol=1e-8)


def test_permutation_is_recovered_exactly_even_with_regularisation():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 7)) * np.arange(1, 8)
    perm = rng.permutation(7)
    p = np.eye(7)[:, perm]  # y = x P: y_j = x_perm[j]
    fit = cca(*_covs(x, x @ p), gamma=0.1, relative=True)
    np.testing.assert_allclose(fit.T, p.T, atol=1e-8)


def test_t_times_t_inverse_is_identity(xy):
    fit = cca(*_covs(*xy), gamma=0.3, relative=True)
    np.testing.assert_allclose(fit.T @ fit.T_inv, np.eye(6), atol=1e-9)


def test_canonical_correlations_match_principal_angles(xy):
    x, y = xy
    fit = cca(*_covs(x, y), gamma=0.0)
    oracle = np.sort(np.cos(subspace_angles(x - x.mean(0), y - y.mean(0))))[::-1]
    np.testing.assert_allclose(fit.rho, oracle, atol=1e-8)
    assert np.all(np.diff(fit.rho) <= 1e-12)


def test_huge_gamma_tends_to_orthogonal_procrustes(xy):
    x, y = xy
    fit = cca(*_covs(x, y), gamma=1e9)
    rotation, _ = orthogonal_procrustes(y - y.mean(0), x - x.mean(0))
    np.testing.assert_allclose(fit.T, rotation, atol=1e-5)


def test_self_cca_is_identity_with_dead_units():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 6))
    x[:, [1, 4]] = 0.0  # two ReLUs that never fire
    fit = cca(*_covs(x, x), gamma=0.01, relative=True)
    assert list(fit.dead_x) == [1, 4]
    np.testing.assert_allclose(fit.T, np.eye(6), atol=1e-8)
    np.testing.assert_allclose(fit.T_inv, np.eye(6), atol=1e-8)


def test_sign_convention_makes_largest_entries_positive(xy):
    fit = cca(*_covs(*xy), gamma=0.1, relative=True)
    cols = np.arange(fit.U.shape[1])
    assert np.all(fit.U[np.abs(fit.U).argmax(0), cols] > 0)


def test_matrix_roots_of_an_indefinite_matrix_are_clamped():
    s = np.array([[1.0, 0.0], [0.0, -1e-14]])
    half, inv_half = sym_powers(s, (0.5, -0.5))
    assert np.isfinite(half).all() and np.isfinite(inv_half).all()
    np.testing.assert_allclose(half @ half, np.array([[1.0, 0], [0, 1e-12]]), atol=1e-12)


def test_bad_inputs_are_rejected(xy):
    cxx, cyy, cxy = _covs(*xy)
    with pytest.raises(CcamergeError):
        cca(cxx, cyy, cxy, gamma=-1.0)
    cxy = cxy.copy()
    cxy[0, 0] = np.nan
    with pytest.raises(CcamergeError, match="NaN"):
        cca(cxx, cyy, cxy)


def test_self_cca_is_identity_with_rank_deficient_live_units():
    rng = np.random.default_rng(4)
    base = np.maximum(rng.normal(size=(500, 3)), 0.0)
    x = np.hstack([base, base @ rng.uniform(0.5, 1.5, size=(3, 5))])  # 8 live units, rank 3
    fit = cca(*_covs(x, x), gamma=0.1, relative=True)
    assert len(fit.dead_x) == 0
    np.testing.assert_allclose(fit.T, np.eye(8), atol=1e-6)
    np.testing.assert_allclose(fit.T @ fit.T_inv, np.eye(8), atol=1e-8)
