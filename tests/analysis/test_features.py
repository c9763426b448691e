"""Feature-matching quantities: permutations are one-to-one, uniform maps are spread."""

import numpy as np
import pytest

from ccamerge.analysis.features import (
    agreement,
    agreement_rate,
    aligned_correlations,
    aligned_units,
    block_reduce,
    correlation_units,
    feature_matching,
    k90,
    mix_vs_match,
    participation_ratio,
    permutation_matrix,
    reorder_by_matching,
    top1_share,
)
from ccamerge.errors import CcamergeError
from ccamerge.stats import PointStatistics


def test_permutation_is_one_to_one():
    perm = np.random.default_rng(0).permutation(12)
    t = permutation_matrix(perm)
    np.testing.assert_allclose(top1_share(t), 1.0)
    np.testing.assert_allclose(participation_ratio(t), 1.0)
    np.testing.assert_array_equal(k90(t), 1)
    assert agreement(t, perm).all()
    assert agreement_rate(t, perm) == 1.0


def test_uniform_is_spread_over_all_units():
    n = 10
    t = np.full((n, n), 0.3)
    np.testing.assert_allclose(participation_ratio(t), n)
    np.testing.assert_allclose(top1_share(t), 1.0 / n)
    np.testing.assert_array_equal(k90(t), 9)


def test_signs_and_scale_do_not_change_spread():
    perm = np.array([2, 0, 1])
    t = permutation_matrix(perm) * np.array([-3.0, 0.5, 2.0])
    np.testing.assert_allclose(participation_ratio(t), 1.0)
    assert agreement_rate(t, perm) == 1.0


def test_zero_column_is_nan_and_not_counted():
    t = permutation_matrix(np.array([1, 0, 2]))
    t[:, 2] = 0.0
    assert np.isnan(top1_share(t)[2]) and np.isnan(participation_ratio(t)[2])
    assert k90(t)[2] == 0
    assert agreement_rate(t, np.array([1, 0, 2])) == 1.0


def test_correlation_units_scales_rows_and_columns():
    t = np.ones((2, 3))
    out = correlation_units(t, std_x=np.array([1.0, 2.0, 0.0]), std_y=np.array([3.0, 1.0]))
    np.testing.assert_allclose(out, [[3.0, 1.5, 0.0], [1.0, 0.5, 0.0]])
    with pytest.raises(CcamergeError):
        correlation_units(t, std_x=np.ones(2), std_y=np.ones(2))


def test_reorder_puts_matches_on_the_diagonal():
    perm = np.array([2, 0, 1])
    corr = np.zeros((3, 3))
    corr[np.arange(3), perm] = [0.9, 0.8, 0.7]
    np.testing.assert_allclose(np.diag(reorder_by_matching(corr, perm)), [0.9, 0.8, 0.7])


def test_block_reduce_limits_size_and_keeps_means():
    m = np.arange(300 * 260, dtype=float).reshape(300, 260)
    out, rows, cols = block_reduce(m, max_size=128)
    assert out.shape[0] <= 128 and out.shape[1] <= 128
    assert rows[0] == 0 and cols[0] == 0
    np.testing.assert_allclose(out[0, 0], m[:3, :3].mean())
    small, _, _ = block_reduce(np.eye(5), max_size=128)
    np.testing.assert_allclose(small, np.eye(5))
    strongest, _, _ = block_reduce(np.array([[0.1, -0.9], [0.2, 0.3]]), max_size=1, how="absmax")
    np.testing.assert_allclose(strongest, [[-0.9]])


def _point_from_features(x: np.ndarray, y: np.ndarray) -> PointStatistics:
    """PointStatistics of two models whose features are ``x`` and ``y`` ``[S, n]``."""
    joint = np.cov(np.hstack([x, y]).T)  # [2n, 2n]
    n = x.shape[1]
    covs = {(0, 0): joint[:n, :n], (1, 1): joint[n:, n:], (0, 1): joint[:n, n:]}
    return PointStatistics("fc1", n, len(x), [x.mean(0), y.mean(0)], covs)


def test_feature_matching_recovers_a_scaled_permutation():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, 6))
    perm = rng.permutation(6)
    y = np.empty_like(x)
    y[:, perm] = x * np.array([1.0, 2.0, 0.5, 3.0, 1.0, 4.0])  # model unit perm[j] = 2 * ref unit j
    fm = feature_matching(_point_from_features(x, y), 0, 1, gamma=1e-6)
    np.testing.assert_array_equal(fm.perm, perm)
    np.testing.assert_allclose(np.diag(fm.corr_matched), 1.0, atol=1e-9)
    np.testing.assert_allclose(fm.top1, 1.0, atol=1e-6)
    np.testing.assert_allclose(fm.participation, 1.0, atol=1e-6)
    assert fm.agreement == 1.0
    np.testing.assert_allclose(np.abs(fm.T_tilde), fm.perm_matrix, atol=1e-4)
    assert fm.summary()["agreement"] == 1.0


def test_feature_matching_sees_a_rotation_as_spread():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4000, 4))
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    fm = feature_matching(_point_from_features(x, x @ q), 0, 1, gamma=1e-6)
    np.testing.assert_allclose(fm.rho, 1.0, atol=1e-6)
    assert np.mean(fm.participation) > 1.3


def stats_of(x: np.ndarray, y: np.ndarray) -> PointStatistics:
    c = np.cov(np.hstack([x, y]), rowvar=False)
    n = x.shape[1]
    return PointStatistics("p", n, len(x), [x.mean(0), y.mean(0)],
                           {(0, 0): c[:n, :n], (1, 1): c[n:, n:], (0, 1): c[:n, n:]})


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(a.shape[1])])


def test_aligned_correlations_are_pearson_correlations_of_the_mapped_samples():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6))
    y = x @ rng.standard_normal((6, 6)) + rng.standard_normal((500, 6))
    t, perm = rng.standard_normal((6, 6)), rng.permutation(6)
    point = stats_of(x, y)
    np.testing.assert_allclose(aligned_correlations(t, point, 0, 1), pearson(x, y @ t), atol=1e-9)
    np.testing.assert_allclose(aligned_correlations(permutation_matrix(perm), point, 0, 1),
                               point.corr(0, 1)[np.arange(6), perm], atol=1e-9)
    np.testing.assert_allclose(mix_vs_match(t, perm, point, 1), pearson(y @ t, y[:, perm]),
                               atol=1e-9)


def test_aligned_units_of_a_mixed_copy_cca_reproduces_what_a_permutation_cannot():
    rng = np.random.default_rng(1)
    mix = np.eye(8) + 0.6 * rng.standard_normal((8, 8))  # every unit of Y mixes several of X
    x_fit, x_held = rng.standard_normal((2000, 8)), rng.standard_normal((800, 8))
    units = aligned_units(stats_of(x_fit, x_fit @ mix), stats_of(x_held, x_held @ mix), 0, 1,
                          gamma=1e-6, relative=True)
    means = units.means()
    assert units.held_out and means["cca"] > 0.999 and means["permute"] < 0.9
    assert units.participation > 1.5
    np.testing.assert_allclose(units.variance, np.diag(np.cov(x_held, rowvar=False)))
    same = aligned_units(stats_of(x_fit, x_fit), None, 0, 1)  # a copy: both methods are exact
    assert not same.held_out
    np.testing.assert_allclose([same.means()["cca"], same.means()["permute"]], 1.0, atol=1e-6)


def test_dead_units_give_nan_and_do_not_count():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 4))
    x[:, 3] = 0.0
    units = aligned_units(stats_of(x, x), None, 0, 1)
    assert np.isnan(units.cca[3]) and np.isnan(units.permute[3])
    assert units.means()["permute"] == pytest.approx(1.0)
