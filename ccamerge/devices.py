"""Where the forward passes run: device names, moving models and batches, exact float32.

``device`` is always an argument: ``"auto"`` (CUDA when present, else the CPU), ``"cpu"``,
``"cuda"`` (the current CUDA device; under torchrun the rank's own, see
:func:`ccamerge.distributed.init_from_env`) or ``"cuda:N"``. Nothing else hard-codes CUDA.

Covariances are sums of float32 products. TF32 (on by default for cuDNN convolutions on Ampere
and later) keeps 10 mantissa bits and shifts covariances by ~1e-3 relative, so statistics and
BatchNorm resets run inside :func:`exact_float32`.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ccamerge.errors import CcamergeError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``torch.device`` for ``"auto" | "cpu" | "cuda" | "cuda:N"`` (or a ``torch.device``);
    CUDA devices come with their index. Raises one clear line for a device that is not there."""
    if isinstance(device, torch.device):
        device = str(device)
    name = (device or "auto").strip().lower()
    if name == "auto":
        return _cuda(None) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        return _cuda(None, asked=name)
    if name.startswith("cuda:") and name[5:].isdigit():
        return _cuda(int(name[5:]), asked=name)
    raise CcamergeError(f"unknown device {device!r}; use one of {', '.join(DEVICE_CHOICES)}")


def _cuda(index: int | None, asked: str = "auto") -> torch.device:
    if not torch.cuda.is_available():
        why = ("this torch build has no CUDA support" if torch.version.cuda is None
               else "no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES)")
        raise CcamergeError(f"device {asked!r} requested but CUDA is not available: {why}; "
                            "use --device cpu or auto")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if index is None else index
    if index >= count:
        raise CcamergeError(f"device {asked!r} does not exist: this machine has {count} CUDA "
                            f"device(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def module_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (the CPU for a model without any)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def work_device(models: Sequence[nn.Module], device: str | torch.device | None = None
                ) -> torch.device:
    """Where work on ``models`` runs: ``device`` resolved (:func:`resolve_device`), or model 0's
    device when None."""
    return resolve_device(device) if device is not None else module_device(models[0])


def model_to(model: nn.Module, device: torch.device, **to_kwargs) -> nn.Module:
    """``model`` itself when it is already on ``device`` (and no other conversion is asked),
    else a copy moved there (``to_kwargs``, e.g. ``memory_format``, go to ``Module.to``); the
    caller's model is never moved."""
    if module_device(model) == device and not to_kwargs:
        return model
    try:
        clone = copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001 - any copy failure gets the same advice
        raise CcamergeError(f"cannot copy {type(model).__name__} to {device} ({exc}); move it "
                            "there yourself with model.to(device)") from exc
    return clone.to(device, **to_kwargs)


def models_to(models: Sequence[nn.Module], device: torch.device) -> list[nn.Module]:
    """Every model on ``device``: the models already there, copies of the others."""
    return [model_to(m, device) for m in models]


def to_device(batch, device: torch.device):
    """A tensor, or a tuple/list of tensors such as ``(x [B, ...], y [B])``, on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(b, device) for b in batch)
    raise CcamergeError(f"cannot move a {type(batch).__name__} to {device}; expected tensors")


def _precision_slots() -> list:
    """The backends whose float32 precision torch lets reduce (TF32 on CUDA, bf16 on oneDNN)."""
    backends = torch.backends
    candidates = [getattr(backends.cuda, "matmul", None), getattr(backends.cudnn, "conv", None),
                  getattr(backends.cudnn, "rnn", None), getattr(backends.mkldnn, "matmul", None),
                  getattr(backends.mkldnn, "conv", None)]
    return [slot for slot in candidates if slot is not None and hasattr(slot, "fp32_precision")]


_PRECISION_LOCK = threading.Lock()
_precision_users: list = []  # saved settings, held while any exact_float32 block is open


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Full IEEE float32 in matmuls and convolutions for the duration (no TF32, no bf16); the
    previous settings are restored afterwards, also on errors. The settings are process-wide:
    nested blocks and blocks in several threads (dashboard sessions) restore them once, when
    the last block closes.

    Uses torch's per-backend ``fp32_precision`` settings: once a user has set those, reading
    the legacy ``allow_tf32`` flags raises, so toggling the legacy flags is not safe."""
    with _PRECISION_LOCK:
        if not _precision_users:
            slots = _precision_slots()
            _precision_users.append([(slot, slot.fp32_precision) for slot in slots])
            for slot in slots:
                slot.fp32_precision = "ieee"
        else:
            _precision_users.append(None)
    try:
        yield
    finally:
        with _PRECISION_LOCK:
            saved = _precision_users.pop()
            for slot, value in saved or []:
                slot.fp32_precision = value
