"""The Merge page's run (dashboard.merging) without the UI: its recipes are api.merge's, and
``ccamerge replay`` of a downloaded recipe writes the downloaded weights."""

from __future__ import annotations

import json

import pytest
import torch

from ccamerge import cli
from ccamerge.io import load_model, load_model_bytes, save_model
from dashboard import data, merging, registry

ADDED = {"model_names", "replay"}  # what the dashboard adds to api's recipe (sha256: api's own)


def quiet_step(_index: int, _label: str):
    return lambda _fraction, _message: None


@pytest.fixture
def vgg_inputs(vgg_bn, digits, tmp_path) -> registry.Inputs:
    """The two BatchNorm VGGs as saved files, selected with model 1 as the reference."""
    entries = []
    for k, model in enumerate(vgg_bn):
        path = save_model(model, tmp_path / f"vgg{k}.safetensors")
        digest = registry.sha256(path.read_bytes())
        entries.append(registry.ModelEntry(digest[:16], digest, f"vgg {k}", path.name, "upload",
                                           str(path)))
    return registry.Inputs(entries, [e.model() for e in entries],
                           tuple(e.digest for e in entries), 1, data.dataset("digits"), "digits",
                           "digits")


def _run(inputs, policy: str) -> dict:
    results = merging.run(inputs, ["permute"], {}, bn_reset=True, repair=False,
                          stats_samples=None, curve=False, step=quiet_step, bn_policy=policy)
    assert not results["errors"], results["errors"]
    return results


def test_the_download_recipe_is_the_api_recipe_and_keeps_bn_policy(vgg_inputs, tmp_path,
                                                                    monkeypatch):
    results = {policy: _run(vgg_inputs, policy) for policy in ("paper", "mapped")}
    recipe = json.loads(results["mapped"]["recipes"]["permute"])
    merged = data.merge(vgg_inputs.models, vgg_inputs.digests, vgg_inputs.data, "digits",
                        "permute", {}, reference=1, bn_reset=True, bn_policy="mapped",
                        stats_samples=None, sources=[e.path for e in vgg_inputs.entries])
    portable = {"models": [e.filename for e in vgg_inputs.entries]}  # the names users gave
    assert {k: v for k, v in recipe.items() if k not in ADDED} == merged["recipe"] | portable
    assert recipe["bn_policy"] == "mapped" and recipe["reference"] == 1
    assert recipe["models"] == ["vgg0.safetensors", "vgg1.safetensors"]
    assert recipe["model_sha256"] == list(vgg_inputs.digests)
    downloaded = load_model_bytes(results["mapped"]["files"]["permute"], "merged.safetensors")
    assert downloaded.info["merge"] == recipe
    paper = load_model_bytes(results["paper"]["files"]["permute"], "merged.safetensors")
    assert any(not torch.equal(t, paper.state_dict()[k])  # the policy matters for these nets
               for k, t in downloaded.state_dict().items())
    (tmp_path / "recipe.json").write_text(results["mapped"]["recipes"]["permute"])
    out = tmp_path / "replayed.safetensors"
    monkeypatch.chdir(tmp_path)  # the folder holding the files the recipe names
    assert cli.main(["replay", str(tmp_path / "recipe.json"), "--out", str(out), "--quiet"]) == 0
    replayed = load_model(out).state_dict()
    assert all(torch.equal(t, replayed[k]) for k, t in downloaded.state_dict().items())
    assert load_model(out).info["merge"]["bn_policy"] == "mapped"


def test_a_signature_changes_with_the_bn_policy(vgg_inputs):
    args = (vgg_inputs, ["permute"], {}, True, False, None, False)
    assert merging.signature(*args) == merging.signature(*args, "mapped")
    assert merging.signature(*args) != merging.signature(*args, "paper")


def test_a_run_passes_the_official_detail_options_to_the_merge(vgg_inputs):
    results = merging.run(vgg_inputs, ["permute"], {}, bn_reset=True, repair=False,
                          stats_samples=None, curve=False, step=quiet_step, reset_base_bn=True,
                          stream_points="last")
    recipe = json.loads(results["recipes"]["permute"])
    assert recipe["reset_base_bn"] is True and recipe["stream_points"] == "last"
    args = (vgg_inputs, ["permute"], {}, True, False, None, False, "paper")
    assert merging.signature(*args) != merging.signature(*args, True)
    assert merging.signature(*args, False) != merging.signature(*args, False, "last")
