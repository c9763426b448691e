"""TorchScript archives (``torch.jit.save``) in the dashboard: recognise an upload, replay it as a
hookable module, and write a merged model back into an archive.

An archive unpickles no Python objects, but it carries compiled code that runs whenever the model
runs, so the Models page loads one only after the user ticks "I trust this archive's code". The
replay (:func:`ccamerge.trace.torchscript.script_to_module`) keeps the archive's state-dict keys, so
every page (spectra, features, interpolation, merge) works on it through the API, which derives
and verifies the merge points itself. No ``st.*`` here.
"""

from __future__ import annotations

import io
import json
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

from ccamerge.errors import CcamergeError
from ccamerge.trace.torchscript import (
    is_torchscript_archive,
    load_torchscript,
    script_to_module,
    with_script_state,
)

ARCH = "torchscript"  # ModelEntry.arch of an archive
SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")
RECIPE_FILE = "ccamerge.json"  # extra file of a merged archive: the recipe and scores
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


def recorded_info(content: bytes) -> dict:
    """The ``ccamerge.json`` a merged archive carries (recipe, test accuracy), else ``{}``."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            name = next((n for n in archive.namelist() if n.endswith(f"/extra/{RECIPE_FILE}")), None)
            return json.loads(archive.read(name)) if name else {}
    except (zipfile.BadZipFile, ValueError, KeyError):
        return {}


def load(content: bytes, filename: str, example: torch.Tensor) -> nn.Module:
    """The archive in ``content`` replayed as an eval-mode ``fx.GraphModule`` (same state-dict
    keys) on ``example`` ``[B, C, S, S]`` (a few images of the selected dataset). The compiled
    module stays in ``.script`` (outside the module tree and the state dict, and not kept by
    ``copy.deepcopy``: read it from the loaded model, not from copies). Raises CcamergeError."""
    script = load_torchscript(content)
    try:
        model = script_to_module(script, example)
    except CcamergeError as exc:
        raise CcamergeError(f"{filename}: {exc}") from exc
    except Exception as exc:  # the archive's own code failed on the example images
        raise CcamergeError(f"{filename} does not run on images of shape {list(example.shape[1:])} "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                            "pick the dataset it was trained on in the sidebar and upload it "
                            "again") from exc
    object.__setattr__(model, "script", script)  # kept out of the module tree and state dict
    model.source = filename
    model.info = recorded_info(content)
    model.class_name = getattr(script, "original_name", type(script).__name__)
    return model


def is_archive_model(model: nn.Module) -> bool:
    return getattr(model, "script", None) is not None


def describe(model: nn.Module) -> str:
    """``torchscript ClassName`` for a replayed archive."""
    return f"{ARCH} {getattr(model, 'class_name', '')}".strip()


def merged_archive(reference: nn.Module, merged: nn.Module, info: dict) -> bytes:
    """``merged``'s weights in a copy of ``reference``'s archive (``torch.jit.save`` bytes), with
    ``info`` (the recipe and scores) as the extra file ``ccamerge.json``; ``torch.jit.load``
    reads it back and computes what ``merged`` computes."""
    script = getattr(reference, "script", None)
    if script is None:
        raise CcamergeError("the reference model is not a TorchScript archive")
    archive = with_script_state(script, merged.state_dict())
    with tempfile.TemporaryDirectory(prefix="ccamerge-") as folder:
        path = Path(folder) / "merged.pt"
        torch.jit.save(archive, str(path),
                       _extra_files={RECIPE_FILE: json.dumps(info, default=str)})
        return path.read_bytes()
