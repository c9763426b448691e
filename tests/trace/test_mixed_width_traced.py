"""Traced models (any fx-traceable nn.Module, TorchScript archives) of one architecture whose
hidden widths differ: the family check, statistics with each model's width, the merge into
either model's widths (cca, gcca, ot), one-line refusals, the CLI with --target-model and
replay."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from helpers import run_cli
from torch import nn
from width_nets import NoSkipCNN, WidthCNN, duplicated, make

from ccamerge import api
from ccamerge.errors import CcamergeError
from ccamerge.io import load_archive_model, save_merged
from ccamerge.methods import METHODS
from ccamerge.spec import resized_spec
from ccamerge.stats import collect_statistics
from ccamerge.trace.derive import derive_and_verify
from ccamerge.trace.family import family_specs

TOL = 1e-4  # float32 forward passes after float64 maps


@torch.no_grad()
def max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    return float((a.eval()(x) - b.eval()(x)).abs().max())


@pytest.fixture(scope="module", params=[True, False], ids=["bn", "no-bn"])
def pair(request, x) -> tuple[WidthCNN, WidthCNN]:
    narrow = make(x=x, batch_norm=request.param)
    return narrow, duplicated(narrow, x)


def test_the_twin_of_double_width_computes_the_same_function(pair, x):
    narrow, wide = pair
    specs = family_specs([narrow, wide], x[:32])
    assert [p.width * 2 for p in specs[0].points] == [p.width for p in specs[1].points]
    assert specs[1] == resized_spec(specs[0], {p.name: p.width for p in specs[1].points})
    assert any(a.offset for p in specs[1].points for a in p.consumers)  # the concatenation
    assert max_diff(narrow, wide, x) < 1e-5


def test_statistics_have_each_models_width(pair, x):
    """The twin's features are the narrow ones twice: its covariance is ``[[C, C], [C, C]]``."""
    narrow, wide = pair
    spec = derive_and_verify(narrow, x[:32]).spec
    stats = collect_statistics([narrow, wide], spec, x)
    for point in spec.points:
        p, n = stats[point.name], point.width
        assert p.widths == [n, 2 * n] and p.mixed
        c = p.cov(0, 0)
        np.testing.assert_allclose(p.cov(1, 1), np.block([[c, c], [c, c]]), atol=1e-5)
        np.testing.assert_allclose(p.cov(0, 1), np.hstack([c, c]), atol=1e-5)


@pytest.mark.parametrize("method", ["cca", "gcca", "ot"])
@pytest.mark.parametrize("target", [0, 1])
def test_merging_into_either_width_keeps_the_function(pair, x, method, target):
    narrow, wide = pair
    models = [narrow, wide]
    result = api.merge(models, x, method, target_model=target)
    assert type(result.model) is WidthCNN
    shapes = {k: v.shape for k, v in result.model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in models[target].state_dict().items()}
    assert max_diff(result.model, narrow, x) < TOL
    assert result.recipe["target_model"] == result.recipe["reference"] == target
    assert result.recipe["target_widths"]["relu0"] == models[target].stem.out_channels


@pytest.mark.parametrize("target", [0, 1])
def test_the_paper_batchnorm_policy_keeps_the_function_too(pair, x, target):
    """The default policy folds BatchNorm (its vectors widened to the target); "paper" maps
    the BatchNorm vectors with the conv rows instead."""
    result = api.merge(list(pair), x, "cca", target_model=target, bn_policy="paper")
    assert max_diff(result.model, pair[0], x) < TOL


@pytest.mark.parametrize(("other", "said"), [
    ({"kernel": 5}, "stem (Conv2d): kernel_size (5, 5) vs (3, 3)"),
    ({"batch_norm": False}, "bn0: module type Identity vs BatchNorm2d"),
    ({"classes": 7}, "fc2.weight: size 7 vs 10 along axis 0"),
    ({"in_channels": 3}, "stem.weight: size 3 vs 1 along axis 1")])
def test_another_architecture_is_refused_in_one_line(x, other, said):
    with pytest.raises(CcamergeError) as err:
        api.merge([make(4), make(8, **other)], x, "cca")
    line = str(err.value)
    assert "\n" not in line and said in line and line.startswith("model 1 does not match")


def test_another_wiring_is_refused_in_one_line(x):
    torch.manual_seed(0)
    with pytest.raises(CcamergeError) as err:
        api.merge([make(4), NoSkipCNN(8).eval()], x, "cca")
    assert "\n" not in str(err.value) and "operation" in str(err.value)


@pytest.mark.parametrize("method", [m for m in METHODS if not METHODS[m].mixed_widths])
def test_methods_that_need_one_width_refuse_in_one_line(pair, x, method):
    with pytest.raises(CcamergeError) as err:
        api.merge(list(pair), x, method)
    line = str(err.value)
    assert "\n" not in line and f"{method} needs models of one width" in line
    assert "relu0 4 / 8" in line and "ot, cca or gcca" in line


def test_repair_and_interpolation_refuse_mixed_widths(pair, x):
    with pytest.raises(CcamergeError, match="repair needs models of one width"):
        api.merge(list(pair), x, "cca", repair=True)
    with pytest.raises(CcamergeError, match="interpolation needs two models of one width"):
        api.interpolate(*pair, x, "cca")


def _archive(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    return buffer.getvalue()


def test_torchscript_archives_of_two_widths_merge_into_the_target(pair, x, tmp_path):
    replays = [load_archive_model(_archive(m), x[:8]) for m in pair]
    result = api.merge(replays, x, "cca", target_model=1)
    path = save_merged(result.model, replays[1], tmp_path / "merged.ts", {"merge": result.recipe})
    merged = torch.jit.load(str(path))
    assert merged.state_dict()["fc1.weight"].shape == pair[1].fc1.weight.shape
    assert max_diff(merged, pair[0], x) < TOL


def test_cli_merges_archives_into_the_target_model_and_replay_reproduces(archive_files, digits,
                                                                        tmp_path, capsys):
    out, again = tmp_path / "merged.ts", tmp_path / "again.ts"
    code, text, err = run_cli(capsys, "merge", *archive_files, "--method", "gcca",
                           "--target-model", "1", "--out", str(out), "--trust-code")
    assert code == 0, err
    report = json.loads(text)
    assert report["target_model"] == report["reference"] == 1
    merged = torch.jit.load(str(out))
    wide = torch.jit.load(archive_files[1])
    assert {k: v.shape for k, v in merged.state_dict().items()} == \
        {k: v.shape for k, v in wide.state_dict().items()}
    assert max_diff(merged, torch.jit.load(archive_files[0]), digits.x_train[:500]) < TOL
    code, _text, err = run_cli(capsys, "replay", str(out), "--out", str(again), "--trust-code")
    assert code == 0, err
    replayed = torch.jit.load(str(again)).state_dict()
    assert all(torch.equal(v, replayed[k]) for k, v in merged.state_dict().items())


def test_cli_refuses_permute_on_archives_of_two_widths_in_one_line(archive_files, tmp_path,
                                                                  capsys):
    out = tmp_path / "merged.ts"
    code, text, err = run_cli(capsys, "merge", *archive_files, "--method", "permute", "--out",
                           str(out), "--trust-code")
    assert code != 0 and text == ""
    assert len(err.strip().splitlines()) == 1 and "permute needs models of one width" in err
    assert not out.exists()
