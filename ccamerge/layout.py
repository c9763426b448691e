"""The memory layout image passes run in: standard (NCHW), channels-last (NHWC) images, or
channels-last images and convolution weights.

Which is faster depends on the model, its width and the device. On two CPU cores, batches of
500 3x32x32 images: ResNet20 runs 1.1-1.4x faster channels-last, VGG11 x1 about the same either
way, VGG11 x2 1.3x and x4 / x8 1.9x faster in the standard layout (on one AMD machine); on an
AVX2 machine VGG11 x8 ran 1.24x faster with its weights channels-last too than with channels-last
images alone, and on an Intel AVX-512 one ResNet20 x4 1.04x. A pass over many batches
(the statistics pass, a BatchNorm reset) first times one model on the six sixths of its first
batch (:data:`TRIAL`) and keeps the fastest layout of the three warm tries: about one model's
pass over one batch, once. A long pass (:data:`LONG_PASS` batches or more) makes its three
deciding tries on the whole batch instead: on another 2-core CPU, VGG11 x1 ran 1.4x faster
channels-last at batches of 500 but only ~10% faster on quarter batches, within that machine's
noise, and the quarter probe once chose the standard layout. The choice is remembered for the
process, per model structure, batch shape, device and thread count, so later passes of such
models (the BatchNorm reset of a merge after the statistics pass of its parents, every page of
the dashboard) run in it at once.

``"channels_last_weights"`` converts the 4-d parameters of the models in place for the pass and
restores their strides after (:func:`weights_in`): the caller's model is the one converted
(runners share its parameters), so code running it at the same time still computes the same
function, only in another layout.

Only float32 rounding depends on the layout (the convolutions add in another order): passes in
one layout are bit for bit the same, but two processes can choose differently and differ in the
last bits. ``CCAMERGE_LAYOUT=standard``, ``channels_last`` or ``channels_last_weights``
(environment, read at each pass, inherited by torchrun's workers) or :func:`pinned` (a block of
code) fix it, for runs that must agree bit for bit.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from ccamerge.errors import CcamergeError

LAYOUTS = ("auto", "standard", "channels_last", "channels_last_weights")
CANDIDATES = LAYOUTS[1:]
ENV_VAR = "CCAMERGE_LAYOUT"
# An undecided pass's first inputs: the first run in each layout pays one-time costs (first
# touch of the weights, kernel choices), the last three decide.
TRIAL = (*CANDIDATES, *reversed(CANDIDATES))
# From this many batches a pass decides on whole batches (3.5 of one model's batches, where the
# sixths cost one): at most 2% of an N = 2 pass.
LONG_PASS = 96
_FORMATS = {"standard": torch.contiguous_format, "channels_last": torch.channels_last,
            "channels_last_weights": torch.channels_last}

_PINNED: ContextVar[str | None] = ContextVar("ccamerge_layout", default=None)
_CHOSEN: dict[tuple, str] = {}
_CONVERTED: dict[int, _Converted] = {}  # parameters converted by weights_in, by id
_CONVERTING = threading.Lock()


def check_layout(layout: str) -> str:
    """``layout`` if it is one of :data:`LAYOUTS`, else one clear line."""
    if layout not in LAYOUTS:
        raise CcamergeError(f"unknown memory layout {layout!r}; use one of {', '.join(LAYOUTS)} "
                            f"(in {ENV_VAR} or ccamerge.layout.pinned)")
    return layout


def pinned_layout() -> str:
    """The layout of this context: :func:`pinned`'s, else ``$CCAMERGE_LAYOUT``, else ``"auto"``."""
    layout = _PINNED.get()
    if layout is None:
        layout = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    return check_layout(layout)


@contextmanager
def pinned(layout: str) -> Iterator[None]:
    """Run the image passes of the enclosed code in ``layout`` (``"auto"``: try and choose)."""
    token = _PINNED.set(check_layout(layout))
    try:
        yield
    finally:
        _PINNED.reset(token)


def forget_choices() -> None:
    """Forget the layouts chosen so far in this process (the next passes try again)."""
    _CHOSEN.clear()


def _structure(model: nn.Module) -> tuple:
    """What a layout choice depends on in a model: its module types and parameter shapes."""
    return (tuple(type(m).__name__ for m in model.modules()),
            tuple(tuple(p.shape) for p in model.parameters()))


def in_layout(xb: torch.Tensor, layout: str) -> torch.Tensor:
    """``xb`` ``[B, C, H, W]`` in ``layout`` (one of :data:`CANDIDATES`: channels-last for both
    channels-last layouts); other inputs as they are."""
    return xb.contiguous(memory_format=_FORMATS[layout]) if xb.dim() == 4 else xb


@contextmanager
def weights_in(models: nn.Module | Sequence[nn.Module], layout: str) -> Iterator[None]:
    """With ``layout == "channels_last_weights"``: every 4-d parameter ``[O, I, kH, kW]`` of
    ``models`` channels-last in place for the enclosed code (the same parameter objects, so
    copies sharing them, such as the statistics pass's runners, and the caller's model see it),
    back in its own strides after, also on an error. Memory-neutral: one tensor is copied at a
    time and the old one freed. Nested or concurrent uses on the same parameters (two
    dashboard sessions sharing cached models) convert once and restore when the last one
    leaves. Other layouts: nothing happens."""
    if layout != "channels_last_weights":
        yield
        return
    models = [models] if isinstance(models, nn.Module) else list(models)
    params = {id(p): p for m in models for p in m.parameters() if p.dim() == 4}  # shared: once
    held = _hold(list(params.values()))
    try:
        yield
    finally:
        _release(held)


@dataclass
class _Converted:
    """A parameter converted by :func:`weights_in`: its strides before, and how many hold it."""
    param: nn.Parameter
    size: torch.Size
    stride: tuple[int, ...]
    holders: int = 0


def _hold(params: list[nn.Parameter]) -> list[int]:
    """Convert each of ``params`` (distinct) to channels-last (a no-op where another holder
    has); their ids, for :func:`_release`."""
    held: list[int] = []
    try:
        with _CONVERTING, torch.no_grad():
            for p in params:
                entry = _CONVERTED.setdefault(id(p), _Converted(p, p.data.size(), p.data.stride()))
                entry.holders += 1
                held.append(id(p))
                p.data = p.data.contiguous(memory_format=torch.channels_last)
    except BaseException:
        _release(held)
        raise
    return held


def _release(held: list[int]) -> None:
    """Let go of ``held``; a parameter no one holds any more gets its own strides back."""
    with _CONVERTING, torch.no_grad():
        for key in held:
            entry = _CONVERTED[key]
            entry.holders -= 1
            if entry.holders:
                continue
            del _CONVERTED[key]
            p = entry.param
            if p.data.stride() != entry.stride:
                p.data = torch.empty_strided(entry.size, entry.stride, dtype=p.dtype,
                                             device=p.device).copy_(p.data)


def choose_layout(model: nn.Module, xb: torch.Tensor,
                  probe: Callable[[torch.Tensor], object] | None = None,
                  whole: bool = False) -> str:
    """The layout for passes of ``model`` over batches like ``xb`` ``[B, C, H, W]``: pinned
    (:func:`pinned_layout`), chosen before in this process for the same model structure, input
    shape, batch size, device and thread count, or chosen now by timing ``probe(part)`` (default
    ``model(part)``, without gradients) on the parts of ``xb`` in the layouts of :data:`TRIAL`:
    its sixths, or with ``whole`` (a long pass: :func:`long_pass`) sixths for the three warm-up
    tries and all of ``xb`` for the three that decide; ``model``'s weights are channels-last
    (:func:`weights_in`) for the tries of ``"channels_last_weights"``, their conversion untimed.
    ``"n/a"`` for inputs that are not images. The probe's outputs are discarded; it must not
    change the model (a BatchNorm net probes in eval mode)."""
    if xb.dim() != 4:
        return "n/a"
    pin = pinned_layout()
    if pin != "auto":
        return pin
    key = (_structure(model), tuple(xb.shape), str(xb.device), torch.get_num_threads())
    if key not in _CHOSEN:
        _CHOSEN[key] = _timed_choice(model, probe or model, xb, whole)
    return _CHOSEN[key]


def long_pass(images: int | None, batch_size: int) -> bool:
    """Whether a pass over ``images`` inputs (None: unknown) in batches of ``batch_size`` is long
    enough (:data:`LONG_PASS` batches) to decide its layout on whole batches."""
    return images is not None and images >= LONG_PASS * batch_size


def _timed_choice(model: nn.Module, probe: Callable[[torch.Tensor], object], xb: torch.Tensor,
                  whole: bool = False) -> str:
    tries, warm = len(TRIAL), len(CANDIDATES)
    parts = torch.tensor_split(xb, tries) if len(xb) >= tries else [xb] * tries
    if whole:
        parts = [*parts[:warm], *[xb] * (tries - warm)]  # warm up on sixths, decide on wholes
    per_image = []
    with torch.no_grad():
        for layout, part in zip(TRIAL, parts, strict=True):
            part = in_layout(part, layout)
            with weights_in(model, layout):
                start = _clock(xb.device)
                probe(part)
                per_image.append(((_clock(xb.device) - start) / len(part), layout))
    return min(per_image[warm:])[1]  # the warm tries decide


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
