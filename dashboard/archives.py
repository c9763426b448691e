"""TorchScript archives (``torch.jit.save``) in the dashboard: recognise an upload, ask for trust,
and describe a replayed archive. Loading and writing them is :mod:`ccamerge.io`'s
(:func:`~ccamerge.io.load_archive_model`, :func:`~ccamerge.io.save_merged`), shared with the CLI.

An archive unpickles no Python objects, but it carries compiled code that runs whenever the model
runs, so the Models page loads one only after the user ticks "I trust this archive's code". The
replay keeps the archive's state-dict keys, so every page (spectra, features, interpolation,
merge) works on it through the API, which derives and verifies the merge points itself. No
``st.*`` here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ccamerge.io import RECIPE_FILE, is_archive_model, load_archive_model
from ccamerge.trace.torchscript import is_torchscript_archive

__all__ = ["ARCH", "RECIPE_FILE", "SUFFIXES", "TRUST_LABEL", "WARNING", "describe",
           "is_archive_model", "load", "untrusted_message", "write_and_sniff"]

ARCH = "torchscript"  # ModelEntry.arch of an archive
SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")
TRUST_LABEL = "I trust this archive's code"
WARNING = ("A TorchScript archive (`torch.jit.save`) carries compiled code, and that code runs "
           "whenever the model runs here (loading, scoring, merging). Tick "
           f"**{TRUST_LABEL}** only for archives from people you trust; `.safetensors` files "
           "carry no code and are safe to accept from anyone.")


def untrusted_message(filename: str) -> str:
    return (f"{filename} is a TorchScript archive: it carries code that runs when the model runs, "
            f"so it was not loaded. If you trust where it came from, tick \"{TRUST_LABEL}\" "
            "(the upload is then loaded); otherwise remove it.")


def write_and_sniff(content: bytes, path: Path) -> bool:
    """Write uploaded ``content`` to ``path`` (this session's folder) and tell whether it is an
    archive; :func:`ccamerge.trace.torchscript.is_torchscript_archive` reads files, not bytes."""
    path.write_bytes(content)
    return is_torchscript_archive(path)


def load(content: bytes, filename: str, example: torch.Tensor) -> nn.Module:
    """The trusted archive in ``content`` replayed on ``example`` ``[B, C, S, S]`` (a few images
    of the selected dataset) by :func:`ccamerge.io.load_archive_model`, named ``filename``, with
    ``.class_name`` for the models table. Raises CcamergeError."""
    model = load_archive_model(content, example, name=filename)
    model.class_name = getattr(model.script, "original_name", type(model.script).__name__)
    return model


def describe(model: nn.Module) -> str:
    """``torchscript ClassName`` for a replayed archive."""
    return f"{ARCH} {getattr(model, 'class_name', '')}".strip()
