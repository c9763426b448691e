"""Uploaded TorchScript archives of one architecture at two widths: loaded, kept out of the
selection unless picked by hand, taken by the Merge page (cca, gcca, ot into the reference's
widths) while the methods that need one width say why in one line; another architecture is
refused naming the difference."""

from __future__ import annotations

import io

import pytest
import torch
from archive_helpers import archive_bytes
from width_nets import duplicated, make

from ccamerge import cli
from ccamerge.errors import CcamergeError
from dashboard import data, merging, registry


def quiet_step(_index: int, _label: str):
    return lambda _fraction, _message: None


@pytest.fixture(scope="module")
def digits():
    return data.dataset("digits")


@pytest.fixture
def uploaded(digits, tmp_path) -> tuple[dict, list[registry.ModelEntry]]:
    """A narrow CNN (BatchNorm statistics of the digits) and its twin of double width,
    uploaded as archives with the trust box ticked."""
    narrow = make(x=digits.x_train)
    models: dict = {}
    entries = [registry.add_model_upload(models, f"cnn{k}.pt", archive_bytes(m), tmp_path,
                                         trust_code=True, example=digits.x_train[:8])[0]
               for k, m in enumerate([narrow, duplicated(narrow, digits.x_train)])]
    return models, entries


def test_an_upload_of_another_width_needs_a_selection_by_hand(uploaded, digits, tmp_path):
    models, (narrow, wide) = uploaded
    problem = registry.fit_problem(models, [narrow.id], wide.id)
    assert "select it by hand" in problem and "relu0 4 / 8" in problem
    registry.check_entries([narrow, wide])  # a selection made by hand may mix widths
    mixed = registry.mixed_widths_problem([narrow.model(), wide.model()])
    assert "Merge page" in mixed and "cca" in mixed
    with pytest.raises(CcamergeError, match="only the Merge page merges them"):
        registry.inputs((narrow.id, wide.id), 0, "digits", models, {})
    other, _ = registry.add_model_upload(models, "k5.pt", archive_bytes(make(8, kernel=5)),
                                         tmp_path, trust_code=True, example=digits.x_train[:8])
    refused = registry.fit_problem(models, [narrow.id], other.id)
    assert "kernel_size (5, 5) vs (3, 3)" in refused and "select it by hand" not in refused
    assert "\n" not in refused


def test_the_merge_page_merges_into_the_reference_width_and_permute_says_why(uploaded):
    models, entries = uploaded
    inputs = registry.inputs(tuple(e.id for e in entries), 1, "digits", models, {},
                             mixed_widths=True)
    results = merging.run(inputs, ["cca", "gcca", "ot", "permute"], {}, bn_reset=True,
                          repair=False, stats_samples=None, curve=False, step=quiet_step)
    assert set(results["errors"]) == {"permute"}
    assert "permute needs models of one width" in results["errors"]["permute"]
    assert "\n" not in results["errors"]["permute"]
    base = results["base"]["models"][0]["accuracy"]
    assert {m["method"]: m["accuracy"] for m in results["merges"]} == \
        {"cca": pytest.approx(base), "gcca": pytest.approx(base), "ot": pytest.approx(base)}
    assert results["suffix"] == ".pt"
    merged = torch.jit.load(io.BytesIO(results["files"]["gcca"]))
    assert merged.state_dict()["fc1.weight"].shape == (24, 64)  # the wide reference's [3w, 8w]


def test_the_merge_page_compresses_archives_to_a_fraction_of_the_reference(uploaded, tmp_path):
    """The wide twin as the reference: the target width is a fraction of its widths, at most
    0.5 (the narrow model's); cca at 0.5 writes an archive of the narrow model's shapes that
    computes its function, and its recipe replays to the same function (not bit for bit: the
    twin's copies of a unit tie exactly, and the replay's statistics, of the reference pairs
    only, break the ties otherwise than the page's shared pass of every pair)."""
    models, entries = uploaded
    inputs = registry.inputs(tuple(e.id for e in entries), 1, "digits", models, {},
                             mixed_widths=True)
    span = merging.target_width_range(inputs)
    assert (span.own, span.largest) == (1.0, 0.5) and "fraction" in span.label
    results = merging.run(inputs, ["cca", "ot"], {}, bn_reset=True, repair=False,
                          stats_samples=None, curve=False, step=quiet_step, target_width=0.5)
    assert not results["errors"], results["errors"]
    base = results["base"]["models"][0]["accuracy"]
    assert {m["method"]: m["accuracy"] for m in results["merges"]} == \
        {"cca": pytest.approx(base), "ot": pytest.approx(base)}
    cca = torch.jit.load(io.BytesIO(results["files"]["cca"]))
    ot = torch.jit.load(io.BytesIO(results["files"]["ot"]))  # ot merges at the reference's widths
    assert cca.state_dict()["fc1.weight"].shape == (12, 32)  # the narrow model's [3w, 8w]
    assert ot.state_dict()["fc1.weight"].shape == (24, 64)
    recipe = tmp_path / "recipe_cca.json"
    recipe.write_text(results["recipes"]["cca"])
    out = tmp_path / "again.pt"
    assert cli.main(["replay", str(recipe), "--models", *[e.path for e in entries], "--out",
                     str(out), "--trust-code", "--quiet", "--json"]) == 0
    again = torch.jit.load(str(out))
    assert {k: v.shape for k, v in again.state_dict().items()} == \
        {k: v.shape for k, v in cca.state_dict().items()}
    x = data.dataset("digits").x_test[:200]
    with torch.no_grad():
        assert float((again(x) - cca(x)).abs().max()) < 1e-4
