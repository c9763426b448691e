"""Portable recipes (as the dashboard writes them): ``ccamerge replay`` reads weights-only
``.pt`` files with the architecture the recipe records, verifies the sha256 of the files and of
an uploaded dataset, and refuses malformed fields in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ccamerge import api, cli, recipes
from ccamerge.data import load_dataset
from ccamerge.errors import CcamergeError
from ccamerge.files import sha256_file
from ccamerge.io import load_model
from ccamerge.models import build_model

CONFIG = {"in_features": 6, "num_classes": 3, "hidden": [8, 8], "width": 1.0}


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """Two weights-only .pt MLPs on tabular data, a tabular .npz, and a recipe naming them by
    file name and sha256, as the dashboard writes it (run from this folder)."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "table.npz", x_train=rng.normal(size=(60, 6)), y_train=np.arange(60) % 3,
             x_test=rng.normal(size=(30, 6)), y_test=np.arange(30) % 3)
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save(build_model("mlp", **CONFIG).state_dict(), tmp_path / f"net_{seed}.pt")
    models = [load_model(tmp_path / f"net_{s}.pt", arch="mlp", config=CONFIG) for s in (0, 1)]
    result = api.merge(models, load_dataset(str(tmp_path / "table.npz")), "permute")
    recipe = {**result.recipe, "models": ["net_0.pt", "net_1.pt"],
              "model_architectures": [{"arch": "mlp", "config": CONFIG}] * 2,
              "data": {**result.recipe["data"], "name": "table.npz", "file": "table.npz",
                       "sha256": sha256_file(tmp_path / "table.npz")}}
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    monkeypatch.chdir(tmp_path)
    return tmp_path, result.model.state_dict()


def replay(*extra: str) -> int:
    return cli.main(["replay", "recipe.json", "--out", "out.safetensors", "--quiet", *extra])


def test_pt_files_replay_with_the_recorded_architecture(folder):
    path, merged = folder
    assert replay("--models", "net_0.pt", "net_1.pt") == 0
    replayed = load_model(path / "out.safetensors").state_dict()
    assert all(torch.equal(t, replayed[k]) for k, t in merged.items())
    assert replay() == 0  # the recipe's own names, in the folder holding the files


def test_a_changed_dataset_file_is_named_not_merged(folder, capsys):
    path, _ = folder
    rng = np.random.default_rng(1)
    np.savez(path / "table.npz", x_train=rng.normal(size=(60, 6)), y_train=np.arange(60) % 3,
             x_test=rng.normal(size=(30, 6)), y_test=np.arange(30) % 3)
    assert replay() == 2
    assert "table.npz is not the dataset recipe recipe.json merged on" in capsys.readouterr().err
    assert not (path / "out.safetensors").exists()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("model_architectures", [{"arch": "mlp"}, None], "model_architectures must list 2"),
    ("model_architectures", [None], "model_architectures must list 2"),
    ("data", {"name": "table.npz", "sha256": "abc"}, "data.sha256 must be a sha256"),
])
def test_malformed_portable_fields_are_refused_in_one_line(folder, field, value, message):
    recipe = json.loads((folder[0] / "recipe.json").read_text())
    with pytest.raises(CcamergeError, match=message):
        recipes.check_recipe({**recipe, field: value}, "recipe.json")
