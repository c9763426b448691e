"""The official code's details as merge options: stream statistics read at the last block of
each stage, and base models' BatchNorm statistics reset before merging."""

import json

import numpy as np
import pytest
import torch

from ccamerge.api import align, merge, reset_base_models
from ccamerge.cli import main
from ccamerge.errors import CcamergeError
from ccamerge.evaluate import with_bn_reset
from ccamerge.io import load_model, save_model
from ccamerge.spec import build_spec, with_stream_points
from ccamerge.stats import batch_features


def test_last_keeps_each_streams_last_block_and_nothing_else(resnets):
    spec = build_spec(resnets[0])
    last = with_stream_points(spec, "last")
    assert with_stream_points(spec, "pooled") is spec
    for before, after in zip(spec.points, last.points, strict=True):
        assert after.features == before.features[-1:]
        assert (after.name, after.producers, after.consumers) == (
            before.name, before.producers, before.consumers)
    assert last.point("stream1").features == ("stages.0.1.relu2",)
    assert len(spec.point("stream1").features) == 3  # the stem and two blocks, pooled
    with pytest.raises(CcamergeError, match="stream_points"):
        with_stream_points(spec, "first")


def test_last_block_statistics_are_that_modules_moments(resnets, digits):
    x = digits.x_train[:100]
    stats = align(resnets, x, "permute", stream_points="last").statistics
    pooled = align(resnets, x, "permute").statistics
    samples = batch_features(resnets[0], with_stream_points(build_spec(resnets[0]), "last"),
                             x)["stream2"].double().numpy()
    np.testing.assert_allclose(stats["stream2"].mean[0], samples.mean(0), atol=1e-5)
    np.testing.assert_allclose(stats["stream2"].cov(0, 0), np.cov(samples.T), atol=1e-5)
    assert pooled["stream2"].count == 2 * stats["stream2"].count  # shortcut stage: 2 blocks
    assert pooled["block1.1"].count == stats["block1.1"].count


def test_reset_base_bn_merges_the_reset_models_and_leaves_the_callers(resnets, digits):
    before = [{k: t.clone() for k, t in m.state_dict().items()} for m in resnets]
    result = merge(resnets, digits, "permute", reset_base_bn=True, stats_samples=300)
    wanted = merge([with_bn_reset(m, digits.train) for m in resnets], digits, "permute",
                   stats_samples=300)
    state = result.model.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in wanted.model.state_dict().items())
    assert result.recipe["reset_base_bn"] and not wanted.recipe["reset_base_bn"]
    for model, saved in zip(resnets, before, strict=True):
        assert all(torch.equal(t, saved[k]) for k, t in model.state_dict().items())


def test_reset_base_models_recompute_the_running_statistics(resnets, digits, mlps):
    (reset,) = reset_base_models(resnets[:1], digits.x_train[:200])
    bn = dict(reset.named_modules())["bn"]
    x = digits.x_train[:200]
    with torch.no_grad():
        out = resnets[0].conv(x)
    np.testing.assert_allclose(bn.running_mean.numpy(), out.mean((0, 2, 3)).numpy(), atol=1e-5)
    assert reset_base_models(mlps[:1], x)[0] is mlps[0]  # nothing to reset


@pytest.fixture(scope="module")
def bn_files(resnets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bn_zoo")
    return [str(save_model(m, folder / f"r{i}.safetensors")) for i, m in enumerate(resnets)]


def test_the_cli_records_the_options_and_replay_reproduces_them(bn_files, tmp_path, capsys):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    flags = ["--bn-policy", "mapped", "--reset-base-bn", "--stream-points", "last",
             "--stats-samples", "300"]
    assert main(["merge", *bn_files, "--method", "cca", *flags, "--out", str(first),
                 "--json", "--quiet"]) == 0
    shown = json.loads(capsys.readouterr().out)
    recipe = load_model(first).info["merge"]
    for key, value in (("bn_policy", "mapped"), ("reset_base_bn", True),
                       ("stream_points", "last")):
        assert shown[key] == recipe[key] == value
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    assert main(["replay", str(tmp_path / "recipe.json"), "--out", str(second), "--quiet"]) == 0
    a, b = load_model(first).state_dict(), load_model(second).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    default = tmp_path / "c.safetensors"
    assert main(["merge", *bn_files, "--method", "cca", "--stats-samples", "300",
                 "--out", str(default), "--quiet"]) == 0
    c = load_model(default).state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the options change the merge


@pytest.mark.parametrize("flags", [["--reset-base-bn"], ["--stream-points", "last"]])
def test_interpolate_refuses_the_merge_only_options(bn_files, capsys, flags):
    assert main(["interpolate", *bn_files, *flags]) != 0
    err = capsys.readouterr().err
    assert "available for merge, not interpolate" in err and len(err.strip().splitlines()) == 1


def test_a_recipe_with_a_bad_option_is_refused_before_any_work(bn_files, tmp_path, capsys):
    recipe = {"method": "permute", "models": bn_files, "data": {"name": "digits"},
              "stream_points": "middle"}
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    out = tmp_path / "out.safetensors"
    assert main(["replay", str(tmp_path / "r.json"), "--out", str(out)]) != 0
    assert "stream_points" in capsys.readouterr().err and not out.exists()
    recipe["stream_points"], recipe["bn_policy"] = "pooled", "fold"
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    assert main(["replay", str(tmp_path / "r.json"), "--out", str(out)]) != 0
    assert "replaced by 'mapped'" in capsys.readouterr().err and not out.exists()
