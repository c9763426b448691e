import dataclasses

import pytest
import torch

from ccamerge.analysis.checklist import findings_for
from ccamerge.analysis.diagnose import diagnose, merged_prefix, partial_state, sweep
from ccamerge.api import merge
from ccamerge.evaluate import evaluate_model
from ccamerge.models import build_model
from ccamerge.spec import build_spec


def _ids(report, severity="failure"):
    return [f["id"] for f in report["findings"] if f["severity"] == severity]


def test_healthy_merge_of_two_seeds_reports_no_failure(mlps, digits):
    report = diagnose(mlps[:2], digits, "cca")
    assert report["healthy"] and _ids(report) == []
    assert report["findings"][-1]["id"] in ("healthy", "merge_gap")
    assert [p["name"] for p in report["points"]] == ["fc1", "fc2"]
    assert sorted(report["ranking"]) == ["fc1", "fc2"]
    for finding in report["findings"]:
        assert finding["title"] and finding["next_step"] and finding["chart"]


def test_merge_with_an_untrained_model_names_it(mlps, digits):
    torch.manual_seed(0)
    untrained = build_model("mlp", **mlps[0].config)
    report = diagnose([mlps[0], untrained], digits, "cca")
    assert not report["healthy"]
    assert _ids(report)[0] == "undertrained"
    assert "Model 1" in report["findings"][0]["title"]


def test_batchnorm_reset_switched_off_is_reported(vgg_bn, digits):
    report = diagnose(vgg_bn, digits, "permute", bn_reset=False, stats_samples=300)
    assert "bn_not_reset" in _ids(report)
    assert (diagnose(vgg_bn, digits, "permute", stats_samples=300)["findings"][0]["id"]
            != "bn_not_reset")


@pytest.mark.parametrize("policy", ["paper", "mapped"])
def test_cca_on_a_batchnorm_net_is_checked_against_permutation(vgg_bn, digits, policy):
    """The report scores the permutation merge from the same statistics, under the same
    BatchNorm policy, and its merged model is the one ``merge`` builds."""
    report = diagnose(vgg_bn, digits, "cca", stats_samples=300, bn_policy=policy)
    permuted = merge(vgg_bn, digits, "permute", stats_samples=300, bn_policy=policy).model
    merged = merge(vgg_bn, digits, "cca", stats_samples=300, bn_policy=policy).model
    check = report["permute_check"]["accuracy"]
    assert check == pytest.approx(
        evaluate_model(permuted, digits.x_test, digits.y_test)["accuracy"])
    assert report["merged"]["accuracy"] == pytest.approx(
        evaluate_model(merged, digits.x_test, digits.y_test)["accuracy"])
    assert report["bn_policy"] == policy


def test_dense_maps_losing_to_permutation_under_the_paper_policy_point_to_mapped(vgg_bn, mlps,
                                                                                digits):
    """On these BatchNorm VGGs CCA under the paper's BatchNorm handling loses to permutation
    matching (the transformed scale vectors are not the mapped features' scales); the finding
    names the cause and the mapped policy, which recovers it."""
    report = diagnose(vgg_bn, digits, "cca", stats_samples=300, bn_policy="paper")
    check = report["permute_check"]["accuracy"]
    assert check - report["merged"]["accuracy"] >= 2.0
    finding = next(f for f in report["findings"] if f["id"] == "dense_batchnorm")
    assert f"{check:.1f}%" in finding["title"] and "mapped" in finding["next_step"]
    mapped = diagnose(vgg_bn, digits, "cca", stats_samples=300)
    assert mapped["merged"]["accuracy"] > report["merged"]["accuracy"] + 2.0
    assert "permute_check" not in diagnose(mlps[:2], digits, "cca")  # no BatchNorm, no check


def test_far_too_few_statistic_samples_are_reported(mlps, digits):
    report = diagnose(mlps[:2], digits, "cca", stats_samples=60)
    assert "few_samples" in _ids(report)
    assert "per feature" in next(f for f in report["findings"] if f["id"] == "few_samples")["title"]


def test_plain_averaging_shows_collapse(mlps, digits):
    report = diagnose(mlps[:2], digits, "average")
    ratios = [p["variance_ratio"] for p in report["points"]]
    aligned = [p["variance_ratio"] for p in diagnose(mlps[:2], digits, "permute")["points"]]
    assert ratios[-1] < aligned[-1]  # unaligned averaging shrinks the deep layer's variance more


def test_partial_merges_run_from_the_reference_to_the_merge(mlps, digits):
    spec = build_spec(mlps[0])
    assert merged_prefix(spec, 0) == set()
    assert merged_prefix(spec, 1) == {"layers.1.weight", "layers.1.bias"}
    result = merge(mlps[:2], digits, "permute")
    ref_state = mlps[0].state_dict()
    merged_state = result.model.state_dict()
    assert all(torch.equal(v, ref_state[k])
               for k, v in partial_state(ref_state, merged_state, spec, 0).items())
    full = partial_state(ref_state, merged_state, spec, len(spec.points))
    assert all(torch.equal(v, merged_state[k]) for k, v in full.items())
    report = diagnose(mlps[:2], digits, "permute")
    assert report["points"][-1]["partial_accuracy"] == pytest.approx(report["merged"]["accuracy"])


def test_sweep_selects_on_held_out_training_data_not_the_test_set(mlps, digits):
    grid = [{"gamma": g, "relative": True} for g in (1e-3, 1e-1, 10.0)]
    result = sweep(mlps[:2], digits, "cca", grid=grid)
    assert result["best"] in grid and len(result["accuracy"]) == 3
    assert "held-out" in result["selected_on"]
    scrambled = dataclasses.replace(digits, y_test=digits.y_test.flip(0), x_test=digits.x_test * 0)
    assert sweep(mlps[:2], scrambled, "cca", grid=grid)["accuracy"] == result["accuracy"]


def test_sweep_scores_explicit_validation_images(mlps, digits):
    """With ``validation`` given, exactly those images are scored (oracle: evaluate_model of the
    merge built from all training images) and the test set plays no part."""
    grid = [{"gamma": 0.1, "relative": True}]
    fit = dataclasses.replace(digits, x_train=digits.x_train[:800], y_train=digits.y_train[:800],
                              x_test=digits.x_test * 0)
    held = (digits.x_train[800:1100], digits.y_train[800:1100])
    result = sweep(mlps[:2], fit, "cca", grid=grid, validation=held)
    merged = merge(mlps[:2], fit, "cca", gamma=0.1, relative=True).model
    assert result["accuracy"][0] == pytest.approx(evaluate_model(merged, *held)["accuracy"])
    assert result["selected_on"] == "300 held-out images"


def test_diagnose_with_sweep_scores_the_default_grid(mlps, digits):
    report = diagnose(mlps[:2], digits, "cca", with_sweep=True)
    assert len(report["sweep"]["grid"]) == 8 and len(report["sweep"]["accuracy"]) == 8
    assert report["sweep"]["current"]["options"] == report["options"]


def test_a_sweep_optimum_on_the_grid_edge_is_flagged(mlps, digits):
    report = diagnose(mlps[:2], digits, "cca", gamma=0.1)
    assert "gamma_extreme" not in _ids(report, "warning")
    # with two grid points, whichever wins lies on an edge of the grid searched
    grid = [{"gamma": 0.01, "relative": True}, {"gamma": 1.0, "relative": True}]
    report["sweep"] = sweep(mlps[:2], digits, "cca", grid=grid)
    assert report["sweep"]["best_at_edge"] and report["sweep"]["parameter"] == "gamma"
    flagged = [f for f in findings_for(report) if f["id"] == "gamma_extreme"]
    assert len(flagged) == 1 and "edge" in flagged[0]["title"]
    report["sweep"]["best_at_edge"] = False
    assert not [f for f in findings_for(report) if f["id"] == "gamma_extreme"]


def test_diagnosed_merge_is_the_merge(mlps, digits):
    report = diagnose(mlps[:2], digits, "cca")
    merged = merge(mlps[:2], digits, "cca").model
    assert report["merged"]["accuracy"] == pytest.approx(
        evaluate_model(merged, digits.x_test, digits.y_test)["accuracy"])
