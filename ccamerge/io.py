"""Model files: safetensors with self-describing metadata, weights-only ``.pt``, and TorchScript
archives.

A ``.safetensors`` file written here carries, under the metadata key ``"ccamerge"``, the JSON
``{"format": 1, "arch": ..., "config": {...}, "info": {...}}``, so loading needs nothing else.
A ``.pt``/``.pth`` state dict is read only with ``torch.load(..., weights_only=True)`` and needs an
architecture description (``arch`` and ``config``). Nothing here ever unpickles arbitrary objects.

A TorchScript archive (``torch.jit.save``) unpickles no objects either, but its compiled code runs
whenever the model runs: :func:`load_archive_model` is for archives the user trusts, and the front
ends ask first (``--trust-code``, the dashboard's checkbox). A merge of archives is written back
into a copy of the reference's archive, with the recipe in its extra file ``ccamerge.json``.
Every file is written atomically (a temporary file in the same folder, then a rename).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file
from torch import nn

from ccamerge.errors import CcamergeError
from ccamerge.models import ARCHITECTURES, build_model, count_parameters
from ccamerge.trace.torchscript import load_torchscript, script_to_module, with_script_state

FORMAT = 1
METADATA_KEY = "ccamerge"
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth")
MAX_BYTES = 2**30
RECIPE_FILE = "ccamerge.json"  # extra file of a merged TorchScript archive: recipe and scores


def save_model(model: nn.Module, path: str | Path, *, info: dict | None = None) -> Path:
    """Write ``model``'s state dict (every tensor, integer buffers included) to a ``.safetensors``
    file whose metadata describes the architecture and ``info`` (dataset, seed, split, accuracy,
    a merge recipe, ...). Written atomically; parent folders are created. Returns the path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CcamergeError(f"save models as .safetensors (got {path.name})")
    header = {"format": FORMAT, "arch": model.arch, "config": model.config, "info": info or {}}
    metadata = {METADATA_KEY: _to_json(header, path.name)}
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    _write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def save_merged(model: nn.Module, reference: nn.Module, path: str | Path, info: dict) -> Path:
    """Write a merged model: ``.safetensors`` (:func:`save_model`) for the built-in families, or,
    when ``reference`` is a replayed TorchScript archive, a copy of its archive carrying
    ``model``'s weights and ``info`` (recipe, scores) as the extra file ``ccamerge.json``
    (``torch.jit.load`` reads it back and computes what ``model`` computes). Written atomically;
    parent folders are created. Returns the path."""
    script = getattr(reference, "script", None)
    if script is None:
        return save_model(model, path, info=info)
    path = Path(path)
    archive = with_script_state(script, model.state_dict())
    extra = {RECIPE_FILE: _to_json(info, path.name)}
    _write_atomically(path, lambda tmp: torch.jit.save(archive, tmp, _extra_files=extra))
    return path


def _to_json(value: dict, name: str) -> str:
    try:
        return json.dumps(value, default=_json_default, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CcamergeError(f"model info for {name} is not JSON-able: {exc}") from exc


def _write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file next to ``path``, then rename it to ``path`` (readers
    never see a half-written file; a failed write leaves ``path`` as it was)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _json_default(value):
    if isinstance(value, np.generic | torch.Tensor) and np.ndim(value) == 0:
        return value.item()
    if isinstance(value, np.ndarray | torch.Tensor):
        return value.tolist()
    if isinstance(value, Path | tuple | set):
        return str(value) if isinstance(value, Path) else list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def load_model(path: str | Path, *, arch: str | None = None, config: dict | None = None,
               max_bytes: int = MAX_BYTES) -> nn.Module:
    """Load a model file into a freshly built network, in eval mode.

    ``.safetensors`` files describe themselves (``arch``/``config`` override the metadata if given);
    ``.pt``/``.pth`` need both. Every tensor's name and shape is checked against the network and
    must be finite. Sets ``model.info`` (the saved info dict, ``{}`` for ``.pt``) and
    ``model.source``. Raises :class:`CcamergeError` for anything wrong with the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CcamergeError(f"model file {path} does not exist")
    _check_size(path.name, path.stat().st_size, max_bytes)
    kind = _file_kind(path.name)
    if kind == "safetensors":
        tensors, header = _read_safetensors_file(path)
    else:
        _require_description(path.name, arch, config)
        tensors, header = _read_torch(path, path.name), {}
    model = _assemble(path.name, tensors, header, arch, config)
    model.source = str(path)
    return model


def load_model_bytes(data: bytes, filename: str, *, arch: str | None = None,
                     config: dict | None = None, max_bytes: int = MAX_BYTES) -> nn.Module:
    """Like :func:`load_model` for an uploaded file's ``data``; ``filename`` picks the format and
    becomes ``model.source``."""
    _check_size(filename, len(data), max_bytes)
    if _file_kind(filename) == "safetensors":
        tensors, header = _read_safetensors_bytes(data, filename)
    else:
        _require_description(filename, arch, config)
        tensors, header = _read_torch(io.BytesIO(data), filename), {}
    model = _assemble(filename, tensors, header, arch, config)
    model.source = filename
    return model


def load_archive_model(source: str | Path | bytes, example_inputs: torch.Tensor, *,
                       name: str | None = None) -> nn.Module:
    """A TorchScript archive (a path or its bytes) replayed as an eval-mode ``fx.GraphModule``
    whose layers take forward hooks, with the archive's state-dict keys, checked to compute what
    the archive computes on ``example_inputs`` ``[B, C, S, S]`` (a few images of the dataset).

    The archive's code runs here: call this only for archives the user trusts. Sets ``.script``
    (the compiled module, kept out of the module tree, the state dict and ``copy.deepcopy``:
    read it from the loaded model, not from copies), ``.source`` (``name``, default the path)
    and ``.info`` (the ``ccamerge.json`` a merged archive carries, else ``{}``). Raises
    :class:`CcamergeError` naming ``name`` for anything wrong with the archive."""
    name = name or (str(source) if isinstance(source, str | Path) else "archive")
    source = str(source) if isinstance(source, Path) else source
    try:
        script = load_torchscript(source)
        model = script_to_module(script, example_inputs)
    except CcamergeError as exc:
        raise CcamergeError(f"{name}: {exc}") from exc
    except Exception as exc:  # the archive's own code failed on the example images
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CcamergeError(f"{name} does not run on images of shape "
                            f"{list(example_inputs.shape[1:])} ({type(exc).__name__}: {first}); "
                            "pick the dataset it was trained on") from exc
    object.__setattr__(model, "script", script)  # kept out of the module tree and state dict
    model.source, model.info = name, archive_info(source)
    return model


def archive_info(source: str | Path | bytes) -> dict:
    """The ``ccamerge.json`` a merged TorchScript archive (path or bytes) carries (recipe, test
    accuracy), else ``{}``. Reads the zip only: no code runs."""
    try:
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as zf:
            name = next((n for n in zf.namelist() if n.endswith(f"/extra/{RECIPE_FILE}")), None)
            info = json.loads(zf.read(name)) if name else {}
    except (OSError, zipfile.BadZipFile, ValueError, KeyError):
        return {}
    return info if isinstance(info, dict) else {}


def is_archive_model(model: nn.Module) -> bool:
    """True for a model :func:`load_archive_model` replayed (it keeps its archive)."""
    return getattr(model, "script", None) is not None


def model_summary(model: nn.Module) -> dict:
    """JSON-able ``{"arch", "config", "parameters", "accuracy", "dataset", "source"}`` (accuracy in
    percent from ``model.info["test_accuracy"]``, None when unknown)."""
    info = getattr(model, "info", None) or {}
    return {
        "arch": model.arch,
        "config": dict(model.config),
        "parameters": count_parameters(model),
        "accuracy": info.get("test_accuracy"),
        "dataset": info.get("dataset"),
        "source": getattr(model, "source", None),
    }


def read_info(path: str | Path) -> dict:
    """The ``{"format", "arch", "config", "info"}`` header of a ``.safetensors`` model file, without
    loading its tensors (cheap: e.g. to decide whether a cached zoo file is still valid)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return _parse_header(path.name, handle.metadata())
    except CcamergeError:
        raise
    except Exception as exc:  # the safetensors parser on an untrusted file
        raise CcamergeError(f"{path.name} is not a valid safetensors file ({_short(exc)})") from exc


def _check_size(name: str, size: int, max_bytes: int) -> None:
    if size == 0:
        raise CcamergeError(f"model file {name} is empty")
    if size > max_bytes:
        raise CcamergeError(f"model file {name} is {size:,} bytes, over the {max_bytes:,}-byte "
                            "limit; raise max_bytes if you trust it")


def _file_kind(name: str) -> str:
    suffix = Path(name).suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    raise CcamergeError(f"cannot load {name}: expected a .safetensors, .pt or .pth file")


def _require_description(name: str, arch: str | None, config: dict | None) -> None:
    if arch is None or config is None:
        raise CcamergeError(f"{name} is a bare state dict: pass an architecture description (arch "
                            f"and config, e.g. arch='mlp' and its config) to load it, or convert it "
                            "to .safetensors with save_model")


def _short(exc: Exception) -> str:
    """``Type: first sentence`` of an exception from a parser, for a one-line message."""
    lines = str(exc).strip().splitlines()
    first = lines[0].split(". ")[0] if lines else ""
    return f"{type(exc).__name__}: {first}"[:200]


def _read_safetensors_file(path: Path) -> tuple[dict, dict | None]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # the safetensors parser on an untrusted file
        raise CcamergeError(f"{path.name} is not a valid safetensors file, it may be truncated or "
                            f"corrupt ({_short(exc)})") from exc
    return tensors, metadata


def _read_safetensors_bytes(data: bytes, name: str) -> tuple[dict, dict | None]:
    try:
        tensors = safetensors_load(data)
        length = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + length]).get("__metadata__")
    except Exception as exc:  # the safetensors parser on an untrusted upload
        raise CcamergeError(f"{name} is not a valid safetensors file, it may be truncated or "
                            f"corrupt ({_short(exc)})") from exc
    return tensors, metadata


def _read_torch(source: Path | io.BytesIO, name: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pt`` file, via the weights-only unpickler (never plain pickle)."""
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        if type(exc).__name__ == "UnpicklingError":
            lines = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line]
            why = lines[0] if lines else _short(exc)
            raise CcamergeError(f"refused to unpickle {name}: {why} (only plain tensors are "
                                "accepted)") from exc
        raise CcamergeError(f"cannot read {name} as a PyTorch file, it may be truncated or corrupt "
                            f"({_short(exc)})") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CcamergeError(f"{name} does not hold a state dict (a dict of name -> tensor, or "
                            "{'state_dict': ...})")
    return obj


def _parse_header(name: str, metadata: dict | None) -> dict:
    if not metadata or METADATA_KEY not in metadata:
        raise CcamergeError(f"{name} has no ccamerge metadata; pass an architecture description "
                            "(arch and config) to load it")
    try:
        header = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise CcamergeError(f"{name} has unreadable ccamerge metadata ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise CcamergeError(f"{name} has ccamerge metadata format {found!r}; this version reads "
                            f"format {FORMAT}")
    if not isinstance(header.get("config"), dict) or not isinstance(header.get("info", {}), dict):
        raise CcamergeError(f"{name} has malformed ccamerge metadata (config/info must be objects)")
    return header


def _assemble(name: str, tensors: dict, metadata, arch: str | None, config: dict | None) -> nn.Module:
    """Build the described network, check ``tensors`` against it, load them, return it in eval."""
    if arch is not None and config is not None:
        header = {"arch": arch, "config": config, "info": _optional_info(metadata)}
    else:
        saved = _parse_header(name, metadata)
        header = {"arch": arch or saved.get("arch"),
                  "config": config if config is not None else saved["config"],
                  "info": saved.get("info") or {}}
    if header["arch"] not in ARCHITECTURES:
        raise CcamergeError(f"{name} describes unknown architecture {header['arch']!r}; "
                            f"choose one of {sorted(ARCHITECTURES)}")
    model = build_model(header["arch"], **header["config"])
    _check_tensors(name, tensors, model)
    model.load_state_dict(tensors, strict=True)
    model.info = header["info"]
    return model.eval()


def _optional_info(metadata: dict | None) -> dict:
    """The saved info when present and well formed, else ``{}`` (the caller described the net)."""
    try:
        info = json.loads(metadata[METADATA_KEY]).get("info")
    except (KeyError, TypeError, ValueError, AttributeError):
        return {}
    return info if isinstance(info, dict) else {}


def _check_tensors(name: str, tensors: dict, model: nn.Module) -> None:
    expected = model.state_dict()
    what = f"a {model.arch} with width {model.config.get('width')}"
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing[:3])}"] if missing else []) + \
                ([f"unexpected {', '.join(unexpected[:3])}"] if unexpected else [])
        raise CcamergeError(f"{name} does not match {what}: {'; '.join(parts)}; check the "
                            "architecture description")
    for key, want in expected.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(want.shape):
            raise CcamergeError(f"tensor {key} has shape {list(got.shape)} but {what} expects "
                                f"{list(want.shape)} (in {name}); check the architecture description")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise CcamergeError(f"tensor {key} in {name} contains NaN or infinite values")
