"""The tensors of a model file, checked against the architecture before anything is allocated.

A file says which network it holds (a ``.safetensors`` file's metadata, or the architecture
description given with a ``.pt``) and which tensors it holds (their names, shapes and dtypes: the
safetensors header, or the state dict). :func:`check_declared` compares the two before any
tensor or network is allocated: the network is built on PyTorch's ``meta`` device (shapes, no
memory) and its state dict's names, shapes and dtype kinds must equal what the file holds. A file
whose metadata declares a network larger than its tensors is refused in one line, so the memory a
load takes is bounded by what the file holds. :func:`materialise` then builds the real network
and copies the tensors in (finite values only).

Nothing here ever unpickles arbitrary objects: ``.pt`` files go through
``torch.load(weights_only=True)`` and only zip members PyTorch itself writes are accepted.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as safetensors_load
from torch import nn

from ccamerge.errors import CcamergeError
from ccamerge.files import check_zip_sizes
from ccamerge.models import ARCHITECTURES, build_model

FORMAT = 1
METADATA_KEY = "ccamerge"
LAYER_SLACK = 16  # a config's layer list may be this much longer than the file has tensors
MAX_HEADER_BYTES = 16 * 2**20  # a safetensors header (JSON): ~100 000 tensors
LAYER_COUNT_KEYS = ("blocks",)  # config integers that count layers (ResNet blocks per stage)
Declared = dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype kind)


def short(exc: BaseException) -> str:
    """``Type: first sentence`` of an exception from a parser, for a one-line message."""
    lines = str(exc).strip().splitlines()
    first = lines[0].split(". ")[0] if lines else ""
    return f"{type(exc).__name__}: {first}"[:200]


def _kind(dtype: torch.dtype | str) -> str:
    """``float``, ``int``, ``bool`` or ``complex`` for a torch dtype or a safetensors dtype name."""
    if isinstance(dtype, str):
        return "bool" if dtype == "BOOL" else "float" if dtype.startswith(("F", "BF")) else "int"
    if dtype == torch.bool:
        return "bool"
    return "float" if dtype.is_floating_point else "complex" if dtype.is_complex else "int"


def declared_of(tensors: dict[str, torch.Tensor]) -> Declared:
    """What a loaded state dict holds: ``{name: (shape, dtype kind)}``."""
    return {k: (tuple(v.shape), _kind(v.dtype)) for k, v in tensors.items()}


def read_safetensors_file(path: Path, describe) -> tuple[dict, dict]:
    """``(tensors, header)`` of a ``.safetensors`` file; ``describe(metadata)`` gives the header
    (arch, config, info) and :func:`check_declared` runs on the file's header before any tensor
    is read."""
    with open(path, "rb") as handle:
        _check_header_length(path.name, int.from_bytes(handle.read(8), "little"))
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = describe(handle.metadata())
            declared = {k: (tuple(handle.get_slice(k).get_shape()),
                            _kind(handle.get_slice(k).get_dtype())) for k in handle.keys()}
            check_declared(path.name, declared, header)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except CcamergeError:
        raise
    except Exception as exc:  # the safetensors parser on an untrusted file
        raise CcamergeError(f"{path.name} is not a valid safetensors file, it may be truncated or "
                            f"corrupt ({short(exc)})") from exc
    return tensors, header


def read_safetensors_bytes(data: bytes, name: str, describe) -> tuple[dict, dict]:
    """Like :func:`read_safetensors_file` for a file's bytes (the header is parsed here)."""
    declared, metadata = _safetensors_header(data, name)
    header = describe(metadata)
    check_declared(name, declared, header)
    try:
        return safetensors_load(data), header
    except Exception as exc:  # the safetensors parser on an untrusted upload
        raise CcamergeError(f"{name} is not a valid safetensors file, it may be truncated or "
                            f"corrupt ({short(exc)})") from exc


def _safetensors_header(data: bytes, name: str) -> tuple[Declared, dict | None]:
    """``({name: (shape, kind)}, metadata)`` from a safetensors header (8-byte little-endian
    length, then JSON), without touching the tensor bytes."""
    length = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    _check_header_length(name, length)
    try:
        if not 0 < length <= len(data) - 8:
            raise ValueError(f"header length {length} does not fit in {len(data)} bytes")
        header = json.loads(data[8:8 + length])
        metadata = header.pop("__metadata__", None)
        declared = {k: (tuple(int(n) for n in v["shape"]), _kind(str(v["dtype"])))
                    for k, v in header.items()}
    except Exception as exc:  # an untrusted header: any malformed part
        raise CcamergeError(f"{name} is not a valid safetensors file, it may be truncated or "
                            f"corrupt ({short(exc)})") from exc
    return declared, metadata


def _check_header_length(name: str, length: int) -> None:
    """A header longer than :data:`MAX_HEADER_BYTES` would take many times that to parse."""
    if length > MAX_HEADER_BYTES:
        raise CcamergeError(f"{name} is not a valid safetensors file: its header claims "
                            f"{length:,} bytes, over the {MAX_HEADER_BYTES:,}-byte limit")


def read_torch(source: Path | io.BytesIO, name: str, size: int) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pt`` file of ``size`` bytes, via the weights-only unpickler (never
    plain pickle); a zip whose members would unpack beyond the file is refused first."""
    check_zip_sizes(source, name, max_bytes=size)
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _torch_error(name, exc) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CcamergeError(f"{name} does not hold a state dict (a dict of name -> tensor, or "
                            "{'state_dict': ...})")
    return obj


def _torch_error(name: str, exc: Exception) -> CcamergeError:
    """ccamerge's own message for a file the weights-only unpickler refused or could not read."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    if type(exc).__name__ == "UnpicklingError" and found:
        return CcamergeError(f"refused to unpickle {name}: it holds pickled objects that are not "
                             f"plain tensors ({found.group(1)}); ccamerge only loads .safetensors "
                             "files or weights-only state dicts (name -> tensor)")
    return CcamergeError(f"cannot read {name} as a PyTorch file, it may be truncated or corrupt "
                         f"({short(exc)})")


def parse_header(name: str, metadata: dict | None) -> dict:
    """The ``{"format", "arch", "config", "info"}`` a ccamerge ``.safetensors`` file records."""
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


def check_declared(name: str, declared: Declared, header: dict) -> None:
    """Refuse ``declared`` tensors (what the file holds) unless they are exactly the state dict
    of the network ``header`` describes (``arch``, ``config``; ``given``: whether the caller
    described it), compared on the ``meta`` device: nothing is allocated."""
    arch, config = header["arch"], header["config"]
    if arch not in ARCHITECTURES:
        raise CcamergeError(f"{name} describes unknown architecture {arch!r}; "
                            f"choose one of {sorted(ARCHITECTURES)}")
    if not isinstance(config, dict):
        raise CcamergeError(f"{name}: the architecture config must be an object, got {config!r}")
    _check_layer_counts(name, config, len(declared))
    skeleton = _skeleton(name, arch, config)
    hint = ("check the architecture description" if header.get("given") else
            "the file's metadata does not describe its tensors (it may be corrupt or crafted)")
    what = f"a {arch} with width {getattr(skeleton, 'config', config).get('width')}"
    _compare(name, declared, declared_of(skeleton.state_dict()), what, hint)


def _check_layer_counts(name: str, config: dict, tensors: int) -> None:
    """A layer list (or a count of blocks) longer than the file has tensors cannot describe it,
    and building even a ``meta`` network of millions of layers takes minutes."""
    counts = {k: len(v) for k, v in config.items() if isinstance(v, list)}
    counts |= {k: v for k, v in config.items() if k in LAYER_COUNT_KEYS and isinstance(v, int)}
    for key, count in counts.items():
        if count > tensors + LAYER_SLACK:
            raise CcamergeError(f"{name} describes {count} layers in {key!r} but holds only "
                                f"{tensors} tensors; the file's metadata does not describe it")


def _skeleton(name: str, arch: str, config: dict) -> nn.Module:
    """The described network on the ``meta`` device (shapes and dtypes, no memory)."""
    try:
        with torch.device("meta"):
            return build_model(arch, **config)
    except CcamergeError as exc:
        raise CcamergeError(f"{name}: {exc}") from exc
    except Exception as exc:  # any value a crafted config holds
        raise CcamergeError(f"{name} describes a {arch} that cannot be built ({short(exc)}); "
                            "check its config") from exc


def _compare(name: str, have: Declared, want: Declared, what: str, hint: str) -> None:
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing[:3])}"] if missing else []) + \
                ([f"unexpected {', '.join(unexpected[:3])}"] if unexpected else [])
        raise CcamergeError(f"{name} does not match {what}: {'; '.join(parts)}; {hint}")
    for key, (shape, kind) in want.items():
        got_shape, got_kind = have[key]
        if got_shape != shape:
            raise CcamergeError(f"tensor {key} has shape {list(got_shape)} but {what} expects "
                                f"{list(shape)} (in {name}); {hint}")
        if got_kind != kind:
            raise CcamergeError(f"tensor {key} in {name} holds {got_kind} values but {what} "
                                f"expects {kind} values; {hint}")


def materialise(name: str, tensors: dict[str, torch.Tensor], header: dict) -> nn.Module:
    """The real network of ``header`` (already checked against ``tensors``), loaded, eval mode,
    with ``.info``; non-finite values are refused."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CcamergeError(f"tensor {key} in {name} contains NaN or infinite values")
    model = build_model(header["arch"], **header["config"])
    model.load_state_dict(tensors, strict=True)
    model.info = header["info"]
    return model.eval()


def optional_info(metadata: dict | None) -> dict:
    """The saved info when present and well formed, else ``{}`` (the caller described the net)."""
    try:
        info = json.loads(metadata[METADATA_KEY]).get("info")
    except (KeyError, TypeError, ValueError, AttributeError):
        return {}
    return info if isinstance(info, dict) else {}
