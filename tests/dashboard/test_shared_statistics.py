"""The dashboard's shared statistics: one pass per (models, dataset, images) whatever asks for
it, subsets picked from it equal to passes of their own, held-out images outside it, estimates
and the cancel flags."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ccamerge import api
from ccamerge.data import load_dataset
from ccamerge.models import build_model
from ccamerge.stats import collect_statistics
from ccamerge.train import default_config
from dashboard import data, jobs

SAMPLES = 401


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def mlps(digits):
    torch.manual_seed(0)
    return [build_model("mlp", **default_config("mlp", digits)) for _ in range(3)]


@pytest.fixture
def passes(monkeypatch):
    """Counts the statistics passes of the dashboard (the result cache starts empty)."""
    data.memo().clear()
    calls = []
    real = data.collect_statistics

    def spy(*args, **kwargs):
        calls.append(kwargs.get("pairs", "reference"))
        return real(*args, **kwargs)
    monkeypatch.setattr(data, "collect_statistics", spy)
    return calls


def _shared(mlps, digits, **kw):
    digests = tuple(f"d{i}" for i in range(len(mlps)))
    return data.shared_statistics(mlps, digests, digits, "digits", stats_samples=SAMPLES, **kw)


def test_one_pass_serves_every_reference_and_both_kinds_of_pairs(mlps, digits, passes):
    first = _shared(mlps, digits, reference=0)
    again = [_shared(mlps, digits, reference=r, pairs=p)
             for r in (0, 2) for p in ("reference", "all")]
    assert passes == ["all"]  # N <= 3: every pair, for the price of the reference pairs
    assert [s.reference for s in again] == [0, 0, 2, 2]
    assert all(s.points is first.points for s in again)


def test_reference_pairs_of_many_models_are_completed_by_one_pass_with_all_pairs(digits, passes):
    torch.manual_seed(1)
    four = [build_model("mlp", **default_config("mlp", digits)) for _ in range(4)]
    _shared(four, digits, reference=1)
    _shared(four, digits, reference=1)
    _shared(four, digits, reference=0, pairs="all")
    _shared(four, digits, reference=3)  # served by the pass with every pair
    assert passes == ["reference", "all"]


def test_picked_statistics_equal_a_pass_over_the_subset(mlps, digits):
    stats = _shared(mlps, digits, reference=0)
    picked = data.pick_statistics(stats, [0, 2], 1)
    x = api.subsample(api.train_source(digits), SAMPLES, data.SEED)
    pair = [mlps[0], mlps[2]]
    oracle = collect_statistics(pair, api.resolve_spec(pair, x), x, reference=1)
    assert picked.num_models == 2 and picked.reference == 1
    for name, point in oracle.points.items():
        got = picked[name]
        assert got.count == point.count
        for i, j in ((0, 0), (1, 1), (1, 0)):
            np.testing.assert_allclose(got.cov(i, j), point.cov(i, j), rtol=1e-6, atol=1e-9)


def test_held_out_images_lie_outside_the_statistics_images(digits):
    used = data.statistics_indices(digits, SAMPLES)
    held = data.held_out_indices(digits, SAMPLES)
    assert len(used) == SAMPLES and 0 < len(held) <= data.HELD_OUT_SAMPLES
    assert not set(used) & set(held)
    subset = api.subsample(api.train_source(digits), SAMPLES, data.SEED)
    assert torch.equal(subset.inputs(), digits.train.subset(used).inputs())
    assert data.held_out_indices(digits, None) is None  # every image is in the statistics
    assert data.held_out_indices(digits, len(digits.train) - 10) is None  # too few left


def test_scores_use_the_chosen_test_images(digits):
    cut = data.scored(digits, 100)
    assert len(cut.test) == 100 and len(cut.train) == len(digits.train)
    assert data.scored(digits, None) is digits and data.scored(digits, 10**6) is digits
    assert data.effective_samples(0, 50) is None and data.effective_samples(20, 50) == 20


def test_a_stopped_diagnosis_stores_nothing_and_the_next_one_runs(mlps, digits, passes):
    class Stop(BaseException):  # what Streamlit raises in a script that is being stopped
        pass

    def stop_at_partial_merges(_fraction, message):
        if message == "partial merges":
            raise Stop

    digests = ("d0", "d1")
    common = dict(reference=0, bn_reset=False, stats_samples=SAMPLES, test_samples=200)
    with pytest.raises(Stop):
        data.diagnosis(mlps[:2], digests, digits, "digits", "cca", {}, **common,
                       progress=stop_at_partial_merges)
    report = data.diagnosis(mlps[:2], digests, digits, "digits", "cca", {}, **common)
    assert "points" in report and len(passes) == 1  # the statistics were kept, nothing else


def test_cancel_flags_follow_the_signature():
    store: dict = {}
    assert not jobs.is_cancelled(store, "diagnose", "a")
    jobs.cancel(store, "diagnose", "a")
    assert jobs.is_cancelled(store, "diagnose", "a")
    assert not jobs.is_cancelled(store, "diagnose", "b")  # other settings run again
    assert not jobs.is_cancelled(store, "merge", "a")
    jobs.resume(store, "diagnose")
    assert not jobs.is_cancelled(store, "diagnose", "a")


def test_estimates_scale_with_the_work():
    one = jobs.estimate_seconds(1e-3, stats_forwards=2000, forwards=0)
    assert one == pytest.approx(2.0 * jobs.STATS_COST * jobs.MARGIN)
    assert jobs.estimate_seconds(1e-3, stats_forwards=4000, forwards=1000) == pytest.approx(
        2 * one + jobs.MARGIN)
    assert jobs.estimate_text(0.2) == "under a second"
    assert jobs.estimate_text(12.4) == "about 12 s" and jobs.estimate_text(300) == "about 5 min"


def test_channels_last_copies_merge_to_the_same_weights_bit_for_bit(pinned_layout, digits):
    torch.manual_seed(2)
    vggs = [build_model("vgg", **default_config("vgg", digits)) for _ in range(2)]
    fast = data.fast(vggs)
    assert fast[0].features[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = digits.x_test[:64]
    torch.testing.assert_close(fast[0](x), vggs[0](x), rtol=1e-5, atol=1e-5)
    stats = data.shared_statistics(vggs, ("v0", "v1"), digits, "digits", reference=0,
                                   stats_samples=SAMPLES)
    got = api.merge(fast, digits, "cca", stats_samples=SAMPLES, statistics=stats).model
    want = api.merge(vggs, digits, "cca", stats_samples=SAMPLES).model
    assert all(torch.equal(got.state_dict()[k], v) for k, v in want.state_dict().items())


def test_shared_statistics_carry_the_batchnorm_moments_and_merges_need_no_pass_for_them(
        digits, monkeypatch):
    """A BatchNorm selection's shared pass measures the mapped reset's moments (each model with
    itself), a subset picks them, and a merge on them runs no pass per model."""
    import ccamerge.api as api_module
    from ccamerge.batchnorm import carried_moments, moment_batchnorms, output_moments

    data.memo().clear()
    torch.manual_seed(4)
    vggs = [build_model("vgg", **(default_config("vgg", digits) | {"batch_norm": True,
                                                                   "width": 0.5}))
            for _ in range(3)]
    bns = moment_batchnorms(vggs[0])
    stats = data.shared_statistics(vggs, ("b0", "b1", "b2"), digits, "digits", reference=0,
                                   stats_samples=SAMPLES)
    picked = data.pick_statistics(stats, [2, 0], 0)
    x = api.subsample(api.train_source(digits), SAMPLES, data.SEED)
    for mine, theirs in zip(carried_moments(picked, bns),
                            output_moments([vggs[2], vggs[0]], bns, x), strict=True):
        for bn in bns:
            np.testing.assert_allclose(mine[bn][1], theirs[bn][1], rtol=1e-9, atol=1e-12)
    monkeypatch.setattr(api_module, "output_moments", lambda *a, **k: pytest.fail("extra pass"))
    merged = data.merge(vggs[:2], ("b0", "b1"), digits, "digits", "cca", {}, reference=0,
                        bn_reset=True, stats_samples=SAMPLES, test_samples=100,
                        statistics=data.pick_statistics(stats, [0, 1], 0))
    assert merged["recipe"]["bn_policy"] == "mapped"
