"""The merged model's width (``target_width``): the model a merge into a chosen width fills, the
widths of its merge points, and the checks that come before any work.

``target_width`` is in the unit every built-in family's config takes: the ``width`` multiplier
(``mlp``: hidden widths ``round(h * width)`` for ``h`` in ``hidden``; ``vgg``: conv and
classifier widths ``round(c * width)``; ``resnet20``: ``16, 32, 64`` times it). The merged model
is ``build_model(arch, **(reference.config | {"width": target_width}))``: the reference's layout
at that multiplier, and every merge point's width follows from it. It may not exceed the
narrowest model at any merge point; merging into a narrower width is compression (see
:mod:`ccamerge.methods.narrow`). Only methods with shared or canonical directions to choose the
kept units from (``Method.target_width``: cca, gcca) take it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ccamerge.errors import CcamergeError
from ccamerge.methods import get_method
from ccamerge.methods.registry import METHODS
from ccamerge.models import ARCHITECTURES, build_model
from ccamerge.spec import build_spec, model_widths
from ccamerge.transform import Transform, apply_transforms, with_state


def target_width_methods() -> list[str]:
    """Names of the methods that merge into a chosen width, registry order."""
    return [m.name for m in METHODS.values() if m.target_width]


def point_widths(model: nn.Module) -> dict[str, int]:
    """``{merge point: width}`` of a built-in model."""
    return {p.name: p.width for p in build_spec(model).points}


def shell(reference: nn.Module, target_width: float) -> nn.Module:
    """An untrained model of the reference's family and layout at multiplier ``target_width``."""
    return build_model(reference.arch, **(reference.config | {"width": float(target_width)}))


def largest_width(models: Sequence[nn.Module], reference: int) -> float:
    """The largest ``target_width`` that keeps every merge point within the narrowest model:
    ``min_p narrowest_p / base_p`` (``base_p``: the reference's layout at multiplier 1)."""
    base = point_widths(shell(models[reference], 1.0))
    narrowest = {name: min(row) for name, row in
                 model_widths(list(models), build_spec(models[reference])).items()}
    return min(narrowest[name] / base[name] for name in base)


def reference_for(models: Sequence[nn.Module], reference: int, target_width) -> int:
    """The reference of a merge into ``target_width``: ``reference``, unless another model has
    exactly the widths ``target_width`` gives (the first such; the merge is then the one into
    that model, as ``target_model`` would make it, instead of a compression of the
    reference's units)."""
    if target_width is None or not all(getattr(m, "arch", None) in ARCHITECTURES
                                       for m in models):
        return reference
    check_value(target_width)
    widths = point_widths(shell(models[reference], target_width))
    if point_widths(models[reference]) == widths:
        return reference
    return next((i for i, m in enumerate(models) if point_widths(m) == widths), reference)


def plan(models: Sequence[nn.Module], method: str, reference: int,
         target_width: float | None) -> tuple[nn.Module | None, dict[str, int] | None]:
    """``(merged model to fill, {point: width})`` for a merge into ``target_width``, or
    ``(None, None)`` when there is none or it gives the reference's widths at every point (the
    merge is then the one into the reference, unchanged). Refusals are one line."""
    if target_width is None:
        return None, None
    check(models, method, reference, target_width)
    merged = shell(models[reference], target_width)
    widths = point_widths(merged)
    if widths == point_widths(models[reference]):
        return None, None
    return merged, widths


def check(models: Sequence[nn.Module], method: str, reference: int, target_width) -> None:
    """One line for a ``target_width`` that is not a positive finite number, for models outside
    the built-in families, for a method that cannot narrow, or for a width wider than the
    narrowest model at some merge point (saying the largest allowed)."""
    check_value(target_width)
    if not all(getattr(m, "arch", None) in ARCHITECTURES for m in models):
        raise CcamergeError("target_width needs built-in models (mlp, vgg, resnet20), whose config "
                            "gives the merged model's widths; merge other models into a model's "
                            "width with target_model")
    if not get_method(method).target_width:
        raise CcamergeError(f"{method} cannot merge into a chosen width: the kept units are picked "
                            "from the reference's shared or canonical directions, which only "
                            f"{' and '.join(target_width_methods())} compute")
    allowed = largest_width(models, reference)
    if target_width > allowed + 1e-12:
        raise CcamergeError(f"target_width {target_width:g} is wider than the narrowest model at "
                            f"some merge point; the largest allowed is {allowed:g}")


def check_value(target_width) -> None:
    """One line unless ``target_width`` is a positive finite number."""
    if isinstance(target_width, bool) or not isinstance(target_width, int | float) \
            or not math.isfinite(target_width) or target_width <= 0:
        raise CcamergeError(f"target_width must be a positive number (the family's width "
                            f"multiplier), got {target_width!r}")


def fit_static(state: dict[str, torch.Tensor], merged: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` with each 1-d entry that no transform resized (a folded BatchNorm's constant
    scale and statistics, see :mod:`ccamerge.batchnorm`) cut to ``merged``'s size."""
    shapes = {k: v.shape for k, v in merged.state_dict().items()}
    return {k: v[:shapes[k][0]] if v.dim() == 1 and v.shape != shapes[k] else v
            for k, v in state.items()}


def truncated(model: nn.Module, target_width: float) -> nn.Module:
    """The trivial compression a merge into ``target_width`` should beat: ``model`` rebuilt at
    that width multiplier with the first units of every merge point kept and the rest dropped
    (producers' rows and consumers' columns cut), eval mode."""
    spec = build_spec(model)
    narrow = shell(model, target_width)
    kept = point_widths(narrow)
    maps = {p.name: Transform(np.eye(p.width)[:, :kept[p.name]], np.eye(p.width)[:kept[p.name]])
            for p in spec.points}
    return with_state(narrow, apply_transforms(model.state_dict(), spec, maps)).eval()
