"""The hostile and broken files of ``tests/test_bad_inputs.py``, built once per module from tiny
untrained models (``build_model`` with fixed seeds + ``save_model``; nothing is trained)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ccamerge.io import read_info, save_model
from ccamerge.models import build_model

DIGITS = {"in_channels": 1, "image_size": 8, "num_classes": 10}


def tiny(arch: str = "mlp", seed: int = 0, **config):
    """An untrained model on digits-shaped inputs, from a fixed seed."""
    torch.manual_seed(seed)
    base = {"hidden": [16, 16]} if arch == "mlp" else {"width": 0.25}
    return build_model(arch, **(DIGITS | base | config)).eval()


def claiming(path: Path, model, arch: str | None = None, fmt: int = 1, **config) -> Path:
    """``model``'s tensors under metadata that declares ``config`` changes (and ``arch``)."""
    header = {"format": fmt, "arch": arch or model.arch, "config": {**model.config, **config},
              "info": {}}
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"ccamerge": json.dumps(header)})
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: sha256 of each regular file, the kind of anything else (a
    FIFO or device is never opened)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            path = Path(root) / name
            mode = os.lstat(path).st_mode
            rel = str(path.relative_to(folder))
            if stat.S_ISREG(mode):
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[rel] = f"mode {stat.S_IFMT(mode):o}"
    return out


def build_files(d: Path) -> None:
    """Write every model, dataset and recipe file the cases name into ``d``."""
    _models(d)
    _broken_models(d)
    _special_files(d)
    _datasets(d)
    _archives(d)


def _models(d: Path) -> None:
    for seed in (0, 1):
        save_model(tiny(seed=seed), d / f"m{seed}.safetensors", info={"dataset": "digits"})
    save_model(tiny("vgg"), d / "vgg.safetensors")
    save_model(tiny(num_classes=3), d / "three.safetensors")
    (d / "sub").mkdir()
    (d / "link.safetensors").symlink_to(d / "m0.safetensors")
    os.link(d / "m0.safetensors", d / "hard.safetensors")
    torch.save(tiny().state_dict(), d / "plain.pt")


def _broken_models(d: Path) -> None:
    net = tiny()
    claiming(d / "big.safetensors", net, hidden=[20000, 20000])
    claiming(d / "huge.safetensors", net, hidden=[60000, 60000])
    claiming(d / "blocks.safetensors", tiny("resnet20", blocks=1), blocks=10**7)
    claiming(d / "nanwidth.safetensors", net, width=float("nan"))
    claiming(d / "alien.safetensors", net, arch="transformer")
    claiming(d / "future.safetensors", net, fmt=2)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(d / "bare.safetensors"))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["layers.1.weight"][0, 0] = float("nan")
    _with_state(d / "nan.safetensors", state)
    ints = dict(net.state_dict(), **{"layers.1.weight": net.layers[1].weight.to(torch.int32)})
    _with_state(d / "ints.safetensors", {k: v.contiguous() for k, v in ints.items()})
    whole = (d / "m0.safetensors").read_bytes()
    (d / "cut.safetensors").write_bytes(whole[: len(whole) // 2])
    (d / "empty.safetensors").write_bytes(b"")
    (d / "junk.safetensors").write_bytes(b"\x00garbage" * 50)
    (d / "long.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
    (d / "m0.bin").write_bytes(whole)


def _with_state(path: Path, state: dict) -> None:
    """``state`` under the metadata of a tiny MLP (what ``save_model`` would write)."""
    header = {"format": 1, "arch": "mlp", "config": tiny().config, "info": {}}
    save_file(state, str(path), metadata={"ccamerge": json.dumps(header)})


def _special_files(d: Path) -> None:
    for name in ("fifo.safetensors", "fifo.npz", "fifo.json", "fifo.ts"):
        os.mkfifo(d / name)
    for name in ("zero.safetensors", "zero.npz"):
        (d / name).symlink_to("/dev/zero")
    (d / "folder.safetensors").mkdir()
    (d / "gone.safetensors").symlink_to(d / "nothing-here")


def _datasets(d: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(d / "tiny.npz", x_train=rng.random((40, 8, 8)), y_train=np.arange(40) % 10,
             x_test=rng.random((20, 8, 8)), y_test=np.arange(20) % 10)
    np.savez(d / "small4.npz", x_train=rng.random((40, 4, 4)), y_train=np.arange(40) % 10,
             x_test=rng.random((20, 4, 4)), y_test=np.arange(20) % 10)
    np.savez(d / "keys.npz", x_train=rng.random((4, 8, 8)))
    (d / "junk.npz").write_bytes(b"PK\x03\x04 not a zip at all")


def _archives(d: Path) -> None:
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.GELU(),
                                  torch.nn.Linear(16, 10)).eval()
        torch.jit.save(torch.jit.script(net), str(d / f"gelu{seed}.ts"))


def write_recipes(d: Path, merged: Path) -> None:
    """``recipe.json`` (the recipe of ``merged``) and broken variants of it."""
    recipe = read_info(merged)["info"]["merge"]
    (d / "recipe.json").write_text(json.dumps(recipe))
    variants = {
        "array": [1, 2], "lacks": {"method": "average"},
        "string_models": {**recipe, "models": "m0.safetensors"},
        "one_model": {**recipe, "models": recipe["models"][:1]},
        "nan_gamma": {**recipe, "method": "cca", "options": {"gamma": float("nan")}},
        "unknown_option": {**recipe, "options": {"strength": 2}},
        "reference": {**recipe, "reference": 7}, "weights": {**recipe, "weights": [1, 1]},
        "seed": {**recipe, "seed": -1}, "policy": {**recipe, "bn_policy": "sideways"},
        "data": {**recipe, "data": "digits"},
        "bad_sha": {**recipe, "model_sha256": ["xyz", None]},
        "changed": {**recipe, "model_sha256": [recipe["model_sha256"][0], "0" * 64]},
        "no_sha": {**recipe, "model_sha256": None},
    }
    for name, value in variants.items():
        (d / f"r_{name}.json").write_text(json.dumps(value))  # NaN written as NaN on purpose
    (d / "r_text.json").write_text("this is not json")
    (d / "r_nested.json").write_text("[" * 100_000 + "]" * 100_000)
    with open(d / "r_huge.json", "wb") as handle:  # 17 MB, sparse: nothing is written
        handle.truncate(17 * 2**20)
    (d / "copies").mkdir()


def zip_bomb(path: Path, megabytes: int = 256) -> Path:
    """An ``.npz`` of a few hundred KB whose ``x_train`` unpacks to ``megabytes`` MB of zeros."""
    count = megabytes * 2**20 // (64 * 4)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x_train.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(
                member, {"descr": "<f4", "fortran_order": False, "shape": (count, 1, 8, 8)})
            block = bytes(2**24)
            for _ in range(megabytes // 16):
                member.write(block)
        for key, size in (("y_train", count), ("x_test", 4), ("y_test", 4)):
            shape = (size,) if key.startswith("y") else (size, 1, 8, 8)
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                dtype = np.int64 if key.startswith("y") else np.float32
                np.lib.format.write_array(member, np.zeros(shape, dtype))
    return path
