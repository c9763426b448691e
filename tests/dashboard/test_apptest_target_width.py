"""The Merge page's target width, through AppTest: offered only with a method that takes one,
defaulting to the reference's width, and a narrower one gives narrower merged models whose
recipe replays bit for bit."""

from __future__ import annotations

import torch
from apptest_helpers import assert_ok, opened, visit

from ccamerge import cli
from ccamerge.io import load_model, load_model_bytes
from dashboard import state


def _merge_page(demo_cache, methods: list[str]):
    at = opened(180)
    ids = [i for i, e in at.session_state[state.MODELS].items()
           if e.filename.startswith("mlp_w1_same")]
    at.multiselect(key=state.W_MODELS).set_value(ids[:2]).run()
    visit(at, "merge")
    at.multiselect(key=state.W_MERGE_METHODS).set_value(methods).run()
    assert_ok(at)
    return at


def _width_inputs(at):
    return [n for n in at.number_input if n.key == state.W_MERGE_TARGET_WIDTH]


def test_the_target_width_is_offered_only_with_a_method_that_takes_it(demo_cache):
    at = _merge_page(demo_cache, ["permute"])
    assert not _width_inputs(at)
    at.multiselect(key=state.W_MERGE_METHODS).set_value(["permute", "gcca"]).run()
    assert_ok(at)
    (width,) = _width_inputs(at)
    assert width.value == 1.0 and width.max == 1.0  # the reference's, the narrowest's


def test_a_narrower_target_width_merges_narrower_models_that_replay(demo_cache, tmp_path):
    at = _merge_page(demo_cache, ["permute", "cca"])
    at.number_input(key=state.W_MERGE_TARGET_WIDTH).set_value(0.5).run()
    at.button(key=state.W_MERGE_RUN).click().run()
    assert_ok(at)
    results = at.session_state[state.MERGE_RESULTS]
    assert not results["errors"], results["errors"]
    cca = load_model_bytes(results["files"]["cca"], "merged.safetensors")
    permute = load_model_bytes(results["files"]["permute"], "merged.safetensors")
    assert cca.config["width"] == 0.5 and permute.config["width"] == 1.0
    assert cca.layers[3].weight.shape[0] * 2 == permute.layers[3].weight.shape[0]
    recipe = tmp_path / "recipe_cca.json"
    recipe.write_text(results["recipes"]["cca"])
    out = tmp_path / "merged_cca.safetensors"
    assert cli.main(["replay", str(recipe), "--out", str(out), "--quiet", "--json"]) == 0
    replayed = load_model(out)
    for key, tensor in cca.state_dict().items():
        assert torch.equal(tensor, replayed.state_dict()[key]), key
