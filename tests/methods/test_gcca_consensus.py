"""gcca with consensus units: the maps between models stay gcca's (and cca's for N = 2), exact
cases (permuted families, copies with dead and rank-deficient units), independence of the
reference and of the models' order, and the option end to end."""

import numpy as np
import pytest
import torch
from helpers import max_output_diff, permuted_twin
from scipy.optimize import linear_sum_assignment
from test_gcca import GAMMA, _family, _point

from ccamerge.api import merge
from ccamerge.errors import CcamergeError
from ccamerge.evaluate import evaluate_model
from ccamerge.methods import get_method
from ccamerge.methods.cca import cca
from ccamerge.methods.consensus_units import consensus_transform, consensus_units
from ccamerge.methods.gcca import solve_shared, transform_to


def _consensus(xs, **options):
    space = solve_shared(_point(xs), len(xs), gamma=GAMMA, relative=True, **options)
    units = consensus_units(space)
    return space, units, [consensus_transform(space, units, i) for i in range(len(xs))]


def _column_order(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The column permutation ``p`` with ``a[:, p] ~ b`` (nearest columns, one to one)."""
    cost = ((a[:, :, None] - b[:, None, :]) ** 2).sum(0)  # [n, n]
    rows, cols = linear_sum_assignment(cost)
    return rows[np.argsort(cols)]


@pytest.mark.parametrize("n_models", [2, 3, 4])
def test_maps_between_models_are_gccas_and_each_map_inverts(n_models):
    xs = _family(n_models, seed=10 + n_models)
    space, _units, ts = _consensus(xs)
    for i, t in enumerate(ts):
        np.testing.assert_allclose(t.T @ t.T_inv, np.eye(6), atol=1e-9)
        for j in range(n_models):
            np.testing.assert_allclose(t.T @ ts[j].T_inv, transform_to(space, i, j).T, atol=1e-9)


def test_merged_units_carry_the_mean_covariance():
    """L*^T L* is the models' mean covariance in consensus order (ridge included), so the
    consensus is as well conditioned as the models (a plain mean of loadings is not)."""
    xs = _family(3, seed=4)
    p = _point(xs)
    _space, units, _ts = _consensus(xs)
    ridged = [p.cov(i, i) + GAMMA * np.trace(p.cov(i, i)) / 6 * np.eye(6) for i in range(3)]
    mean = np.mean([c[np.ix_(q, q)] for c, q in zip(ridged, units.perms, strict=True)], axis=0)
    np.testing.assert_allclose(units.loadings.T @ units.loadings, mean, atol=1e-9)


def test_two_models_compose_to_cca_merge_and_meet_at_the_midpoint():
    """N = 2: model 1 into model 0 through the consensus is CCA Merge's T; the merged units are
    the midpoints, so both models move (neither map is the identity) and by the same amount."""
    xs = _family(2, seed=5)
    p = _point(xs)
    fit = cca(p.cov(0, 0), p.cov(1, 1), p.cov(0, 1), gamma=GAMMA, relative=True)
    _space, units, ts = _consensus(xs)
    np.testing.assert_allclose(ts[1].T @ ts[0].T_inv, fit.T, atol=1e-9)
    assert all(np.abs(t.T - np.eye(6)).max() > 0.1 for t in ts)
    assert units.distances[0] == pytest.approx(units.distances[1], rel=1e-12)


def test_the_models_order_does_not_change_the_consensus_units():
    xs = _family(4, seed=21)
    _s, _u, ts = _consensus(xs)
    order = [2, 0, 3, 1]
    _s, _u, shuffled = _consensus([xs[k] for k in order])
    p = _column_order(shuffled[0].T, ts[order[0]].T)
    for pos, k in enumerate(order):
        np.testing.assert_allclose(shuffled[pos].T[:, p], ts[k].T, atol=1e-8)
    space = solve_shared(_point(xs), 4, gamma=GAMMA, relative=True)
    for r in range(4):  # not vacuous: the consensus is none of the references' bases
        to_r = transform_to(space, 1, r).T
        assert np.abs(to_r[:, _column_order(to_r, ts[1].T)] - ts[1].T).max() > 1e-2


def test_permuted_family_maps_to_exact_permutations():
    rng = np.random.default_rng(8)
    x = _family(1)[0]
    perms = [np.eye(6)[:, rng.permutation(6)] for _ in range(4)]
    _space, units, ts = _consensus([x @ p for p in perms])
    for p, t in zip(perms, ts, strict=True):
        np.testing.assert_allclose(t.T, p.T @ perms[units.start], atol=1e-9)
    np.testing.assert_allclose(units.distances, 0.0, atol=1e-20)


def test_copies_with_dead_and_rank_deficient_units_map_to_identity():
    rng = np.random.default_rng(4)
    base = np.maximum(rng.normal(size=(800, 4)), 0.0)
    x = np.hstack([base, base @ rng.uniform(0.5, 1.5, size=(4, 3)), np.zeros((800, 2))])
    _space, _units, ts = _consensus([x, x, x])
    for t in ts:  # 9 units: 4 free, 3 dependent (the complement), 2 dead
        np.testing.assert_allclose(t.T, np.eye(9), atol=1e-7)
        np.testing.assert_allclose(t.T_inv, np.eye(9), atol=1e-7)


def test_rank_deficient_models_that_differ_still_invert():
    """Each model has null directions of its own (the complement, averaged by Procrustes)."""
    rng = np.random.default_rng(6)
    xs = []
    for x in _family(3, width=5, seed=2):
        xs.append(np.hstack([x, x[:, :2] @ rng.normal(size=(2, 2))]))
    _space, units, ts = _consensus(xs)
    assert units.loadings.shape == (7, 7)
    for t in ts:
        np.testing.assert_allclose(t.T @ t.T_inv, np.eye(7), atol=1e-8)


def test_mixed_widths_fail_in_one_line():
    xs = [_family(1, width=6)[0], _family(1, width=8, seed=1)[0]]
    space = solve_shared(_point(xs), 2, gamma=GAMMA, relative=True)
    with pytest.raises(CcamergeError, match="equal widths"):
        consensus_units(space)


def test_merge_does_not_depend_on_the_reference_or_the_order(mlps, digits):
    merged = merge(mlps, digits, "gcca", consensus_units=True).model
    other_ref = merge(mlps, digits, "gcca", consensus_units=True, reference=2).model
    reordered = merge(mlps[::-1], digits, "gcca", consensus_units=True).model
    assert max_output_diff(merged, other_ref, digits.x_test) < 1e-4
    assert max_output_diff(merged, reordered, digits.x_test) < 1e-4
    plain = merge(mlps, digits, "gcca").model  # not vacuous: the reference's basis differs
    assert max_output_diff(merged, plain, digits.x_test) > 1e-2


def test_merge_of_a_permuted_family_and_of_a_model_with_itself_return_the_model(mlps, digits):
    """As gcca's test: exact on the statistics' inputs (units that never fire there are paired
    in order, so on the test set the predictions are compared)."""
    model = mlps[2]
    family = [permuted_twin(model, seed=1), model, permuted_twin(model, seed=2)]
    result = merge(family, digits, "gcca", consensus_units=True)
    assert max_output_diff(result.model, model, digits.x_train) < 1e-4
    with torch.no_grad():
        agree = (result.model(digits.x_test).argmax(1) == model(digits.x_test).argmax(1))
    assert agree.float().mean() > 0.99
    itself = merge([model, model], digits, "gcca", consensus_units=True).model
    assert max_output_diff(itself, model, digits.x_test) < 1e-4
    assert result.recipe["options"]["consensus_units"] is True


def test_the_option_is_declared_for_every_front_end():
    option = get_method("gcca").options["consensus_units"]
    assert option.default is False and option.kind is bool


def test_consensus_units_compress_to_a_target_width(mlps, digits):
    """The kept units are consensus units (picked from G*), for every model alike."""
    full = merge(mlps[:2], digits, "gcca", consensus_units=True).model
    half = merge(mlps[:2], digits, "gcca", consensus_units=True, target_width=0.5).model
    assert half.layers[3].weight.shape == (32, 32)
    full_acc = evaluate_model(full, digits.test)["accuracy"]
    assert evaluate_model(half, digits.test)["accuracy"] > full_acc - 8
