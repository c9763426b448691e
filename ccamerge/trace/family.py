"""Traced models of one architecture at other hidden widths: the family check.

Models outside the built-in families form one family when

* their fx graphs are the same: the same operations in the same order, wired alike, with equal
  constant arguments;
* every module called has the same type and the same hyperparameters other than its widths
  (kernel sizes, strides, padding, groups, eps, ...: every attribute but :data:`WIDTHS`); a
  depthwise conv (``groups == in_channels``, the same channel multiplier ``out_channels /
  in_channels``) counts its ``groups`` as a width, which scales with its channels;
* their state dicts hold the same entries, whose shapes differ only along the axes of merge
  points (never the input channels, the class count or a channel group left unmerged);
* each model's own derived spec is model 0's resized to its widths
  (:func:`ccamerge.spec.resized_spec`): the same points with the same features, producers and
  consumers, only widths and concatenation offsets differ.

:func:`family_specs` checks this and returns every model's own spec; the first difference is
refused in one line naming the module (or state-dict entry, or merge point) and what differs.

Depthwise convs. A depthwise conv filters each channel alone, so the tracer keeps its input's
channel space through it (:meth:`ccamerge.trace.graph.Propagator._depthwise`): the space before
and after it is one merge point whose producers include the kernels (axis 0) and whose
statistics pool both sides, as a residual stream pools its writers. A permutation of that space
commutes with the conv exactly (the derived spec's check). A dense map (cca, gcca, ZipIt) does
not: mapping the kernels along axis 0 mixes the filters of several channels, as mapping
BatchNorm vectors with the conv rows does (the "paper" policy), and is exact only for
permutations and for a duplicated model's selection maps. That is the same approximation a
dense map already makes through every ReLU and BatchNorm, and the alternative, leaving the
channels around a depthwise conv unmerged, averages them unaligned: pairs of digits
MobileNet-style nets (98.3%) merged with cca keep 58.7% through the depthwise conv against
29.8% left unmerged (permute 72.9% against 31.6%, zipit 71.2% against 30.2%; 3 pairs,
``benchmarks/results/depthwise_check.md``). A grouped conv with
fewer groups than channels ties each output to a block of inputs that a permutation across
blocks breaks: it stays unsupported, and models whose ``groups`` differ are refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx, nn

from ccamerge.errors import CcamergeError
from ccamerge.spec import AlignmentSpec, resized_spec
from ccamerge.trace.derive import _graph_module, derive_and_verify
from ccamerge.trace.eager import qualified_type
from ccamerge.trace.graph import location

# constructor arguments that are widths: free to differ between models of one family
WIDTHS = frozenset({"in_channels", "out_channels", "in_features", "out_features", "num_features",
                    "normalized_shape", "num_channels"})
HINT = "only models of one architecture merge (their hidden widths may differ)"


def family_specs(models: Sequence[nn.Module], x: torch.Tensor,
                 names: Sequence[str] | None = None) -> list[AlignmentSpec]:
    """Every model's own spec (:func:`~ccamerge.trace.derive.derive_and_verify` on ``x``
    ``[B, ...]``), the models checked to be of one family (see the module docstring). Raises
    :class:`CcamergeError` naming the first model (by ``names``, default ``model i``), place
    and difference otherwise."""
    names = list(names or [f"model {k}" for k in range(len(models))])
    graphs = [_traced(names, index, m) for index, m in enumerate(models)]
    for index, graph in enumerate(graphs[1:], start=1):
        _refuse(names, index, graph_difference(graphs[0], graph))
    first = derive_and_verify(models[0], x).spec
    for index, model in enumerate(models[1:], start=1):
        _refuse(names, index, shape_difference(models[0], model, first))
    specs = [first, *(derive_and_verify(m, x).spec for m in models[1:])]
    for index, spec in enumerate(specs[1:], start=1):
        _refuse(names, index, point_difference(first, spec))
    return specs


def _traced(names: list[str], index: int, model: nn.Module) -> fx.GraphModule:
    """``model``'s fx graph; one line when torch.fx cannot trace it."""
    try:
        return _graph_module(model)
    except CcamergeError as exc:
        first = str(exc).splitlines()[0]
        raise CcamergeError(f"{names[index]}'s shapes differ from {names[0]}'s and it cannot be "
                            f"traced to tell whether only hidden widths do ({first}); {HINT}"
                            ) from exc


def _refuse(names: list[str], index: int, difference: str | None) -> None:
    if difference:
        raise CcamergeError(f"{names[index]} does not match {names[0]} ({difference}); {HINT}")


def widths_label(specs: Sequence[AlignmentSpec], limit: int = 4) -> str:
    """The merge points whose widths differ, each model's width in order:
    ``conv1 8 / 16, block 8 / 16`` (the first ``limit``, then how many more)."""
    rows = [(p.name, [s.point(p.name).width for s in specs]) for p in specs[0].points]
    differ = [f"{name} " + " / ".join(map(str, w)) for name, w in rows if len(set(w)) > 1]
    more = f" and {len(differ) - limit} more" if len(differ) > limit else ""
    return ", ".join(differ[:limit]) + more


# graphs -----------------------------------------------------------------------------------------
def graph_difference(a: fx.GraphModule, b: fx.GraphModule) -> str | None:
    """``"<where>: <what> <b's> vs <a's>"`` for the first operation of ``b`` that differs from
    ``a``'s (op, target, wiring, constant arguments, module type or hyperparameters), None
    when the graphs are the same."""
    nodes_a, nodes_b = list(a.graph.nodes), list(b.graph.nodes)
    for node_a, node_b in zip(nodes_a, nodes_b, strict=False):
        what = _node_difference(a, b, node_a, node_b)
        if what:
            return what
    if len(nodes_a) != len(nodes_b):
        return f"the graph: {len(nodes_b)} operations vs {len(nodes_a)}"
    return None


def _node_difference(a: fx.GraphModule, b: fx.GraphModule, na: fx.Node, nb: fx.Node
                     ) -> str | None:
    where = location(na)
    if (na.op, _target(na)) != (nb.op, _target(nb)):
        return f"{where}: operation {nb.op} {_target(nb)} vs {na.op} {_target(na)}"
    args_a, args_b = _wiring((na.args, na.kwargs)), _wiring((nb.args, nb.kwargs))
    if args_a != args_b:
        return f"{where}: arguments {args_b} vs {args_a}"
    if na.op != "call_module":
        return None
    return module_difference(str(na.target), a.get_submodule(na.target),
                             b.get_submodule(nb.target))


def _target(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _wiring(args) -> object:
    """Arguments with every node replaced by its name and every tensor by its shape."""
    if isinstance(args, fx.Node):
        return ("node", args.name)
    if isinstance(args, torch.Tensor):
        return ("tensor", tuple(args.shape))
    if isinstance(args, (list, tuple)):
        return type(args)(_wiring(v) for v in args)
    if isinstance(args, dict):
        return {k: _wiring(v) for k, v in args.items()}
    return args


def module_difference(name: str, a: nn.Module, b: nn.Module) -> str | None:
    """``"<name> (<Type>): <attribute> <b's> vs <a's>"`` for the first hyperparameter (not a
    width) that differs, or their types; None when only widths may differ."""
    type_a, type_b = _type_name(a), _type_name(b)
    if type_a != type_b:
        return f"{name}: module type {type_b} vs {type_a}"
    hyper_a, hyper_b = hyperparameters(a), hyperparameters(b)
    multiplier = depthwise_multiplier(a)
    if multiplier is not None and multiplier == depthwise_multiplier(b):
        hyper_a.pop("groups"), hyper_b.pop("groups")  # one group per channel: a width
    for key in dict.fromkeys([*hyper_a, *hyper_b]):
        if not _equal(hyper_a.get(key), hyper_b.get(key)):
            return f"{name} ({type_a}): {key} {hyper_b.get(key)} vs {hyper_a.get(key)}"
    return None


def depthwise_multiplier(module: nn.Module) -> int | None:
    """``out_channels / in_channels`` of a depthwise conv (one group per input channel, more
    than one channel), None for any other module."""
    if not isinstance(module, nn.modules.conv._ConvNd):
        return None
    if module.groups == 1 or module.groups != module.in_channels:
        return None
    return module.out_channels // module.in_channels


def _type_name(module: nn.Module) -> str:
    if isinstance(module, torch.jit.ScriptModule):
        return qualified_type(module)
    return type(module).__name__


def hyperparameters(module: nn.Module) -> dict:
    """A module's own plain attributes (its constructor arguments for ``torch.nn`` layers), the
    widths (:data:`WIDTHS`), private attributes and the training flag left out; none for a
    compiled (TorchScript) module, whose tensors' shapes are compared instead."""
    if isinstance(module, torch.jit.ScriptModule):
        return {}
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and k not in WIDTHS and k != "training"
            and not isinstance(v, nn.Module)}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.shape == b.shape and bool(torch.equal(a, b)))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an attribute without a truth value
        return a is b


# state dicts and merge points ------------------------------------------------------------------
def shape_difference(a: nn.Module, b: nn.Module, spec: AlignmentSpec) -> str | None:
    """``"<entry>: ..."`` for the first state-dict entry of ``b`` missing in ``a`` (or the
    reverse) or whose size differs along an axis that no merge point of ``spec`` (``a``'s)
    indexes; None when only merge points' widths differ."""
    shapes_a = {k: tuple(v.shape) for k, v in a.state_dict().items()}
    shapes_b = {k: tuple(v.shape) for k, v in b.state_dict().items()}
    for key in dict.fromkeys([*shapes_a, *shapes_b]):
        if key not in shapes_a or key not in shapes_b:
            return f"{key}: {'missing' if key not in shapes_b else 'an entry model 0 lacks'}"
    indexed = {(axis.param, axis.axis) for p in spec.points for axis in p.producers + p.consumers}
    for key, shape_a in shapes_a.items():
        shape_b = shapes_b[key]
        if len(shape_a) != len(shape_b):
            return f"{key}: shape {list(shape_b)} vs {list(shape_a)}"
        for axis, (da, db) in enumerate(zip(shape_a, shape_b, strict=True)):
            if da != db and (key, axis) not in indexed:
                return (f"{key}: size {db} vs {da} along axis {axis}, which holds no merge "
                        "point's units (input channels, classes or a group left unmerged)")
    return None


def point_difference(a: AlignmentSpec, b: AlignmentSpec) -> str | None:
    """``"merge point <name>: ..."`` for the first point of ``b`` that does not correspond one
    to one to ``a``'s at ``b``'s widths (names, features, producers, consumers, offsets); None
    when ``b`` is ``a`` resized to its widths."""
    if a.names != b.names:
        name = next((n for n in [*a.names, *b.names] if n not in a.names or n not in b.names),
                    None)
        if name is None:
            return f"the merge points: order {b.names} vs {a.names}"
        return f"merge point {name}: {'missing' if name in a.names else 'not in model 0'}"
    expected = resized_spec(a, {p.name: p.width for p in b.points})
    for want, have in zip(expected.points, b.points, strict=True):
        for part in ("features", "producers", "consumers"):
            extra = set(getattr(have, part)) ^ set(getattr(want, part))
            if extra:
                shown = sorted(f"{ax.param}[{ax.axis}]" if hasattr(ax, "param") else str(ax)
                               for ax in extra)
                return f"merge point {want.name}: its {part} differ ({', '.join(shown[:3])})"
    return None
