"""Shrunk singular values against reached correlations, checked against sample matrices (numpy)
and scikit-learn's CCA."""

import json

import numpy as np
import pytest
import torch
from sklearn.cross_decomposition import CCA

from ccamerge import api
from ccamerge.analysis.spectra import (
    directions,
    matched,
    noise_level,
    pair_correlations,
    reached,
    spectrum_row,
    spectrum_rows,
)
from ccamerge.data import holdout_split
from ccamerge.methods.cca import solve_near_exact, solve_pair
from ccamerge.models import build_model
from ccamerge.spec import build_spec
from ccamerge.stats import PointStatistics, collect_statistics


def point_of(x: np.ndarray, y: np.ndarray, name: str = "p") -> PointStatistics:
    """Statistics of samples ``x`` ``[S, n]`` (model 0) and ``y`` ``[S, n]`` (model 1)."""
    c = np.cov(np.hstack([x, y]), rowvar=False)
    n = x.shape[1]
    return PointStatistics(name, n, len(x), [x.mean(0), y.mean(0)],
                           {(0, 0): c[:n, :n], (1, 1): c[n:, n:], (0, 1): c[:n, n:]})


def related(samples: int, n: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """X ``[S, n]`` with correlated units and Y = X R + noise (R a random dense map)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, n)) @ rng.standard_normal((n, n))
    y = x @ rng.standard_normal((n, n)) + noise * rng.standard_normal((samples, n)) * x.std()
    return x, y


def pearson_columns(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.array([np.corrcoef(u[:, k], v[:, k])[0, 1] for k in range(u.shape[1])])


@pytest.mark.parametrize("gamma", [0.0, 0.1, 10.0])
def test_reached_is_the_pearson_correlation_of_the_projected_samples(gamma):
    x, y = related(600, 12, noise=2.0, seed=0)
    x_new, y_new = related(400, 12, noise=2.0, seed=0)  # same maps, other samples
    x_new, y_new = x_new[::-1], y_new[::-1]
    fit = solve_pair(point_of(x, y), 0, 1, gamma=gamma, relative=True)
    a, b = directions(fit)
    for xs, ys in ((x, y), (x_new, y_new)):
        want = pearson_columns(xs @ a, ys @ b)
        np.testing.assert_allclose(reached(fit, point_of(xs, ys), 0, 1), want, atol=1e-9)


def test_the_ridge_shrinks_singular_values_below_what_the_pairs_reach():
    x, y = related(500, 10, noise=1.5, seed=1)
    point = point_of(x, y)
    fit = solve_pair(point, 0, 1, gamma=1.0, relative=True)
    got = reached(fit, point, 0, 1)
    a, b = directions(fit)
    # on the fitting data a^T S_xx a = 1, so the reached value is s / sqrt((1 - g|a|^2)(1 - g|b|^2))
    scale = (1 - fit.gamma_x * (a**2).sum(0)) * (1 - fit.gamma_y * (b**2).sum(0))
    expected = fit.rho / np.sqrt(scale)
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert (got > fit.rho + 0.01).all()
    exact = solve_pair(point, 0, 1, gamma=0.0, relative=False)
    np.testing.assert_allclose(reached(exact, point, 0, 1), exact.rho, atol=1e-8)


def test_unregularised_cca_agrees_with_scikit_learn():
    x, y = related(800, 6, noise=1.0, seed=2)
    fit = solve_near_exact(point_of(x, y), 0, 1)
    ours = reached(fit, point_of(x, y), 0, 1)[:3]
    cca = CCA(n_components=3, scale=False, max_iter=5000, tol=1e-12).fit(x, y)
    xs, ys = cca.transform(x, y)
    np.testing.assert_allclose(ours, np.abs(pearson_columns(xs, ys)), atol=1e-3)


def test_noise_level_is_the_largest_chance_correlation_of_unrelated_features():
    rng = np.random.default_rng(3)
    for samples, p, q in ((2000, 100, 100), (1000, 40, 120)):
        x, y = rng.standard_normal((samples, p)), rng.standard_normal((samples, q))
        qx, qy = np.linalg.qr(x - x.mean(0))[0], np.linalg.qr(y - y.mean(0))[0]
        largest = np.linalg.svd(qx.T @ qy, compute_uv=False)[0]
        assert abs(largest - noise_level(samples, p, q)) < 0.04
    assert noise_level(100, 60, 60) == 1.0


def test_held_out_correlations_reveal_overfitting_of_unrelated_features():
    rng = np.random.default_rng(4)
    fit_point = point_of(rng.standard_normal((300, 20)), rng.standard_normal((300, 20)))
    held = point_of(rng.standard_normal((3000, 20)), rng.standard_normal((3000, 20)))
    row = spectrum_row(fit_point, held, 0, 1, gamma=1e-4)
    assert row["exact_fit"][0] == pytest.approx(row["noise_level"], abs=0.1)
    assert row["mean_exact_fit"] > 0.2 and abs(row["mean_exact_heldout"]) < 0.05
    assert abs(row["mean_matched_heldout"]) < 0.05 < row["mean_matched_fit"]


def test_matched_pairs_of_a_permuted_copy_correlate_fully():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((400, 8))
    perm = rng.permutation(8)
    y = x[:, perm]
    held_x = rng.standard_normal((300, 8))
    np.testing.assert_allclose(matched(point_of(x, y), point_of(held_x, held_x[:, perm]), 0, 1),
                               1.0, atol=1e-9)


def test_a_row_is_json_and_pads_dead_units():
    x, y = related(400, 6, noise=0.5, seed=6)
    x[:, 5], y[:, 2] = 0.0, 0.0
    row = spectrum_row(point_of(x, y), None, 0, 1, gamma=0.1, relative=True)
    json.dumps(row)
    assert len(row["shrunk"]) == len(row["reached_fit"]) == 6 and row["reached_fit"][-1] == 0.0
    assert row["reached_heldout"] is None and row["mean_reached_heldout"] is None
    assert row["dead_reference"] == 1 and row["dead_model"] == 1
    assert row["matched_fit"] == sorted(row["matched_fit"], reverse=True)


def images(count: int) -> torch.Tensor:
    """``count`` random 8x8 one-channel images ``[count, 1, 8, 8]``."""
    return torch.randn(count, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_the_api_spectrum_holds_out_disjoint_images_and_fits_on_the_rest():
    torch.manual_seed(0)
    models = [build_model("mlp", in_channels=1, image_size=8, num_classes=10) for _ in range(3)]
    x = images(400)
    rows = api.spectrum(models, x, reference=1, gamma=0.1)
    points = [p.name for p in build_spec(models[0]).points]
    assert [(r["name"], r["model"]) for r in rows] == [(p, i) for p in points for i in (0, 2)]
    assert all(r["samples"] == 320 and r["heldout_samples"] == 80 for r in rows)
    fit_idx, held_idx = holdout_split(400, 0.2, 0)
    assert not set(fit_idx.tolist()) & set(held_idx.tolist())
    spec = build_spec(models[1])
    expected = spectrum_rows(collect_statistics(models, spec, x[fit_idx], reference=1),
                             collect_statistics(models, spec, x[held_idx], reference=1),
                             gamma=0.1)
    for got, want in zip(rows, expected, strict=True):
        np.testing.assert_allclose(got["reached_heldout"], want["reached_heldout"], atol=1e-9)
        np.testing.assert_allclose(got["shrunk"], want["shrunk"], atol=1e-9)
    few = api.spectrum(models, x[:30], gamma=0.1)  # 6 would be held out: nothing is
    assert all(r["samples"] == 30 and r["reached_heldout"] is None for r in few)


def test_pair_correlations_of_a_direction_without_variance_is_zero():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((200, 3))
    x[:, 2] = 0.0
    c = np.cov(np.hstack([x, x]), rowvar=False)
    a = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])  # the second direction reads a dead unit
    got = pair_correlations(a, a, c[:3, :3], c[3:, 3:], c[:3, 3:])
    np.testing.assert_allclose(got, [1.0, 0.0])
