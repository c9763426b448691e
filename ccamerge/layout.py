"""The memory layout image passes run in: standard (NCHW) or channels-last (NHWC).

Which is faster depends on the model, its width and the device. On two CPU cores, batches of
500 3x32x32 images: ResNet20 runs 1.1-1.4x faster channels-last, VGG11 x1 about the same either
way, VGG11 x2 1.3x and x4 / x8 1.9x faster in the standard layout. A pass over many batches
(the statistics pass, a BatchNorm reset) first times one model on the four quarters of its first
batch (:data:`TRIAL`) and keeps the faster layout of the two warm tries: about one model's pass
over one batch, once. A long pass (:data:`LONG_PASS` batches or more) makes its two deciding
tries on the whole batch instead: on another 2-core CPU, VGG11 x1 ran 1.4x faster channels-last
at batches of 500 but only ~10% faster on quarter batches, within that machine's noise, and the
quarter probe once chose the standard layout. The choice is remembered for the process, per
model structure, batch shape, device and thread count, so later passes of such models (the
BatchNorm reset of a merge after the statistics pass of its parents, every page of the
dashboard) run in it at once.

Only float32 rounding depends on the layout (the convolutions add in another order): passes in
one layout are bit for bit the same, but two processes can choose differently and differ in the
last bits. ``CCAMERGE_LAYOUT=standard`` or ``channels_last`` (environment, read
at each pass, inherited by torchrun's workers) or :func:`pinned` (a block of code) fix it, for
runs that must agree bit for bit.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from ccamerge.errors import CcamergeError

LAYOUTS = ("auto", "standard", "channels_last")
ENV_VAR = "CCAMERGE_LAYOUT"
# An undecided pass's first inputs: the first two runs in each layout pay one-time costs (first
# touch of the weights, kernel choices), the last two decide.
TRIAL = ("standard", "channels_last", "channels_last", "standard")
# From this many batches a pass decides on whole batches (2.5 of one model's batches, where the
# quarters cost one): at most 2% of an N = 2 pass.
LONG_PASS = 64
_FORMATS = {"standard": torch.contiguous_format, "channels_last": torch.channels_last}

_PINNED: ContextVar[str | None] = ContextVar("ccamerge_layout", default=None)
_CHOSEN: dict[tuple, str] = {}


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
    """``xb`` ``[B, C, H, W]`` in ``layout`` (``"standard"`` or ``"channels_last"``); other
    inputs as they are."""
    return xb.contiguous(memory_format=_FORMATS[layout]) if xb.dim() == 4 else xb


def choose_layout(model: nn.Module, xb: torch.Tensor,
                  probe: Callable[[torch.Tensor], object] | None = None,
                  whole: bool = False) -> str:
    """The layout for passes of ``model`` over batches like ``xb`` ``[B, C, H, W]``: pinned
    (:func:`pinned_layout`), chosen before in this process for the same model structure, input
    shape, batch size, device and thread count, or chosen now by timing ``probe(part)`` (default
    ``model(part)``, without gradients) on the parts of ``xb`` in the layouts of :data:`TRIAL`:
    its quarters, or with ``whole`` (a long pass: :func:`long_pass`) quarters for the two warm-up
    tries and all of ``xb`` for the two that decide. ``"n/a"`` for inputs that are not images.
    The probe's outputs are discarded; it must not change the model (a BatchNorm net probes in
    eval mode)."""
    if xb.dim() != 4:
        return "n/a"
    pin = pinned_layout()
    if pin != "auto":
        return pin
    key = (_structure(model), tuple(xb.shape), str(xb.device), torch.get_num_threads())
    if key not in _CHOSEN:
        _CHOSEN[key] = _timed_choice(probe or model, xb, whole)
    return _CHOSEN[key]


def long_pass(images: int | None, batch_size: int) -> bool:
    """Whether a pass over ``images`` inputs (None: unknown) in batches of ``batch_size`` is long
    enough (:data:`LONG_PASS` batches) to decide its layout on whole batches."""
    return images is not None and images >= LONG_PASS * batch_size


def _timed_choice(probe: Callable[[torch.Tensor], object], xb: torch.Tensor,
                  whole: bool = False) -> str:
    parts = torch.tensor_split(xb, len(TRIAL)) if len(xb) >= len(TRIAL) else [xb] * len(TRIAL)
    if whole:
        parts = [*parts[:2], xb, xb]  # warm up on quarters, decide on the whole batch
    per_image = []
    with torch.no_grad():
        for layout, part in zip(TRIAL, parts, strict=True):
            part = in_layout(part, layout)
            start = _clock(xb.device)
            probe(part)
            per_image.append(((_clock(xb.device) - start) / len(part), layout))
    return min(per_image[2:])[1]  # the warm tries decide


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
