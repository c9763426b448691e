"""The merged model's width (``target_width``): the model a merge into a chosen width fills, the
widths of its merge points, and the checks that come before any work.

For the built-in families ``target_width`` is in the unit their config takes: the ``width``
multiplier (``mlp``: hidden widths ``round(h * width)`` for ``h`` in ``hidden``; ``vgg``: conv
and classifier widths ``round(c * width)``; ``resnet20``: ``16, 32, 64`` times it). The merged
model is ``build_model(arch, **(reference.config | {"width": target_width}))``: the reference's
layout at that multiplier, and every merge point's width follows from it.

Traced models (fx-traceable modules, TorchScript archives) have no such multiplier: for them
``target_width`` is a fraction ``W`` in ``(0, 1]`` of the reference's widths, the same at every
merge point: a point of width ``n`` gets ``max(1, round(W * n))`` units (channels left unmerged,
the input and the classes keep theirs). The merged model is a resized copy of the reference
(:mod:`ccamerge.trace.resize`), checked to be a real instance at those widths.

Either way it may not exceed the narrowest model at any merge point; merging into a narrower
width is compression (see :mod:`ccamerge.methods.narrow`). Only methods with shared or canonical
directions to choose the kept units from (``Method.target_width``: cca, gcca) take it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from torch import nn

from ccamerge.data.fit import (
    check_traced_family,
    is_builtin,
    resolve_spec,
    shapes_differ,
    train_source,
)
from ccamerge.errors import CcamergeError
from ccamerge.methods import get_method
from ccamerge.methods.registry import METHODS
from ccamerge.models import build_model
from ccamerge.spec import AlignmentSpec, build_spec, model_widths
from ccamerge.trace.resize import resized_model
from ccamerge.transform import Transform, apply_transforms, with_state

CHECK_INPUTS = 16  # inputs the resized copy of a traced reference is checked on


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
    """The reference of a merge into ``target_width``: ``reference``, unless another built-in
    model has exactly the widths ``target_width`` gives (the first such; the merge is then the
    one into that model, as ``target_model`` would make it, instead of a compression of the
    reference's units). Traced models keep ``reference``: their ``target_width`` is a fraction
    of its widths (give ``target_model`` to merge into another model's widths)."""
    if target_width is None or not all(is_builtin(m) for m in models):
        return reference
    check_value(target_width)
    widths = point_widths(shell(models[reference], target_width))
    if point_widths(models[reference]) == widths:
        return reference
    return next((i for i, m in enumerate(models) if point_widths(m) == widths), reference)


def plan(models: Sequence[nn.Module], method: str, reference: int, target_width: float | None,
         data=None) -> tuple[nn.Module | None, dict[str, int] | None]:
    """``(merged model to fill, {point: width})`` for a merge into ``target_width``, or
    ``(None, None)`` when there is none or it gives the reference's widths at every point (the
    merge is then the one into the reference, unchanged). ``data``: the merge's (traced models
    are measured and their resized copy checked on it). Refusals are one line."""
    if target_width is None:
        return None, None
    check_value(target_width)
    if not all(is_builtin(m) for m in models):
        return traced_plan(models, method, reference, target_width, data)
    check(models, method, reference, target_width)
    merged = shell(models[reference], target_width)
    widths = point_widths(merged)
    if widths == point_widths(models[reference]):
        return None, None
    return merged, widths


def check(models: Sequence[nn.Module], method: str, reference: int, target_width) -> None:
    """One line for a ``target_width`` that is not a positive finite number, for a method that
    cannot narrow, or for a width wider than the narrowest built-in model at some merge point
    (saying the largest allowed)."""
    check_value(target_width)
    check_method(method)
    refuse_wider(target_width, largest_width(models, reference))


def check_method(method: str) -> None:
    """One line unless ``method`` merges into a chosen width."""
    if not get_method(method).target_width:
        raise CcamergeError(f"{method} cannot merge into a chosen width: the kept units are picked "
                            "from the reference's shared or canonical directions, which only "
                            f"{' and '.join(target_width_methods())} compute")


def refuse_wider(target_width: float, allowed: float) -> None:
    if target_width > allowed + 1e-12:
        raise CcamergeError(f"target_width {target_width:g} is wider than the narrowest model at "
                            f"some merge point; the largest allowed is {allowed:g}")


def check_value(target_width) -> None:
    """One line unless ``target_width`` is a positive finite number."""
    if isinstance(target_width, bool) or not isinstance(target_width, int | float) \
            or not math.isfinite(target_width) or target_width <= 0:
        raise CcamergeError(f"target_width must be a positive number (the built-in families' "
                            f"width multiplier, or for traced models a fraction of the "
                            f"reference's widths), got {target_width!r}")


# traced models ----------------------------------------------------------------------------------
def fraction_widths(spec: AlignmentSpec, fraction: float) -> dict[str, int]:
    """``{point: max(1, round(fraction * width))}`` over the points of ``spec``."""
    return {p.name: max(1, round(fraction * p.width)) for p in spec.points}


def traced_widths(models: Sequence[nn.Module], reference: int, data
                  ) -> tuple[AlignmentSpec, list[dict[str, int]]]:
    """The reference's derived spec and every model's ``{point: width}``, from each model's
    own spec when their shapes differ (checked to be one family:
    :func:`ccamerge.data.fit.check_traced_family`)."""
    source = train_source(data)
    if not shapes_differ(models):
        spec = resolve_spec([models[reference]], source)
        return spec, [{p.name: p.width for p in spec.points}] * len(models)
    specs = check_traced_family(models, source.head(64), None)
    return specs[reference], [{p.name: p.width for p in s.points} for s in specs]


def largest_fraction(spec: AlignmentSpec, rows: Sequence[dict[str, int]]) -> float:
    """The largest traced ``target_width``: ``min_p narrowest_p / width_p`` (at most 1)."""
    return min((min(row[p.name] for row in rows) / p.width for p in spec.points), default=1.0)


def traced_plan(models: Sequence[nn.Module], method: str, reference: int, target_width: float,
                data) -> tuple[nn.Module | None, dict[str, int] | None]:
    """:func:`plan` for models outside the built-in families: the reference resized to
    ``target_width`` times its widths (:func:`ccamerge.trace.resize.resized_model`)."""
    check_method(method)
    if target_width > 1:
        raise CcamergeError(f"target_width for traced models is a fraction of the reference's "
                            f"widths in (0, 1], got {target_width:g}")
    spec, rows = traced_widths(models, reference, data)
    refuse_wider(target_width, largest_fraction(spec, rows))
    widths = fraction_widths(spec, target_width)
    if widths == rows[reference]:
        return None, None
    x = train_source(data).head(CHECK_INPUTS)
    return resized_model(models[reference], spec, widths, x, f"model {reference}"), widths


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
