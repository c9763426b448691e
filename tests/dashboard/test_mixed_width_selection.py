"""The dashboard with models whose widths differ: the selection check takes them, pages other
than Merge say why they cannot, and on the Merge page the methods that merge different widths
run while the others fail with their one line."""

from __future__ import annotations

import numpy as np
import pytest

from ccamerge.errors import CcamergeError
from ccamerge.io import save_model
from ccamerge.models import build_model
from ccamerge.spec import build_spec
from ccamerge.transform import Transform, apply_transforms
from dashboard import data, merging, registry


def quiet_step(_index: int, _label: str):
    return lambda _fraction, _message: None


def _duplicated(model):
    """Model at twice the width with every unit twice, each copy read at half weight."""
    spec = build_spec(model)
    maps = {p.name: Transform(np.hstack([np.eye(p.width)] * 2),
                              np.vstack([np.eye(p.width) / 2] * 2)) for p in spec.points}
    wide = build_model(model.arch, **(model.config | {"width": 2 * model.config["width"]}))
    wide.load_state_dict(apply_transforms(model.state_dict(), spec, maps))
    return wide


@pytest.fixture
def mixed(mlps, tmp_path) -> tuple[list[registry.ModelEntry], dict]:
    entries = []
    for k, model in enumerate([mlps[0], _duplicated(mlps[1])]):
        path = save_model(model, tmp_path / f"mlp{k}.safetensors")
        digest = registry.sha256(path.read_bytes())
        entries.append(registry.ModelEntry(digest[:16], digest, f"mlp {k}", path.name, "upload",
                                           str(path)))
    return entries, {e.id: e for e in entries}


def test_the_selection_check_takes_models_that_differ_only_in_width(mixed, mlps):
    entries, models = mixed
    registry.check_entries(entries)  # a selection made by hand may mix widths ...
    # ... but an upload of another width is not selected on its own (the other pages take one)
    assert "select it by hand" in registry.fit_problem(models, [entries[0].id], entries[1].id)
    problem = registry.mixed_widths_problem([e.model() for e in entries])
    assert "width 1.0 / 2.0" in problem and "cca" in problem and "Merge page" in problem
    deeper = build_model("mlp", **(mlps[0].config | {"hidden": [64, 64, 64]}))
    with pytest.raises(CcamergeError, match="hidden"):
        registry.check_same([mlps[0], deeper], None)


def test_pages_other_than_merge_stop_with_one_line(mixed):
    entries, models = mixed
    ids = tuple(e.id for e in entries)
    with pytest.raises(CcamergeError, match="only the Merge page merges them"):
        registry.inputs(ids, 0, "digits", models, {})
    assert registry.inputs(ids, 1, "digits", models, {}, mixed_widths=True).reference == 1


def test_the_merge_page_merges_into_the_reference_width_and_others_say_why(mixed):
    entries, models = mixed
    inputs = registry.inputs(tuple(e.id for e in entries), 1, "digits", models, {},
                             mixed_widths=True)
    results = merging.run(inputs, ["cca", "gcca", "permute"], {}, bn_reset=True, repair=False,
                          stats_samples=1000, curve=False, step=quiet_step)
    assert set(results["errors"]) == {"permute"}
    assert "permute needs models of one width" in results["errors"]["permute"]
    assert "\n" not in results["errors"]["permute"]
    assert {m["method"] for m in results["merges"]} == {"cca", "gcca"}
    assert all(m["accuracy"] > 50 for m in results["merges"])
    merged = data.merge(inputs.models, inputs.digests, inputs.data, "digits", "cca", {},
                        reference=1, bn_reset=True, stats_samples=1000)
    assert merged["recipe"]["target_model"] == 1
    assert merged["recipe"]["target_widths"] == {"fc1": 128, "fc2": 128}
