import json

import numpy as np
import pytest
import torch

from ccamerge.data import load_dataset
from ccamerge.errors import CcamergeError
from ccamerge.io import load_model
from ccamerge.train import default_config, train_model, train_zoo, zoo_filename


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_default_config(digits):
    mlp = default_config("mlp", digits)
    assert mlp == {"in_channels": 1, "image_size": 8, "num_classes": 10, "width": 1.0,
                   "hidden": [128, 128]}
    assert default_config("vgg", digits, width=2)["batch_norm"] is False
    assert default_config("resnet20", digits)["width"] == 1.0
    with pytest.raises(CcamergeError, match="unknown architecture"):
        default_config("transformer", digits)


@pytest.mark.parametrize("arch", ["mlp", "vgg", "resnet20"])
def test_training_is_deterministic(digits, arch):
    config = default_config(arch, digits, width=0.25)
    if arch == "resnet20":
        config["blocks"] = 1
    subset = np.arange(0, 1437, 7)  # 206 samples keep this fast
    rng_before = torch.get_rng_state()
    runs = [train_model(arch, config, digits, seed=seed, indices=subset, epochs=1, batch_size=64)
            for seed in (3, 3, 4)]
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    first, again, other = (run.state_dict() for run in runs)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_mlp_learns_digits(digits):
    calls = []
    model = train_model("mlp", default_config("mlp", digits), digits, seed=0, epochs=5,
                        progress=lambda fraction, message: calls.append((fraction, message)))
    info = model.info
    assert not model.training and info["test_accuracy"] > 90.0 and 0 < info["test_loss"] < 0.5
    assert info["dataset"] == "digits" and info["seed"] == 0 and info["epochs"] == 5
    assert info["split"] == {"kind": "same"} and info["train_size"] == 1437
    assert [c[0] for c in calls] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert calls[-1][1].startswith("epoch 5/5")
    json.dumps(info)


def test_bad_training_arguments(digits):
    config = default_config("mlp", digits)
    with pytest.raises(CcamergeError, match="indices"):
        train_model("mlp", config, digits, seed=0, indices=[5000, 1], epochs=1)
    with pytest.raises(CcamergeError, match="epochs"):
        train_model("mlp", config, digits, seed=0, epochs=0)


def test_zoo_skewed_files_and_cache(digits, tmp_path):
    config = default_config("mlp", digits, width=0.25)
    rows = train_zoo("mlp", digits, [5, 6], tmp_path, split="skewed", epochs=2, config=config)
    assert [r["seed"] for r in rows] == [5, 6] and not any(r["cached"] for r in rows)
    assert rows[0]["path"].endswith(zoo_filename("mlp", 0.25, "skewed", 5))
    assert rows[0]["path"].endswith("mlp_w0.25_skewed_s5.safetensors")
    assert [r["split"]["part"] for r in rows] == [0, 1]
    model = load_model(rows[1]["path"])
    assert model.info["split"] == {"kind": "skewed", "part": 1, "parts": 2, "seed": 0}
    assert model.info["test_accuracy"] == rows[1]["accuracy"] and model.info["train_size"] == 715
    stamp = [tmp_path.joinpath(p).stat().st_mtime_ns for p in (r["path"] for r in rows)]
    again = train_zoo("mlp", digits, [5, 6], tmp_path, split="skewed", epochs=2, config=config)
    assert all(r["cached"] for r in again)
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in rows]
    assert stamp == [tmp_path.joinpath(r["path"]).stat().st_mtime_ns for r in again]
    retrained = train_zoo("mlp", digits, [5], tmp_path, split="skewed", epochs=3, config=config)
    assert not retrained[0]["cached"]


def test_zoo_dirichlet_parts(digits, tmp_path):
    seen = []
    rows = train_zoo("mlp", digits, [0, 1, 2], tmp_path, split="dirichlet", width=0.25, epochs=1,
                     progress=lambda fraction, message: seen.append(fraction))
    assert [r["split"] for r in rows] == [
        {"kind": "dirichlet", "part": k, "parts": 3, "seed": 0} for k in range(3)]
    sizes = [load_model(r["path"]).info["train_size"] for r in rows]
    assert sum(sizes) == 1437
    assert seen[-1] == pytest.approx(1.0) and seen == sorted(seen)
    with pytest.raises(CcamergeError, match="unknown split"):
        train_zoo("mlp", digits, [0], tmp_path, split="random", epochs=1)


def test_zoo_reuses_files_built_from_partial_configs(digits, tmp_path):
    # vgg's default config omits cfg and classifier; the file saves the complete config
    rows = train_zoo("vgg", digits, [0], tmp_path, width=0.25, epochs=1)
    again = train_zoo("vgg", digits, [0], tmp_path, width=0.25, epochs=1)
    assert not rows[0]["cached"] and again[0]["cached"]
    assert rows[0]["path"].endswith("vgg_w0.25_same_s0.safetensors")


def test_training_streams_the_same_batches_from_disk_as_from_memory(tmp_path):
    from ccamerge.data import make_dataset

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (90, 3, 4, 6)).astype(np.uint8)
    y, arrays = np.arange(90) % 3, {}
    for part, rows in (("train", slice(0, 70)), ("test", slice(70, 90))):
        arrays[f"x_{part}"], arrays[f"y_{part}"] = x[rows], y[rows]
    np.savez(tmp_path / "d.npz", **arrays)
    disk = load_dataset(str(tmp_path / "d.npz"))
    memory = make_dataset("memory", arrays["x_train"].astype(np.float32) / 255.0, arrays["y_train"],
                          arrays["x_test"].astype(np.float32) / 255.0, arrays["y_test"])
    assert default_config("vgg", disk) == default_config("vgg", memory)
    config = default_config("vgg", disk, width=0.25) | {"batch_norm": True}
    subset = np.arange(3, 70, 2)
    a, b = (train_model("vgg", config, d, seed=1, indices=subset, epochs=2, batch_size=8)
            for d in (disk, memory))
    assert all(torch.allclose(a.state_dict()[k], v, atol=1e-5) for k, v in b.state_dict().items())
    assert a.info["train_size"] == 34 and a.config["image_shape"] == [3, 4, 6]


def test_training_on_loaders_and_on_feature_vectors():
    from torch.utils.data import DataLoader, TensorDataset

    from ccamerge.data import Dataset

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 10, generator=g) * 3
    y = torch.arange(300) % 3
    x = centres[y] + torch.randn(300, 10, generator=g)
    data = Dataset("vectors", train=DataLoader(TensorDataset(x[:240], y[:240]), batch_size=32,
                                               shuffle=True, generator=g),
                   test=DataLoader(TensorDataset(x[240:], y[240:]), batch_size=32))
    config = default_config("mlp", data)
    assert config["in_features"] == 10 and "in_channels" not in config
    model = train_model("mlp", config, data, seed=0, epochs=3)
    assert model.info["test_accuracy"] > 90 and model.info["train_size"] == 240
    with pytest.raises(CcamergeError, match="resnet20 takes images"):
        default_config("resnet20", data)
    with pytest.raises(CcamergeError, match="feature vectors of width 12 but the data has 10"):
        train_model("mlp", dict(config, in_features=12), data, seed=0, epochs=1)
