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
Only regular files within :data:`MAX_BYTES` are read, and a file's tensors are checked against
the architecture it describes before anything is allocated (:mod:`ccamerge.weights`). Every file
is written atomically (a temporary file in the same folder, then a rename:
:func:`ccamerge.files.write_atomically`), and a loaded model records the sha256 of its file.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ccamerge.errors import CcamergeError
from ccamerge.files import (
    MAX_RECIPE_BYTES,
    check_zip_sizes,
    regular_file,
    sha256_file,
    write_atomically,
)
from ccamerge.models import count_parameters
from ccamerge.trace.torchscript import load_torchscript, script_to_module, with_script_state
from ccamerge.weights import (
    FORMAT,
    METADATA_KEY,
    check_declared,
    declared_of,
    materialise,
    optional_info,
    parse_header,
    read_safetensors_bytes,
    read_safetensors_file,
    read_torch,
    short,
)

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth")
MAX_BYTES = 2**30  # a model file: safetensors, .pt or TorchScript archive
MAX_ARCHIVE_CODE_BYTES = 64 * 2**20  # compressed members (code) of a TorchScript archive, unpacked
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
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
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
    write_atomically(path, lambda tmp: torch.jit.save(archive, tmp, _extra_files=extra))
    return path


def _to_json(value: dict, name: str) -> str:
    try:
        return json.dumps(value, default=_json_default, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CcamergeError(f"model info for {name} is not JSON-able: {exc}") from exc


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
    ``.pt``/``.pth`` need both. Only a regular file of at most ``max_bytes`` is read. Every
    tensor's name, shape and dtype kind is checked against the network (built on the ``meta``
    device first, so a file declaring more than it holds allocates nothing) and must be finite.
    Sets ``model.info`` (the saved info dict, ``{}`` for ``.pt``), ``model.source`` and
    ``model.sha256`` (of the file's bytes). Raises :class:`CcamergeError` for anything wrong
    with the file.
    """
    path = Path(path)
    size = regular_file(path, what="model file").st_size
    _check_size(path.name, size, max_bytes)
    if _file_kind(path.name) == "safetensors":
        tensors, header = read_safetensors_file(path, _describer(path.name, arch, config))
    else:
        tensors, header = _torch_tensors(path, path.name, size, arch, config)
    model = materialise(path.name, tensors, header)
    model.source, model.sha256 = str(path), sha256_file(path)
    return model


def load_model_bytes(data: bytes, filename: str, *, arch: str | None = None,
                     config: dict | None = None, max_bytes: int = MAX_BYTES) -> nn.Module:
    """Like :func:`load_model` for an uploaded file's ``data``; ``filename`` picks the format and
    becomes ``model.source``."""
    _check_size(filename, len(data), max_bytes)
    if _file_kind(filename) == "safetensors":
        tensors, header = read_safetensors_bytes(data, filename,
                                                 _describer(filename, arch, config))
    else:
        tensors, header = _torch_tensors(io.BytesIO(data), filename, len(data), arch, config)
    model = materialise(filename, tensors, header)
    model.source, model.sha256 = filename, hashlib.sha256(data).hexdigest()
    return model


def _describer(name: str, arch: str | None, config: dict | None):
    """``metadata -> header`` (``arch``, ``config``, ``info``, ``given``): the file's metadata,
    with ``arch``/``config`` overriding it where given."""
    def describe(metadata: dict | None) -> dict:
        if arch is not None and config is not None:
            return {"arch": arch, "config": config, "info": optional_info(metadata), "given": True}
        saved = parse_header(name, metadata)
        return {"arch": arch or saved.get("arch"),
                "config": config if config is not None else saved["config"],
                "info": saved.get("info") or {}, "given": arch is not None or config is not None}
    return describe


def _torch_tensors(source, name: str, size: int, arch: str | None,
                   config: dict | None) -> tuple[dict, dict]:
    """A ``.pt`` state dict checked against the described network: ``(tensors, header)``."""
    _require_description(name, arch, config)
    header = {"arch": arch, "config": config, "info": {}, "given": True}
    tensors = read_torch(source, name, size)
    check_declared(name, declared_of(tensors), header)
    return tensors, header


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
    source = _archive_source(source, name)
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
    model.sha256 = (hashlib.sha256(source).hexdigest() if isinstance(source, bytes)
                    else sha256_file(source))
    return model


def _archive_source(source: str | Path | bytes, name: str) -> str | bytes:
    """An archive's path (a regular file) or bytes, checked for size and for members that
    would unpack beyond what PyTorch writes (see :func:`ccamerge.files.check_zip_sizes`)."""
    if isinstance(source, bytes | bytearray):
        _check_size(name, len(source), MAX_BYTES)
        check_zip_sizes(io.BytesIO(source), name, max_bytes=MAX_BYTES,
                        max_deflated=MAX_ARCHIVE_CODE_BYTES)
        return bytes(source)
    _check_size(name, regular_file(source, what="model file").st_size, MAX_BYTES)
    check_zip_sizes(str(source), name, max_bytes=MAX_BYTES, max_deflated=MAX_ARCHIVE_CODE_BYTES)
    return str(source)


def archive_info(source: str | Path | bytes) -> dict:
    """The ``ccamerge.json`` a merged TorchScript archive (path or bytes) carries (recipe, test
    accuracy), else ``{}`` (also for anything but a regular file, or a record over
    :data:`~ccamerge.files.MAX_RECIPE_BYTES`). Reads the zip only: no code runs."""
    try:
        if not isinstance(source, bytes):
            regular_file(source)
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as zf:
            member = next((m for m in zf.infolist()
                           if m.filename.endswith(f"/extra/{RECIPE_FILE}")), None)
            if member is None or member.file_size > MAX_RECIPE_BYTES:
                return {}
            info = json.loads(zf.read(member))
    except (CcamergeError, OSError, zipfile.BadZipFile, ValueError, KeyError):
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
    regular_file(path, what="model file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return parse_header(path.name, handle.metadata())
    except CcamergeError:
        raise
    except Exception as exc:  # the safetensors parser on an untrusted file
        raise CcamergeError(f"{path.name} is not a valid safetensors file ({short(exc)})") from exc


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
        raise CcamergeError(f"{name} is a bare state dict: pass an architecture description "
                            f"(arch and config, e.g. arch='mlp' and its config) to load it, or "
                            "convert it to .safetensors with save_model")
