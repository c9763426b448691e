"""A traced model at other hidden widths: the merged model of a ``target_width`` merge.

A model outside the built-in families has no config to rebuild it at another width, so the
model at ``widths`` (``{merge point: width}``) is a copy of the model itself whose tensors are
resized: every state-dict entry grows or shrinks along the axes the merge points index (their
producers and consumers, concatenation offsets included: :func:`ccamerge.spec.resized_spec`),
and the width attributes of ``torch.nn`` layers follow (``out_channels``, ``in_features``,
``num_features``, ...; a depthwise conv's ``groups`` with its channels). The same works for an
fx GraphModule, a replayed TorchScript archive and the archive itself (whose compiled layers
read their tensors' shapes, not those attributes).

The copy is checked before use (:func:`check_resized`): the reference with every dropped unit
silenced (its producers' rows and consumers' columns zeroed) must compute what the copy
computes with the kept units' weights. A forward whose code fixes some width (a reshape to a
constant size, a slice of the first 8 channels) fails that check, and is refused in one line.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ccamerge.errors import CcamergeError
from ccamerge.spec import AlignmentSpec
from ccamerge.trace.torchscript import set_tensor, with_script_state
from ccamerge.transform import Transform, apply_transforms, with_state

CHECK_TOL = 1e-4  # relative to the outputs' scale; float32 forwards of the same weights


def resized_shapes(state: dict[str, torch.Tensor], spec: AlignmentSpec,
                   widths: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """``{entry: shape}`` of ``state`` (a model whose merge points ``spec`` describes) at
    ``widths``: each axis a point indexes changes by ``(new - old) * repeat``."""
    shapes = {k: list(v.shape) for k, v in state.items()}
    for point in spec.points:
        extra = widths.get(point.name, point.width) - point.width
        for axis in point.producers + point.consumers:
            shapes[axis.param][axis.axis] += extra * axis.repeat
    return {k: tuple(s) for k, s in shapes.items()}


def resized_copy(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    """A deep copy of ``model`` whose entries have ``shapes`` (zeros where resized) and whose
    ``torch.nn`` layers' width attributes match them."""
    clone = copy.deepcopy(model)
    for key, tensor in model.state_dict().items():
        if tuple(tensor.shape) != shapes[key]:
            set_tensor(clone, key, tensor.new_zeros(shapes[key]))
    for module in clone.modules():
        if not isinstance(module, torch.jit.ScriptModule):
            _match_widths(module)
    return clone


def _match_widths(module: nn.Module) -> None:
    """A layer's width attributes from its (resized) tensors."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        depthwise = module.groups > 1 and module.groups == module.in_channels
        multiplier = module.out_channels // module.in_channels if depthwise else 1
        module.out_channels = weight.shape[0]
        module.groups = weight.shape[0] // multiplier if depthwise else module.groups
        module.in_channels = weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        vector = module.running_mean if module.running_mean is not None else weight
        if vector is not None:
            module.num_features = vector.shape[0]
    elif isinstance(module, nn.GroupNorm) and weight is not None:
        module.num_channels = weight.shape[0]
    elif isinstance(module, nn.LayerNorm) and weight is not None:
        module.normalized_shape = tuple(weight.shape)


def kept_units(spec: AlignmentSpec, widths: dict[str, int]) -> dict[str, Transform]:
    """Per point, the map keeping its first ``widths[name]`` units: ``T = I[:, :w]`` ``[n, w]``,
    ``T_inv = I[:w]``."""
    return {p.name: Transform(np.eye(p.width)[:, :widths[p.name]],
                              np.eye(p.width)[:widths[p.name]]) for p in spec.points}


def silenced_units(spec: AlignmentSpec, widths: dict[str, int]) -> dict[str, Transform]:
    """Per point, the map zeroing every unit past the first ``widths[name]``: ``diag(mask)``."""
    maps = {}
    for p in spec.points:
        mask = np.diag((np.arange(p.width) < widths[p.name]).astype(float))  # [n, n]
        maps[p.name] = Transform(mask, mask)
    return maps


@torch.no_grad()
def check_resized(model: nn.Module, narrow: nn.Module, spec: AlignmentSpec,
                  widths: dict[str, int], x: torch.Tensor, name: str = "the model") -> None:
    """One line unless ``narrow`` (``model`` at ``widths``) carrying the first units of every
    point computes on ``x`` ``[B, ...]`` what ``model`` computes with the other units
    silenced (see the module docstring); the same for ``model.script`` (a replayed archive's
    compiled module) carrying those weights (what :func:`ccamerge.io.save_merged` writes)."""
    state = model.state_dict()
    kept = apply_transforms(state, spec, kept_units(spec, widths))
    want = with_state(model, apply_transforms(state, spec, silenced_units(spec, widths))).eval()(x)
    candidates = [("its copy", lambda: with_state(narrow, kept), "its code likely fixes some "
                   "widths")]
    if getattr(model, "script", None) is not None:
        candidates.append(("its TorchScript archive", lambda: with_script_state(model.script, kept),
                           "an archive's compiled code fixes some widths (e.g. a depthwise "
                           "conv's groups)"))
    for what, build, why in candidates:
        problem = _difference(build, x, want)
        if problem:
            raise CcamergeError(f"{name} cannot be rebuilt at other widths: {what} at the target "
                                f"widths {problem}, so {why}; merge into one model's widths with "
                                "target_model instead")


def _difference(build, x: torch.Tensor, want: torch.Tensor) -> str | None:
    """Why ``build()``'s outputs on ``x`` are not ``want``, None when they are."""
    try:
        got = build().eval()(x)
    except Exception as exc:  # noqa: BLE001 - the model's own code at other widths
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"fails to run ({type(exc).__name__}: {first})"
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return "gives outputs of another shape"
    scale = float(want.abs().max()) or 1.0
    error = float((got - want).abs().max())
    return None if error <= CHECK_TOL * scale else f"computes other outputs (by {error:.3g})"


def resized_model(model: nn.Module, spec: AlignmentSpec, widths: dict[str, int],
                  x: torch.Tensor, name: str = "the reference") -> nn.Module:
    """``model`` (whose merge points ``spec`` describes) at ``widths`` ``{point: width}``, each
    at most the point's width: an untrained resized copy (see the module docstring) in eval
    mode, checked on ``x`` ``[B, ...]``. One line when the model cannot be resized."""
    narrow = resized_copy(model, resized_shapes(model.state_dict(), spec, widths)).eval()
    check_resized(model, narrow, spec, widths, x, name)
    return narrow
