"""Models and files to upload in the dashboard tests."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from ccamerge.io import save_model
from ccamerge.models import build_model


def random_model(arch: str = "mlp", seed: int = 0, **config):
    """An untrained model on digits-shaped inputs (8x8, 1 channel, 10 classes)."""
    torch.manual_seed(seed)
    base = {"in_channels": 1, "image_size": 8, "num_classes": 10}
    return build_model(arch, **(base | config))


def safetensors_bytes(model, tmp_path: Path, name: str = "model.safetensors") -> bytes:
    return save_model(model, tmp_path / name).read_bytes()


def pt_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class Hostile:
    """Unpickling this runs code (``exec``) that creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def hostile_pt_bytes(marker: Path) -> bytes:
    return pt_bytes({"layers.1.weight": Hostile(marker)})
