"""Eager twins of compiled ``torch.nn`` layers, so that a replayed TorchScript archive takes
forward hooks and its BatchNorm layers are found by ``reset_batchnorm``.

A layer compiled by ``torch.jit.script`` keeps its constructor arguments as attributes; one
compiled by ``torch.jit.trace`` keeps only its tensors, so its arguments are read from the
constants of its ``aten`` call and the shapes of its weights. A twin replaces the compiled layer
only when it gives the same outputs on the inputs the layer saw.
"""

from __future__ import annotations

import inspect
import re

import torch
from torch import fx, nn

CONTAINERS = ("Sequential", "ModuleList", "ModuleDict", "ParameterList", "ParameterDict")


def qualified_type(module: torch.jit.ScriptModule) -> str:
    """``__torch__.torch.nn.modules.conv.Conv2d`` without TorchScript's name mangling."""
    return re.sub(r"___torch_mangle_\d+\.", "", module._c._type().qualified_name())


def is_leaf(module: nn.Module) -> bool:
    """A compiled ``torch.nn`` layer (not a container): replayed as one module call."""
    return (isinstance(module, torch.jit.ScriptModule)
            and qualified_type(module).startswith("__torch__.torch.nn.modules.")
            and module.original_name not in CONTAINERS)


def _eager_twin(scripted: torch.jit.ScriptModule) -> nn.Module | None:
    """An eager ``torch.nn`` layer with the scripted one's constructor arguments and state, or
    None when its arguments cannot be read back."""
    cls = getattr(nn, scripted.original_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        return None
    try:
        kwargs = _attribute_kwargs(cls, scripted)
        eager = cls(**(kwargs if kwargs is not None else _traced_kwargs(scripted)))
        eager.load_state_dict(scripted.state_dict())
    except Exception:  # any mismatch means: keep the compiled layer
        return None
    return eager.train(scripted.training)


def _attribute_kwargs(cls: type, scripted: torch.jit.ScriptModule) -> dict | None:
    """Constructor arguments read from the attributes ``torch.jit.script`` keeps."""
    kwargs = {}
    for name, param in list(inspect.signature(cls.__init__).parameters.items())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or name in ("device", "dtype"):
            continue
        if name == "bias" and param.default is True:
            kwargs[name] = getattr(scripted, "bias", None) is not None
        elif hasattr(scripted, name):
            kwargs[name] = getattr(scripted, name)
        elif param.default is inspect.Parameter.empty:
            return None
    return kwargs


# constructor arguments of a layer compiled by torch.jit.trace: (its aten op, {arg: input index})
_TRACED = {
    **{f"Conv{d}d": ("aten::_convolution", {"stride": 3, "padding": 4, "dilation": 5,
                                            "groups": 8}) for d in (1, 2, 3)},
    **{f"BatchNorm{d}d": ("aten::batch_norm", {"momentum": 6, "eps": 7}) for d in (1, 2, 3)},
    "LayerNorm": ("aten::layer_norm", {"normalized_shape": 1, "eps": 4}),
    "GroupNorm": ("aten::group_norm", {"num_groups": 1, "eps": 4}),
    "Linear": ("aten::linear", {}),
    **{f"MaxPool{d}d": (f"aten::max_pool{d}d", {"kernel_size": 1, "stride": 2, "padding": 3,
                                               "dilation": 4, "ceil_mode": 5}) for d in (1, 2, 3)},
    **{f"AdaptiveAvgPool{d}d": (f"aten::adaptive_avg_pool{d}d", {"output_size": 1})
       for d in (1, 2, 3)}}


def _traced_kwargs(scripted: torch.jit.ScriptModule) -> dict:
    """Constructor arguments of a traced layer: constants of its aten op and weight shapes."""
    kind, indices = _TRACED.get(scripted.original_name, (None, {}))
    node = next((n for n in scripted.graph.nodes() if n.kind() == kind), None)
    if node is None:
        return {}
    inputs = list(node.inputs())
    kwargs = {name: _constant_value(inputs[i]) for name, i in indices.items()}
    state = scripted.state_dict()
    weight, vector = state.get("weight"), state.get("running_mean", state.get("weight"))
    if kind == "aten::_convolution":
        kwargs.update(in_channels=weight.shape[1] * kwargs["groups"], out_channels=weight.shape[0],
                      kernel_size=tuple(weight.shape[2:]), bias="bias" in state)
    elif kind == "aten::batch_norm" and vector is not None:
        kwargs.update(num_features=vector.shape[0], affine="weight" in state,
                      track_running_stats="running_mean" in state)
    elif kind == "aten::layer_norm":
        kwargs.update(elementwise_affine="weight" in state, bias="bias" in state)
    elif kind == "aten::group_norm" and weight is not None:
        kwargs.update(num_channels=weight.shape[0])
    elif kind == "aten::linear":
        kwargs.update(in_features=weight.shape[1], out_features=weight.shape[0],
                      bias="bias" in state)
    return kwargs


def _constant_value(value):
    node = value.node()
    if node.kind() == "prim::Constant":
        return value.toIValue()
    if node.kind() == "prim::ListConstruct":
        return [_constant_value(v) for v in node.inputs()]
    raise ValueError(f"argument computed by {node.kind()}")


def _same(a: nn.Module, b: nn.Module, args: tuple, kwargs: dict) -> bool:
    try:
        out_a, out_b = a(*args, **kwargs), b(*args, **kwargs)
    except Exception:
        return False
    flat_a, flat_b = tensors(out_a), tensors(out_b)
    return len(flat_a) == len(flat_b) and all(
        x.shape == y.shape and torch.allclose(x, y, atol=1e-6)
        for x, y in zip(flat_a, flat_b, strict=True))


def tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors(v)]
    return []


@torch.no_grad()
def use_eager_layers(gm: fx.GraphModule, x: torch.Tensor) -> None:
    """Swap compiled leaf layers for eager twins that give the same outputs on their inputs."""
    seen: dict[str, tuple] = {}

    class Recorder(fx.Interpreter):
        def call_module(self, target, args, kwargs):
            seen.setdefault(target, (args, kwargs))
            return super().call_module(target, args, kwargs)

    Recorder(gm).run(x)
    for target, (args, kwargs) in seen.items():
        scripted = gm.get_submodule(target)
        eager = _eager_twin(scripted) if is_leaf(scripted) else None
        if eager is not None and _same(eager.eval(), scripted, args, kwargs):
            parent, _, name = target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, name, eager)
