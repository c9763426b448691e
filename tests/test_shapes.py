"""Feature vectors and non-square images end to end: train, evaluate, merge (cca, permute),
interpolate and spectrum through the API and through the CLI in a subprocess; models of any
input shape; fit checks and bad inputs that write nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ccamerge.api import interpolate, merge, spectrum
from ccamerge.data import load_dataset
from ccamerge.errors import CcamergeError
from ccamerge.evaluate import evaluate_model
from ccamerge.io import load_model, save_model
from ccamerge.models import build_model, input_shape
from ccamerge.train import default_config, train_model

ROOT = Path(__file__).resolve().parents[1]


def _tabular(n: int, rng, centres) -> tuple[np.ndarray, np.ndarray]:
    """``[n, 48]`` float features of 6 Gaussian classes (learnable, not trivially)."""
    y = np.arange(n) % 6
    return (centres[y] + rng.normal(0, 1.5, (n, 48))).astype(np.float32), y


def _pictures(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``[n, 3, 6, 8]``: class k lights channel k % 3 in columns 2k..2k+1, plus noise."""
    y = np.arange(n) % 4
    x = np.zeros((n, 3, 6, 8))
    for k in range(4):
        x[y == k, k % 3, :, 2 * k:2 * k + 2] = 160
    return np.clip(x + rng.normal(0, 60, x.shape), 0, 255).astype(np.uint8), y


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (6, 48))
    (xa, ya), (xb, yb) = _tabular(600, rng, centres), _tabular(240, rng, centres)
    np.savez(folder / "tabular.npz", x_train=xa, y_train=ya, x_test=xb, y_test=yb)
    (xa, ya), (xb, yb) = _pictures(400, rng), _pictures(160, rng)
    np.savez(folder / "pictures.npz", x_train=xa, y_train=ya, x_test=xb, y_test=yb)
    return {"tabular": str(folder / "tabular.npz"), "pictures": str(folder / "pictures.npz")}


CASES = [("tabular", "mlp", {"hidden": [32, 32]}, (48,), 6),
         ("pictures", "vgg", {"width": 0.5, "batch_norm": True}, (3, 6, 8), 4)]


@pytest.mark.parametrize("name, arch, overrides, shape, classes", CASES)
def test_any_shape_through_the_api(files, name, arch, overrides, shape, classes):
    data = load_dataset(files[name])
    assert data.input_shape == shape and data.num_classes == classes
    config = default_config(arch, data) | overrides
    assert input_shape(config) == shape
    models = [train_model(arch, config, data, seed=s, epochs=6) for s in range(2)]
    chance = 100.0 / classes
    assert all(m.info["test_accuracy"] > chance + 40 for m in models)
    for method in ("cca", "permute"):
        result = merge(models, data, method)
        assert input_shape(result.model.config) == shape
        assert evaluate_model(result.model, data.test)["accuracy"] > chance + 30
    curve = interpolate(*models, data, "cca", steps=3)
    assert curve["accuracy"][0] == pytest.approx(evaluate_model(models[0], data.test)["accuracy"])
    rows = spectrum(models, data)
    assert rows and all(r["samples"] + r["heldout_samples"] >= len(data.train) for r in rows)
    assert all(len(r["shrunk"]) == len(r["reached_fit"]) == r["width"] for r in rows)


def _cli(*argv: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    return subprocess.run([sys.executable, "-m", "ccamerge", *argv], capture_output=True,
                          text=True, env=env, timeout=300)


def _json(*argv: str) -> dict:
    done = _cli(*argv, "--json", "--quiet")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("name, arch", [("tabular", "mlp"), ("pictures", "vgg")])
def test_any_shape_through_the_cli(files, tmp_path, name, arch):
    data = ["--data", files[name]]
    rows = _json("train", "--arch", arch, "--seeds", "0", "1", "--epochs", "4", "--out",
                 str(tmp_path), *data)["models"]
    paths = [r["path"] for r in rows]
    scores = _json("evaluate", *paths, "--ensemble", *data)
    assert [m["accuracy"] for m in scores["models"]] == pytest.approx([r["accuracy"] for r in rows])
    for method in ("cca", "permute"):
        out = tmp_path / f"{method}.safetensors"
        merged = _json("merge", *paths, "--method", method, "--out", str(out), *data)
        model = load_model(out)
        assert model.info["test_accuracy"] == pytest.approx(merged["accuracy"])
        api = evaluate_model(model, load_dataset(files[name]).test)
        assert api["accuracy"] == pytest.approx(merged["accuracy"])
    curve = _json("interpolate", *paths, "--method", "permute", "--steps", "3", *data)
    assert curve["accuracy"][0] == pytest.approx(rows[0]["accuracy"])
    points = _json("spectrum", *paths, *data)["merge_points"]
    assert points and all(p["samples"] >= 300 for p in points)


def test_old_square_configs_still_load_and_every_form_is_canonical(tmp_path):
    old = build_model("mlp", in_channels=1, image_size=8, hidden=[8])
    assert old.config == {"in_channels": 1, "image_size": 8, "num_classes": 10, "hidden": [8],
                          "width": 1.0}
    assert build_model("mlp", image_shape=[1, 8, 8], hidden=[8]).config == old.config
    save_model(old, tmp_path / "old.safetensors")
    assert load_model(tmp_path / "old.safetensors").config == old.config
    for arch, extra in (("vgg", {"width": 0.25}), ("resnet20", {"width": 0.25, "blocks": 1})):
        model = build_model(arch, image_shape=[5, 9, 13], **extra)
        assert model.config["image_shape"] == [5, 9, 13]
        assert model(torch.randn(2, 5, 9, 13)).shape == (2, 10)
    assert build_model("mlp", in_features=7)(torch.randn(3, 7)).shape == (3, 10)


@pytest.mark.parametrize("config, message", [
    ({"arch": "vgg", "in_features": 48}, "vgg takes images .* need an mlp"),
    ({"arch": "mlp", "in_features": 4, "in_channels": 3}, "give the input shape one way"),
    ({"arch": "mlp", "image_shape": [3, 6]}, "image_shape must be \\[C, H, W\\]"),
    ({"arch": "resnet20", "in_channels": 0}, "in_channels must be a positive integer"),
])
def test_bad_model_shapes(config, message):
    arch = config.pop("arch")
    with pytest.raises(CcamergeError, match=message):
        build_model(arch, **config)


def test_fit_checks_name_the_mismatch(files, mlps, digits):
    tabular = load_dataset(files["tabular"])
    with pytest.raises(CcamergeError, match="take images of shape \\[1, 8, 8\\] but the data are "
                                            "feature vectors of shape \\[48\\]"):
        merge(mlps[:2], tabular, "cca")
    narrow = [build_model("mlp", in_features=40, num_classes=6) for _ in range(2)]
    with pytest.raises(CcamergeError, match="feature vectors of width 40 but the data has 48"):
        merge(narrow, tabular, "permute")
    wide = [build_model("mlp", in_features=48, num_classes=10) for _ in range(2)]
    with pytest.raises(CcamergeError, match="10 classes \\(outputs\\) but the data has 6"):
        merge(wide, tabular, "permute")
    colour = [build_model("vgg", in_channels=3, image_size=8, width=0.25) for _ in range(2)]
    with pytest.raises(CcamergeError, match="3-channel images .* data has 1 channels"):
        merge(colour, digits, "cca")
    with pytest.raises(CcamergeError, match="1 sample\\(s\\); statistics need at least 2"):
        merge(mlps[:2], digits.x_train[:1], "cca")
    with pytest.raises(CcamergeError, match="at least 2 statistics samples"):
        merge(mlps[:2], digits, "cca", stats_samples=1)
    with pytest.raises(CcamergeError, match="vgg takes images"):
        default_config("vgg", tabular)


@pytest.mark.slow
def test_cli_refuses_data_that_does_not_fit_and_writes_nothing(files, tmp_path):
    zoo = tmp_path / "zoo"
    paths = [r["path"] for r in _json("train", "--arch", "mlp", "--seeds", "0", "1", "--epochs",
                                      "1", "--out", str(zoo), "--data", files["tabular"])["models"]]
    out = tmp_path / "merged.safetensors"
    for command in (["merge", *paths, "--out", str(out)], ["evaluate", *paths],
                    ["interpolate", *paths]):
        done = _cli(*command, "--data", files["pictures"])
        assert done.returncode == 2 and done.stdout == ""
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "feature vectors of shape [48]" in done.stderr
    assert not out.exists()
    done = _cli("train", "--arch", "resnet20", "--out", str(tmp_path / "none"), "--data",
                files["tabular"])
    assert done.returncode == 2 and "use the mlp architecture" in done.stderr
    assert not (tmp_path / "none").exists()
