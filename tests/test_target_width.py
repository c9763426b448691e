"""Merging into a chosen width (``target_width``): a duplicated model compressed back to its own
width keeps the function, the reference's width is the target_model merge, compression beats
truncating units, BatchNorm under both policies, one-line refusals, the CLI and replay."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_mixed_widths import _run, duplicated, outputs

from ccamerge import api, target
from ccamerge.errors import CcamergeError
from ccamerge.evaluate import evaluate_model
from ccamerge.io import load_model, save_model
from ccamerge.methods.narrow import pivot_units, unmerge


def equal_states(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("method", ["cca", "gcca"])
def test_a_duplicated_reference_compressed_to_its_twins_width_keeps_the_function(mlps, digits,
                                                                                method):
    narrow = mlps[0]
    wide = duplicated(narrow)  # width 2.0: every unit twice
    x = digits.x_train[:600]
    result = api.merge([narrow, wide], x, method, target_model=1, target_width=1.0)
    assert result.model.config == narrow.config
    assert result.recipe["target_widths"] == target.point_widths(narrow)
    assert (outputs(result.model, x) - outputs(narrow, x)).abs().max() < 1e-4
    kept = result.alignment.details["fc1"][0]["kept_units"]
    assert sorted(set(np.asarray(kept) % 64)) == list(range(64))  # one copy of every unit


@pytest.mark.parametrize("method", ["cca", "gcca"])
def test_the_references_width_is_the_target_model_merge(pair_of_widths, digits, method):
    narrow, wide = pair_of_widths
    x = digits.x_train[:500]
    by_width = api.merge([wide, narrow], x, method, target_width=1.0)
    by_model = api.merge([wide, narrow], x, method, target_model=1)
    assert by_width.model.config == by_model.model.config == narrow.config
    assert equal_states(by_width.model, by_model.model)
    assert by_width.recipe["reference"] == 1
    assert by_width.recipe["target_width"] == 1.0 and by_model.recipe["target_width"] is None
    assert by_width.recipe["target_widths"] == by_model.recipe["target_widths"]


@pytest.fixture(scope="module")
def pair_of_widths(mlps):
    """Model 1 of the session at width 1.0 and a duplicated copy of model 0 at width 2.0."""
    return mlps[1], duplicated(mlps[0])


@pytest.mark.parametrize("method", ["cca", "gcca"])
def test_compression_beats_truncating_units(mlps, digits, method):
    """Two x1 MLPs into half and a quarter of the width: well above the full-width merge with
    units dropped, and within a few points of the full-width merge."""
    models = mlps[:2]
    full = api.merge(models, digits, method).model
    full_acc = evaluate_model(full, digits.test)["accuracy"]
    for width in (0.5, 0.25):
        merged = api.merge(models, digits, method, target_width=width).model
        assert merged.layers[3].weight.shape == (round(64 * width), round(64 * width))
        acc = evaluate_model(merged, digits.test)["accuracy"]
        baseline = evaluate_model(target.truncated(full, width), digits.test)["accuracy"]
        assert acc > baseline + 20 and acc > full_acc - 8, (width, acc, baseline, full_acc)


def test_pivoting_keeps_the_units_that_span_the_loadings():
    """A unit whose loadings repeat another's is never kept beside it; the least-squares
    unmerge of a selection reconstructs a duplicated feature exactly."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, 3))
    loadings = np.hstack([base, base[:, :1], 1e-3 * base[:, 1:2]])  # unit 3 = unit 0, 4 ~ 0
    assert list(pivot_units(loadings, 3)) == [0, 1, 2]
    x = rng.standard_normal((500, 3))
    feats = np.hstack([x, x])  # [500, 6]
    T = np.eye(6)[:, :3]
    B = unmerge(feats.T @ feats / len(feats), T)
    np.testing.assert_allclose(feats @ T @ B, feats, atol=1e-6)


@pytest.mark.parametrize("policy", ["paper", "mapped"])
def test_batchnorm_nets_compress_under_both_policies(vgg_bn, digits, policy):
    result = api.merge(vgg_bn, digits, "cca", target_width=0.25, bn_policy=policy)
    bn = result.model.features[1]
    assert bn.num_features == 4 and result.model.config["width"] == 0.25
    assert int(bn.num_batches_tracked) > 0  # the reset ran on the merged model
    assert torch.isfinite(bn.running_var).all() and (bn.running_var > 0).all()
    assert evaluate_model(result.model, digits.test)["accuracy"] > 20  # 10 classes: chance 10


def test_residual_nets_compress(resnets, digits):
    result = api.merge(resnets, digits.x_train[:300], "gcca", target_width=0.25)
    assert result.model.fc.weight.shape == (10, 16)
    assert torch.isfinite(result.model(digits.x_test[:8])).all()


@pytest.mark.parametrize("kwargs, words", [
    ({"method": "permute", "target_width": 0.5}, "only cca and gcca"),
    ({"method": "cca", "target_width": 1.5}, "the largest allowed is 1"),
    ({"method": "cca", "target_width": 0.0}, "positive number"),
    ({"method": "cca", "target_width": float("nan")}, "positive number"),
    ({"method": "cca", "target_width": 0.5, "repair": True}, "repair"),
])
def test_refusals_are_one_line(mlps, digits, kwargs, words):
    with pytest.raises(CcamergeError) as err:
        api.merge(mlps[:2], digits.x_train[:100], **kwargs)
    assert "\n" not in str(err.value) and words in str(err.value)


def test_the_largest_width_is_the_narrowest_models(mlps):
    assert target.largest_width([mlps[0], duplicated(mlps[1])], 1) == 0.5 * 2.0
    assert target.largest_width([duplicated(mlps[1]), mlps[0]], 0) == 1.0


def test_cli_merges_into_a_target_width_and_replay_reproduces(mlps, tmp_path, capsys):
    paths = [str(save_model(m, tmp_path / f"m{i}.safetensors")) for i, m in enumerate(mlps[:2])]
    out, again = tmp_path / "merged.safetensors", tmp_path / "again.safetensors"
    code, text, err = _run(capsys, "merge", *paths, "--method", "gcca", "--target-width", "0.5",
                           "--out", str(out))
    assert code == 0, err
    report = json.loads(text)
    assert report["target_width"] == 0.5 and report["target_widths"] == {"fc1": 32, "fc2": 32}
    merged = load_model(out)
    assert merged.config["width"] == 0.5 and merged.layers[3].weight.shape == (32, 32)
    code, _text, err = _run(capsys, "replay", str(out), "--out", str(again))
    assert code == 0, err
    assert equal_states(merged, load_model(again))


def test_cli_refuses_a_method_that_cannot_narrow_in_one_line(mlps, tmp_path, capsys):
    paths = [str(save_model(m, tmp_path / f"m{i}.safetensors")) for i, m in enumerate(mlps[:2])]
    out = tmp_path / "merged.safetensors"
    code, text, err = _run(capsys, "merge", *paths, "--method", "ot", "--target-width", "0.5",
                           "--out", str(out))
    assert code != 0 and text == "" and not out.exists()
    assert len(err.strip().splitlines()) == 1 and "ot cannot merge into a chosen width" in err
