"""Models of one family whose widths differ: statistics with per-model widths, the merge into
either model's width (cca, gcca), one-line refusals for methods that need one width, the CLI
with --target-model and replay."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ccamerge import api
from ccamerge.cli import main
from ccamerge.errors import CcamergeError
from ccamerge.io import load_model, save_model
from ccamerge.methods import METHODS
from ccamerge.methods.ot import _plan_by_linprog, transport_plan
from ccamerge.models import build_model, same_architecture, widths_differ
from ccamerge.spec import build_spec
from ccamerge.stats import batch_features, collect_statistics
from ccamerge.transform import Transform, apply_transforms, reset_batchnorm


def duplicated(model: torch.nn.Module) -> torch.nn.Module:
    """A model of twice the width computing the same function: every unit of every merge point
    twice (producers ``[W; W]``), each copy read with half the weight (consumers ``[W/2, W/2]``)."""
    spec = build_spec(model)
    maps = {p.name: Transform(np.hstack([np.eye(p.width)] * 2),
                              np.vstack([np.eye(p.width) / 2] * 2)) for p in spec.points}
    wide = build_model(model.arch, **(model.config | {"width": 2 * model.config["width"]}))
    wide.load_state_dict(apply_transforms(model.state_dict(), spec, maps))
    return wide.eval()


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


def random_vgg():
    torch.manual_seed(3)
    return build_model("vgg", width=0.5).eval()


@pytest.fixture(scope="module")
def pair(mlps):
    return mlps[0], duplicated(mlps[0])


def test_the_duplicated_model_computes_the_same_function(pair, digits):
    narrow, wide = pair
    assert build_spec(wide).points[0].width == 2 * build_spec(narrow).points[0].width
    x = digits.x_train[:300]
    assert (outputs(wide, x) - outputs(narrow, x)).abs().max() < 1e-5


def test_statistics_have_each_models_width_and_match_numpy(pair, digits):
    narrow, wide = pair
    x = digits.x_train[:400]
    stats = collect_statistics([narrow, wide], build_spec(narrow), x, pairs="all")
    for point in build_spec(narrow).points:
        p = stats[point.name]
        n = point.width
        assert p.widths == [n, 2 * n] and p.mixed
        feats = [batch_features(m, build_spec(m), x)[point.name].double().numpy()
                 for m in (narrow, wide)]
        oracle = np.cov(np.hstack(feats).T)  # [3n, 3n]
        np.testing.assert_allclose(p.cov(0, 1), oracle[:n, n:], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(p.cov(1, 1), oracle[n:, n:], rtol=1e-4, atol=1e-5)
        assert stats.summary()[point.name]["widths"] == [n, 2 * n]


@pytest.mark.parametrize("method", ["cca", "gcca", "ot"])
@pytest.mark.parametrize("target", [0, 1])
def test_merging_a_duplicated_mlp_into_either_width_keeps_the_function(pair, digits, method,
                                                                       target):
    narrow, wide = pair
    x = digits.x_train[:600]
    result = api.merge([narrow, wide], x, method, target_model=target)
    assert result.model.layers[1].weight.shape == [narrow, wide][target].layers[1].weight.shape
    assert (outputs(result.model, x) - outputs(narrow, x)).abs().max() < 5e-3
    assert result.recipe["target_model"] == result.recipe["reference"] == target
    assert result.recipe["target_widths"] == {p.name: p.width
                                              for p in build_spec([narrow, wide][target]).points}


@pytest.mark.parametrize("method", ["cca", "gcca", "ot"])
@pytest.mark.parametrize("target", [0, 1])
def test_merging_a_duplicated_vgg_into_either_width_keeps_the_function(digits, method, target):
    narrow = random_vgg()
    models = [narrow, duplicated(narrow)]
    x = digits.x_train[:400]
    assert (outputs(models[1], x) - outputs(narrow, x)).abs().max() < 1e-5
    result = api.merge(models, x, method, target_model=target)
    first_conv = result.model.features[0].weight.shape
    assert first_conv == models[target].features[0].weight.shape
    assert (outputs(result.model, x) - outputs(narrow, x)).abs().max() < 1e-3


def test_a_per_unit_ridge_would_not_keep_the_function(pair, digits):
    """The oracle the ridge rule is needed for: the same ridge on both sides (absolute gamma)
    shrinks the duplicated side's directions, so the merge misses."""
    narrow, wide = pair
    x = digits.x_train[:600]
    result = api.merge([narrow, wide], x, "cca", gamma=1.0, relative=False)
    assert (outputs(result.model, x) - outputs(narrow, x)).abs().max() > 1e-2


def test_two_different_mlps_of_two_widths_merge_into_the_narrow_one(mlps, digits):
    """Two independently trained models: model 1 at x2 (its duplicated copy), merged into
    model 0's width: a narrow model that is nowhere near either endpoint's weights."""
    wide = duplicated(mlps[1])
    result = api.merge([mlps[0], wide], digits, "cca", target_model=0)
    assert result.model.layers[1].weight.shape == mlps[0].layers[1].weight.shape
    assert 0 < api.evaluate_model(result.model, digits.test)["accuracy"] <= 100


@pytest.mark.parametrize("method", [m for m in METHODS if not METHODS[m].mixed_widths])
def test_methods_that_need_one_width_refuse_in_one_line(pair, digits, method):
    with pytest.raises(CcamergeError) as err:
        api.merge(list(pair), digits.x_train[:100], method)
    line = str(err.value)
    assert "\n" not in line and method in line
    assert "hidden [64, 64] / [128, 128]" in line or "width 1.0 / 2.0" in line
    assert "ot, cca or gcca" in line


def test_interpolation_refuses_mixed_widths(pair, digits):
    with pytest.raises(CcamergeError, match="one width"):
        api.interpolate(*pair, digits, "ot")


@pytest.mark.parametrize("shape", [(6, 9), (12, 5), (7, 11)])
def test_the_transport_plan_is_optimal_against_a_linear_programme(shape):
    """Copies of units (small lcm) against scipy's LP oracle: the same marginals and cost."""
    cost = np.random.default_rng(sum(shape)).random(shape)
    plan, oracle = transport_plan(cost), _plan_by_linprog(cost)
    n, m = shape
    np.testing.assert_allclose(plan.sum(1), 1 / n)
    np.testing.assert_allclose(plan.sum(0), 1 / m)
    assert (plan >= 0).all()
    assert abs((plan * cost).sum() - (oracle * cost).sum()) < 1e-9


def test_only_width_differences_pass_the_family_check(pair):
    narrow, wide = pair
    assert widths_differ([narrow, wide]) and not widths_differ([narrow, narrow])
    same_architecture([narrow, wide], mixed_widths=True)
    with pytest.raises(CcamergeError, match="only models of one architecture"):
        same_architecture([narrow, wide])
    deeper = build_model("mlp", **(narrow.config | {"hidden": [64, 64, 64]}))
    assert not widths_differ([narrow, deeper])
    with pytest.raises(CcamergeError, match="hidden"):
        same_architecture([narrow, deeper], mixed_widths=True)


def test_target_model_and_a_different_reference_refuse(pair, digits):
    with pytest.raises(CcamergeError, match="give one of them"):
        api.merge(list(pair) + [pair[0]], digits.x_train[:100], "cca", reference=2,
                  target_model=1)
    with pytest.raises(CcamergeError, match="target_model"):
        api.merge(list(pair), digits.x_train[:100], "cca", target_model=5)


def test_repair_refuses_mixed_widths(pair, digits):
    with pytest.raises(CcamergeError, match="repair needs models of one width"):
        api.merge(list(pair), digits.x_train[:100], "cca", repair=True)


def _with_data_statistics(arch: str, x: torch.Tensor, **config) -> torch.nn.Module:
    """A random model with BatchNorm whose running statistics are those of ``x`` (what the
    merge's BatchNorm reset recomputes), so that merging it with its twin has a function to
    keep."""
    torch.manual_seed(4)
    return reset_batchnorm(build_model(arch, **config), x, batch_size=len(x)).eval()


@pytest.mark.parametrize("policy", ["mapped", "paper"])
@pytest.mark.parametrize("target", [0, 1])
@pytest.mark.parametrize("arch, config", [("vgg", {"width": 0.5, "batch_norm": True}),
                                          ("resnet20", {"width": 0.5})])
def test_batchnorm_models_of_two_widths_merge_into_either_under_each_policy(
        digits, arch, config, target, policy):
    """A BatchNorm net and its duplicated twin: both policies keep the function in either
    width (the mapped policy's per-model moments have each model's own width)."""
    x = digits.x_train[:400]
    narrow = _with_data_statistics(arch, x, **config)
    models = [narrow, duplicated(narrow)]
    result = api.merge(models, x, "cca", target_model=target, bn_policy=policy, batch_size=400)
    assert result.recipe["bn_policy"] == policy
    for point in result.statistics.self_only.values():  # mapped: from the statistics pass
        assert point.widths[1] == 2 * point.widths[0] and point.cov(1, 1).shape == (
            point.widths[1], point.widths[1])
    assert bool(result.statistics.self_only) == (policy == "mapped")
    assert (outputs(result.model, x) - outputs(narrow, x)).abs().max() < 5e-3


def _run(capsys, *argv):
    code = main([*argv, "--json", "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_merges_mixed_widths_into_the_target_and_replay_reproduces(pair, tmp_path, capsys):
    paths = [str(save_model(m, tmp_path / f"m{i}.safetensors")) for i, m in enumerate(pair)]
    out, again = tmp_path / "merged.safetensors", tmp_path / "again.safetensors"
    code, text, err = _run(capsys, "merge", *paths, "--method", "gcca", "--target-model", "1",
                           "--out", str(out))
    assert code == 0, err
    report = json.loads(text)
    assert report["target_model"] == report["reference"] == 1
    merged = load_model(out)
    assert merged.config == pair[1].config
    code, _text, err = _run(capsys, "replay", str(out), "--out", str(again))
    assert code == 0, err
    replayed = load_model(again)
    for key, value in merged.state_dict().items():
        assert torch.equal(value, replayed.state_dict()[key]), key


def test_cli_refuses_mixed_widths_for_permute_in_one_line(pair, tmp_path, capsys):
    paths = [str(save_model(m, tmp_path / f"m{i}.safetensors")) for i, m in enumerate(pair)]
    out = tmp_path / "merged.safetensors"
    code, text, err = _run(capsys, "merge", *paths, "--method", "permute", "--out", str(out))
    assert code != 0 and text == ""
    assert len(err.strip().splitlines()) == 1 and "permute needs models of one width" in err
    assert not out.exists()


def test_duplicating_units_leaves_the_spectrum_of_a_model_with_itself(pair, digits):
    """Canonical correlations of a model with its duplicated copy equal those of the model with
    itself (the ridge per canonical direction makes duplication invisible), and every unit
    matches a copy of itself."""
    narrow, wide = pair
    x = digits.x_train[:1500]
    for mixed, same in zip(api.spectrum([narrow, wide], x), api.spectrum([narrow, narrow], x),
                           strict=True):
        assert mixed["width"] == 64 and len(mixed["exact_fit"]) == 64
        np.testing.assert_allclose(mixed["shrunk"], same["shrunk"], atol=1e-5)  # float32
        np.testing.assert_allclose(mixed["exact_fit"], same["exact_fit"], atol=1e-4)
        np.testing.assert_allclose(mixed["reached_heldout"], same["reached_heldout"], atol=1e-4)
        live = 64 - mixed["dead_reference"]
        assert np.asarray(mixed["matched_heldout"])[:live].min() > 0.999
