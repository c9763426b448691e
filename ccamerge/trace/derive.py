"""Bring your own architecture: derive a model's merge points by tracing it, verify, explain.

    >>> derived = derive_and_verify(model, x[:64])        # x: inputs [B, ...]
    >>> derived.spec, derived.verification, derived.unsupported
    >>> explain(derived)                                  # JSON-able, with DOT and Mermaid diagrams

:func:`derive_spec` traces an ``nn.Module`` with ``torch.fx`` (a TorchScript archive is replayed
as an fx graph first, :mod:`ccamerge.trace.torchscript`), propagates shapes with
``example_input`` and follows channel spaces through the graph (:mod:`ccamerge.trace.graph`).
The result is a plain :class:`~ccamerge.spec.AlignmentSpec`, the same data as a hand-written
one. Operations that break alignment are reported by name, location and reason, and every
channel group touching them is left unmerged (``DerivedSpec.unmerged``), never merged wrongly.
:func:`derive_and_verify` then permutes each merge point at random and drops any point that
changes the outputs.

A merge point's features are the output of the module the next layer reads (after its
activation). When that value comes from a function call (``F.relu``) or a module used twice, no
forward hook can see it: the nearest hookable module output in the same channel space is used
instead, and ``DerivedSpec.notes`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ccamerge.errors import CcamergeError
from ccamerge.spec import AlignmentSpec, MergePoint
from ccamerge.trace.graph import Propagator, dims, first_node, flat_nodes, location, propagate
from ccamerge.trace.ops import module_type
from ccamerge.trace.torchscript import script_to_module
from ccamerge.transform import (
    verify_spec,
)

TRANSPARENT = ("pass", "reshape", "index", "permute", "reduce")
UNARY = ("activation", "channel_norm", "layer_norm", "group_norm")


@dataclass
class DerivedSpec:
    """A traced spec and what the trace found.

    ``unsupported``: ``{"op", "location", "reason"}`` per operation that breaks alignment;
    ``unmerged``: channel groups with parameters that are left alone, and why; ``notes``: where
    features are read elsewhere than the next layer's input; ``graph``: nodes for diagrams;
    ``model``: the module whose state-dict keys and submodules the spec names (for a TorchScript
    archive its eager replay); ``verification``: max |output difference| per merge point after
    a random permutation (set by :func:`derive_and_verify`).
    """

    spec: AlignmentSpec
    unsupported: list[dict]
    unmerged: list[str]
    notes: list[str]
    graph: list[dict]
    model: nn.Module
    verification: dict[str, float] | None = None
    tolerance: float | None = None
    rejected: dict[str, float] = field(default_factory=dict)

    @property
    def verified(self) -> bool:
        """True when verification ran and every kept point (and all together) passed."""
        return self.verification is not None and all(
            d <= self.tolerance for d in self.verification.values())


# tracing --------------------------------------------------------------------------------------
def _graph_module(model: nn.Module) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule):
        return model
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types for untraceable Python
        raise CcamergeError(f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: "
                            f"{exc}. Tracing needs a forward without control flow that depends "
                            "on tensor values") from exc


@torch.no_grad()
def _shape_prop(gm: fx.GraphModule, x: torch.Tensor) -> None:
    """Run ``x`` through ``gm`` in eval mode, recording every node's output shape."""
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        ShapeProp(gm).propagate(x)
    except Exception as exc:
        raise CcamergeError(f"the example input {list(x.shape)} does not run through the model: "
                            f"{type(exc).__name__}: {exc}") from exc
    finally:
        for m, mode in modes.items():
            m.training = mode


def derive_spec(model: nn.Module, example_input: torch.Tensor) -> DerivedSpec:
    """Trace ``model`` on ``example_input`` ``[B, ...]`` and derive its merge points.

    A ``torch.jit.ScriptModule`` is first replayed as a hookable module
    (:func:`ccamerge.trace.torchscript.script_to_module`); the result's ``model`` is then the
    replay and its spec's keys are the archive's.
    Raises :class:`CcamergeError` when the model cannot be traced or does not run on the input.
    """
    if isinstance(model, torch.jit.ScriptModule):
        replay = script_to_module(model, example_input)
        derived = derive_spec(replay, example_input)
        derived.notes = [*replay.replay_notes, *derived.notes]
        return derived
    gm = _graph_module(model)
    _shape_prop(gm, example_input)
    prop = propagate(gm)
    points, unmerged, notes, by_root = _points(prop)
    return DerivedSpec(AlignmentSpec(tuple(points)), prop.unsupported, unmerged, notes,
                       _graph(prop, points, by_root), model)


# features ---------------------------------------------------------------------------------------
def _pure(prop: Propagator, node: fx.Node, root: int) -> bool:
    """The node's output holds exactly the channels of space ``root``, one entry each."""
    layout, shape = prop.layouts.get(node.name), dims(node)
    return (layout is not None and len(layout) == 1 and layout[0].repeat == 1
            and prop.spaces.find(layout[0].space) == root and shape is not None and len(shape) >= 2)


def _hookable(prop: Propagator, node: fx.Node) -> bool:
    """A forward hook on the node's module sees exactly this node's output."""
    return (node.op == "call_module" and prop.calls[node.target] == 1
            and not isinstance(prop.modules[node.target], torch.jit.ScriptModule))


def _label(prop: Propagator, node: fx.Node) -> str:
    return f"{prop.infos[node.name].name} at {location(node)}"


def _cat_source(prop: Propagator, node: fx.Node, root: int) -> fx.Node | None:
    for arg in node.args[0]:
        if any(prop.spaces.find(s.space) == root for s in prop.layouts.get(arg.name) or ()):
            return arg
    return None


def _feature(prop: Propagator, reader: fx.Node, root: int) -> tuple[str | None, tuple | None]:
    """Module whose output gives the features a layer reads from ``reader``, with
    ``(side, op label, why)`` when it is not the op that computed those values. Walks back
    through transparent ops (pooling, reshapes, dropout) to the first op that computes them; if
    that op cannot be hooked, takes the nearest hookable module after it (a pooling module),
    else before it (through activations and norms). Failure: ``(None, (None, label, None))``."""
    cur, first, below = reader, None, None
    while cur is not None:
        kind = prop.infos[cur.name].kind
        if kind == "cat":
            cur = _cat_source(prop, cur, root)
            continue
        good = _pure(prop, cur, root) and _hookable(prop, cur)
        if first is None and kind in TRANSPARENT:
            below = cur if good else below
        elif first is None:
            first = cur
            if good:
                return cur.target, None
            if below is not None and _pure(prop, cur, root):
                return below.target, ("after", _label(prop, first), _why(prop, first, root))
            if kind not in UNARY:
                break
        elif good:
            return cur.target, ("before", _label(prop, first), _why(prop, first, root))
        elif kind not in UNARY and kind not in TRANSPARENT:
            break
        cur = first_node(cur)
    return None, (None, _label(prop, first) if first is not None else location(reader), None)


def _why(prop: Propagator, node: fx.Node, root: int) -> str:
    if _pure(prop, node, root):
        return "which cannot be hooked (a function call or a module used twice)"
    return "whose output also holds other channel groups (a concatenation)"


def _module_label(prop: Propagator, target: str) -> str:
    return f"{target} ({module_type(prop.modules[target])})"


def _features(prop: Propagator, root: int) -> tuple[list[str], list[str], list[str]]:
    """``(features, notes, failures)`` over every layer reading space ``root``."""
    order = {n.target: i for i, n in enumerate(prop.gm.graph.nodes) if n.op == "call_module"}
    found, detours, failed = set(), {}, []
    for name in dict.fromkeys(prop.spaces.items[root].reads):
        module, detour = _feature(prop, _node(prop, name), root)
        if module is not None:
            found.add(module)
        if detour is not None and module is not None:
            detours.setdefault((module, detour[0], detour[2]), []).append(detour[1])
        elif detour is not None:
            failed.append(detour[1])
    notes = [f"features at {_module_label(prop, module)}, {side} {', '.join(dict.fromkeys(ops))}, "
             f"{why}" + ("; the statistics see the values before it" if side == "before" else "")
             for (module, side, why), ops in detours.items()]
    failures = [f"the values the next layer reads come from {', '.join(dict.fromkeys(failed))}, "
                "which cannot be hooked (a function call or a module used twice) and have no "
                "hookable module beside them; use a separate nn.Module (e.g. nn.ReLU) there"
                ] if failed else []
    return sorted(found, key=order.get), notes, failures


def _node(prop: Propagator, name: str) -> fx.Node:
    return prop.nodes[name]


# merge points -----------------------------------------------------------------------------------
def _describe(prop: Propagator, root: int) -> str:
    space = prop.spaces.items[root]
    layers = []
    for name in dict.fromkeys(space.origin):
        node = _node(prop, name)
        if node.op == "call_module":
            layers.append(f"{node.target} ({prop.infos[name].name})")
        else:
            layers.append(_label(prop, node))
    return f"{space.width} channels from {', '.join(layers)}"


def _points(prop: Propagator) -> tuple[list[MergePoint], list[str], list[str], dict[int, str]]:
    """Merge points (in graph order), unmerged channel groups, notes, ``{space root: point}``."""
    order = {n.name: i for i, n in enumerate(prop.gm.graph.nodes)}
    roots = sorted(prop.spaces.roots(),
                   key=lambda r: min(order[o] for o in prop.spaces.items[r].origin))
    points, unmerged, notes, names, by_root = [], [], [], set(), {}
    for root in roots:
        space = prop.spaces.items[root]
        if not space.producers:
            continue
        what = _describe(prop, root)
        if space.blocked:
            unmerged.append(f"{what}: {'; '.join(dict.fromkeys(space.blocked))}")
            continue
        if not space.consumers:
            unmerged.append(f"{what}: no layer reads them")
            continue
        features, point_notes, failures = _features(prop, root)
        if not features:
            unmerged.append(f"{what}: {'; '.join(failures)}")
            continue
        name = _unique(features[0], names)
        by_root[root] = name
        notes += [f"merge point {name}: {n}" for n in point_notes + failures]
        points.append(MergePoint(name, space.width, tuple(features),
                                 tuple(dict.fromkeys(space.producers)),
                                 tuple(dict.fromkeys(space.consumers))))
    return points, unmerged, notes, by_root


def _unique(name: str, taken: set[str]) -> str:
    candidate, k = name, 2
    while candidate in taken:
        candidate, k = f"{name}#{k}", k + 1
    taken.add(candidate)
    return candidate


def _graph(prop: Propagator, points: list[MergePoint], by_root: dict[int, str]) -> list[dict]:
    """Tensor-carrying nodes for diagrams: op, module, inputs, shape, merge points on its
    output, the point whose features it gives, and the reason if it is unsupported."""
    by_feature = {f: point.name for point in points for f in point.features}
    rows, kept = [], set()
    for node in prop.gm.graph.nodes:
        info = prop.infos[node.name]
        if info.kind in ("param", "shape") or (dims(node) is None and node.op == "call_function"
                                                and node.name not in prop.failed):
            continue
        kept.add(node.name)
        layout = prop.layouts.get(node.name) or ()
        rows.append({
            "id": node.name, "op": info.name, "kind": info.kind,
            "module": str(node.target) if node.op == "call_module" else None,
            "inputs": list(dict.fromkeys(a.name for a in flat_nodes(node.args) if a.name in kept)),
            "shape": list(dims(node)) if dims(node) else None,
            "points": _carried(prop, layout, by_root),
            "features_of": by_feature.get(node.target) if node.op == "call_module" else None,
            "unsupported": prop.failed.get(node.name)})
    return rows


def _carried(prop: Propagator, layout, by_root: dict[int, str]) -> list[str]:
    roots = (prop.spaces.find(seg.space) for seg in layout)
    return list(dict.fromkeys(by_root[r] for r in roots if r in by_root))


# verification -----------------------------------------------------------------------------------
def has_offsets(spec: AlignmentSpec) -> bool:
    """True when some layer reads a concatenation (an axis whose block starts past 0)."""
    return any(a.offset for p in spec.points for a in p.producers + p.consumers)


def verify(model: nn.Module, spec: AlignmentSpec, x: torch.Tensor, *,
           seed: int = 0) -> dict[str, float]:
    """Max |output difference| after permuting each merge point alone (and ``"all"`` together)
    through ``spec`` (:func:`ccamerge.transform.verify_spec`)."""
    return verify_spec(model, spec, x, seed=seed)


def derive_and_verify(model: nn.Module, x: torch.Tensor, *, tol: float = 1e-4,
                      seed: int = 0) -> DerivedSpec:
    """:func:`derive_spec`, then :func:`verify` on ``x``; points whose permutation changes the
    outputs by more than ``tol`` are dropped (``rejected``, ``unmerged``), and if all points
    together still fail, no point is kept. ``verification`` holds the report of the kept spec."""
    derived = derive_spec(model, x)
    report = verify(model, derived.spec, x, seed=seed)
    bad = {n: d for n, d in report.items() if n != "all" and d > tol}
    if bad:
        derived.spec = AlignmentSpec(tuple(p for p in derived.spec.points if p.name not in bad))
        derived.unmerged += [f"merge point {n}: verification failed (a permutation changed the "
                             f"outputs by {d:.3g} > {tol:g})" for n, d in bad.items()]
        derived.rejected = bad
        report = verify(model, derived.spec, x, seed=seed)
    if report["all"] > tol:
        derived.unmerged.append(f"all merge points: permuted together they changed the outputs "
                                f"by {report['all']:.3g} > {tol:g}; no merge point is used")
        derived.rejected.update({n: report["all"] for n in derived.spec.names})
        derived.spec = AlignmentSpec(())
        report = {"all": 0.0}
    derived.verification, derived.tolerance = report, tol
    return derived
