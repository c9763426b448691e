"""The shared space's spectrum checked against an independent numpy MAXVAR (eigh of the stacked
whitened samples), CCA for two models, copies of one model and an outlier among three."""

import numpy as np
import pytest

from ccamerge.analysis.shared import shared_spectrum_row, shared_spectrum_rows
from ccamerge.errors import CcamergeError
from ccamerge.methods.cca import solve_pair
from ccamerge.stats import PointStatistics, Statistics


def point_of(xs: list[np.ndarray], name: str = "p") -> PointStatistics:
    """Statistics of N models' samples ``xs[i]`` ``[S, n_i]``, every covariance block."""
    c = np.cov(np.hstack(xs), rowvar=False)
    edges = np.cumsum([0] + [x.shape[1] for x in xs])
    blocks = {(i, j): c[edges[i]:edges[i + 1], edges[j]:edges[j + 1]]
              for i in range(len(xs)) for j in range(i, len(xs))}
    widths = [x.shape[1] for x in xs]
    return PointStatistics(name, widths[0], len(xs[0]), [x.mean(0) for x in xs], blocks, widths)


def family(samples: int, n: int, models: int, noise: float, seed: int, *, draw: int = 0,
           outlier: bool = False) -> list[np.ndarray]:
    """N models' features ``[S, n]``: one latent signal through a random dense map each (maps
    from ``seed``), plus noise (samples from ``draw``); with ``outlier`` the last model sees
    independent data."""
    maps = np.random.default_rng(seed).standard_normal((models, n, n))
    rng = np.random.default_rng([seed, draw])
    z = rng.standard_normal((samples, n)) * np.linspace(2.0, 0.3, n)
    out = []
    for i in range(models):
        source = rng.standard_normal(z.shape) if outlier and i == models - 1 else z
        out.append(source @ maps[i] + noise * rng.standard_normal(z.shape))
    return out


def inv_sqrt(c: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(c)
    return vectors / np.sqrt(values)


def oracle(fit: list[np.ndarray], held: list[np.ndarray], k: int):
    """Independent MAXVAR: whiten each model's centred samples by its own covariance, stack
    them side by side, eigh of their covariance; the top ``k`` eigenvalues, and the mean
    pairwise Pearson correlation of the variates per direction on ``fit`` and on ``held``."""
    whiteners = [inv_sqrt(np.cov(x, rowvar=False)) for x in fit]
    stacked = np.hstack([(x - x.mean(0)) @ w for x, w in zip(fit, whiteners, strict=True)])
    values, vectors = np.linalg.eigh(stacked.T @ stacked / (len(stacked) - 1))
    values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k]
    blocks = np.split(vectors, len(fit))

    def rho(xs):
        u = [x @ w @ v for x, w, v in zip(xs, whiteners, blocks, strict=True)]  # [S, k] each
        pairs = [(i, j) for i in range(len(xs)) for j in range(i + 1, len(xs))]
        return np.array([np.mean([np.corrcoef(u[i][:, d], u[j][:, d])[0, 1] for i, j in pairs])
                         for d in range(k)])
    return values, rho(fit), rho(held)


@pytest.mark.parametrize("models", [2, 3, 4])
def test_eigenvalues_and_correlations_match_a_numpy_maxvar(models):
    fit = family(900, 6, models, noise=1.5, seed=models)
    held = family(500, 6, models, noise=1.5, seed=models, draw=1)  # same maps, new samples
    row = shared_spectrum_row(point_of(fit), point_of(held), models, gamma=0.0, relative=True)
    values, rho_fit, rho_held = oracle(fit, held, row["directions"])
    assert row["directions"] == 6
    np.testing.assert_allclose(row["eigenvalues"], values, atol=1e-8)
    np.testing.assert_allclose(row["rho_fit"], rho_fit, atol=1e-7)
    np.testing.assert_allclose(row["rho_heldout"], rho_held, atol=1e-7)
    assert 1.0 < row["eigenvalues"][0] <= models
    assert row["rho_eigen"][0] >= row["rho_fit"][0] - 1e-9  # lambda_1: top of its correlations


def test_two_models_give_eigenvalues_one_plus_the_canonical_correlations():
    x, y = family(800, 8, 2, noise=2.0, seed=7)
    point = point_of([x, y])
    row = shared_spectrum_row(point, None, 2, gamma=0.0, relative=True)
    rho = solve_pair(point, 0, 1, gamma=0.0, relative=True).rho
    np.testing.assert_allclose(row["eigenvalues"], 1.0 + rho, atol=1e-9)
    np.testing.assert_allclose(row["rho_fit"], rho, atol=1e-9)  # one pair: its correlation
    np.testing.assert_allclose(row["rho_eigen"], rho, atol=1e-9)
    assert row["rho_heldout"] is None and row["mean_rho_heldout"] is None


def test_eigenvalue_is_the_sum_of_squared_correlations_with_the_consensus():
    fit = family(900, 5, 3, noise=1.0, seed=3, outlier=True)
    row = shared_spectrum_row(point_of(fit), None, 3, gamma=0.0, relative=True)
    squares = (np.asarray(row["consensus_fit"]) ** 2).sum(axis=0)
    np.testing.assert_allclose(squares, row["eigenvalues"], atol=1e-9)


def test_copies_of_one_model_give_eigenvalue_n_and_full_correlation():
    x = family(400, 5, 1, noise=0.0, seed=0)[0]
    perm = np.random.default_rng(1).permutation(5)
    other = family(300, 5, 1, noise=0.0, seed=0, draw=1)[0]
    row = shared_spectrum_row(point_of([x, x, x[:, perm]]),
                              point_of([other, other, other[:, perm]]), 3, gamma=0.0,
                              relative=True)
    np.testing.assert_allclose(row["eigenvalues"], 3.0, atol=1e-9)
    np.testing.assert_allclose(row["rho_fit"], 1.0, atol=1e-9)
    np.testing.assert_allclose(row["rho_heldout"], 1.0, atol=1e-9)
    np.testing.assert_allclose(row["consensus_fit"], 1.0, atol=1e-9)
    assert all(m["variance_share"] == pytest.approx(1.0) for m in row["models"])


def test_the_outlier_follows_the_consensus_least():
    fit = family(2000, 6, 3, noise=0.5, seed=5, outlier=True)
    held = family(2000, 6, 3, noise=0.5, seed=5, draw=1, outlier=True)
    row = shared_spectrum_row(point_of(fit), point_of(held), 3, gamma=0.0, relative=True)
    held_means = [m["mean_consensus_heldout"] for m in row["models"]]
    assert int(np.argmin(held_means)) == 2
    assert held_means[2] < min(held_means[:2]) - 0.2
    # gcca's (lambda - 1) / (N - 1) overstates the mean correlation when one model lacks a
    # direction; for the first one at gamma = 0 it never understates it
    assert row["rho_eigen"][0] > row["rho_fit"][0] + 0.1


def test_a_wider_model_holds_part_of_its_variance_outside_the_shared_space():
    x, y = family(900, 6, 2, noise=0.5, seed=2)
    extra = np.random.default_rng(9).standard_normal((900, 3)) * 5.0
    row = shared_spectrum_row(point_of([x, np.hstack([y, extra])]), None, 2, gamma=0.0,
                              relative=True)
    shares = [m["variance_share"] for m in row["models"]]
    assert row["directions"] == 6 and shares[0] == pytest.approx(1.0)
    assert 0.05 < shares[1] < 0.95


def test_rows_refuse_statistics_without_every_pair():
    points = {"p": point_of(family(200, 4, 3, noise=1.0, seed=0))}
    stats = Statistics(points, num_models=3, reference=0, pairs="reference")
    with pytest.raises(CcamergeError, match="pairs='all'"):
        shared_spectrum_rows(stats, None)
    rows = shared_spectrum_rows(Statistics(points, 3, 0, "all"), None)
    assert [r["name"] for r in rows] == ["p"] and rows[0]["num_models"] == 3
