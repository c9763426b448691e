"""Channel spaces through an fx graph: which tensors share units along axis 1.

Every tensor value gets a *layout*: the segments of its axis 1, each a slice of one channel
space (``Seg``). A flattened ``[C, H, W]`` map keeps its segments with ``repeat = H * W``
entries per channel. Linear/Conv outputs open new spaces; elementwise operations, norms and
pooling keep the layout; an addition (or any elementwise op of several tensors) makes their
spaces one (union-find); a concatenation along channels concatenates the segments. Every
parameter axis that creates or reads a space is recorded as a producer or consumer axis, with
its offset inside the parameter when the space is one part of a concatenation.

Operations that break alignment block every space they touch (see :mod:`ccamerge.trace.ops`);
so do the network input and output.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch import fx
from torch.fx.passes.shape_prop import TensorMetadata

from ccamerge.spec import Axis
from ccamerge.trace.ops import OpInfo, classify
from ccamerge.trace.spaces import Layout, Seg, Spaces, entries, make_axis, offsets


class Unsupported(Exception):
    """An operation the propagation cannot follow; ``always``: report it even when every
    space it touches is already opaque (downstream of another unsupported operation)."""

    def __init__(self, reason: str, always: bool = False):
        super().__init__(reason)
        self.always = always


def dims(node) -> tuple[int, ...] | None:
    """Shape of a node's tensor output (from shape propagation), None for anything else."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def flat_nodes(args) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return found


def first_node(node: fx.Node) -> fx.Node | None:
    found = flat_nodes(node.args)
    return found[0] if found else None


def location(node: fx.Node) -> str:
    """Module path of a module call, else the enclosing module path and the node's name."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    scope = list(stack)[-1] if stack else "<model>"
    return f"{scope} ({node.name})"


def _norm_dim(d: int, nd: int) -> int:
    return d % nd if nd else d


class Propagator:
    """Walk the graph once, in order, and build the spaces (see module docstring)."""

    def __init__(self, gm: fx.GraphModule, state: dict[str, torch.Tensor]):
        self.gm, self.state = gm, state
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.modules = dict(gm.named_modules())
        self.spaces = Spaces()
        self.layouts: dict[str, Layout | None] = {}
        self.infos: dict[str, OpInfo] = {}
        self.unsupported: list[dict] = []
        self.failed: dict[str, str] = {}  # node name -> reason, for reported operations
        self.tuples: set[str] = set()
        self.claims: dict[tuple[str, int, int], int] = {}
        self.calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")

    def run(self) -> Propagator:
        for node in self.gm.graph.nodes:
            info = classify(node, self.modules)
            self.infos[node.name] = info
            try:
                self.layouts[node.name] = self._follow(node, info)
            except Unsupported as exc:
                self.layouts[node.name] = self._give_up(node, info, str(exc), exc.always)
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
                reason = f"ccamerge could not analyse it ({type(exc).__name__}: {exc})"
                self.layouts[node.name] = self._give_up(node, info, reason, True)
        return self

    def _follow(self, node: fx.Node, info: OpInfo) -> Layout | None:
        """The handler's layout; a tensor computed from tracked channels must keep a layout,
        else the channels would be lost from sight (and their readers never transformed)."""
        layout = getattr(self, f"_on_{info.kind}")(node, info)
        tensor_out = (dims(node) is not None
                      or isinstance(node.meta.get("tensor_meta"), (tuple, list)))
        tracked_in = any(self.layout(arg) for arg in flat_nodes((node.args, node.kwargs)))
        if layout is None and tensor_out and tracked_in and info.kind != "output":
            raise Unsupported(f"ccamerge cannot follow the channels through {info.name}")
        return layout

    # bookkeeping ---------------------------------------------------------------------------
    def layout(self, node) -> Layout | None:
        return self.layouts.get(node.name) if isinstance(node, fx.Node) else None

    def _give_up(self, node: fx.Node, info: OpInfo, reason: str, always: bool) -> Layout | None:
        segs = [seg for arg in flat_nodes(node.args) for seg in self.layout(arg) or ()]
        downstream = all(self.spaces[s.space].opaque for s in segs) if segs else \
            any(arg.name in self.tuples for arg in flat_nodes(node.args))
        where = location(node)
        if always or not downstream:
            self.unsupported.append({"op": info.name, "location": where, "reason": reason})
            self.failed[node.name] = reason
        for seg in segs:
            self.spaces.block(seg.space, f"reaches unsupported {info.name} at {where}")
        out = self._opaque(node, f"comes out of unsupported {info.name} at {where}")
        if info.kind in ("linear", "conv"):
            self._orphan_layer(node, info, out,
                               f"{info.name} at {where} cannot be aligned: {reason}")
        return out

    def _orphan_layer(self, node: fx.Node, info: OpInfo, out: Layout | None, reason: str) -> None:
        """Record the parameters of a layer that could not be followed in a blocked space, so
        that it is listed as left unmerged."""
        weight = self.state.get(info.params.get("weight", ""))
        if weight is None:
            return
        if out is not None and out[0].channels == weight.shape[0]:
            space = out[0].space
        else:  # e.g. a Linear on the last axis: its units are not along axis 1
            space = self.spaces.new(weight.shape[0], [node.name], reason, opaque=True)
        for role in ("weight", "bias"):
            if role in info.params and info.params[role] in self.state:
                self._claim(space, Axis(info.params[role], 0), "producer")

    def _opaque(self, node: fx.Node, reason: str) -> Layout | None:
        shape = dims(node)
        if shape is not None and len(shape) >= 2:
            return (Seg(self.spaces.new(shape[1], [node.name], reason, opaque=True), shape[1]),)
        if isinstance(node.meta.get("tensor_meta"), (tuple, list)):
            self.tuples.add(node.name)
        return None

    def _claim(self, space: int, axis: Axis, role: str) -> None:
        key = (axis.param, axis.axis, axis.offset)
        if key in self.claims:  # a parameter used twice: its two spaces are one
            space = self.spaces.union(self.claims[key], space)
        self.claims[key] = space
        data = self.spaces[space]
        target = data.producers if role == "producer" else data.consumers
        if axis not in target:
            target.append(axis)

    def _per_seg(self, layout: Layout, param: str, axis: int, role: str) -> None:
        for seg, start in offsets(layout):
            self._claim(seg.space, make_axis(param, axis, seg.repeat, start), role)

    def _open(self, node: fx.Node, width: int, info: OpInfo) -> Layout:
        space = self.spaces.new(width, [node.name])
        for role in ("weight", "bias"):
            if role in info.params:
                self._claim(space, Axis(info.params[role], 0), "producer")
        return (Seg(space, width),)

    def _consume(self, layout: Layout, param: str, reader: fx.Node) -> None:
        if entries(layout) != self.state[param].shape[1]:
            raise Unsupported(f"its input has {entries(layout)} entries, {param} expects "
                              f"{self.state[param].shape[1]}")
        self._per_seg(layout, param, 1, "consumer")
        for seg in layout:
            self.spaces[seg.space].reads.append(reader.name)

    def _keep(self, node: fx.Node) -> Layout | None:
        x = first_node(node)
        layout = self.layout(x)
        if layout is None:
            return None
        si, so = dims(x), dims(node)
        if so is None or len(so) < 2 or so[:2] != si[:2]:
            raise Unsupported("changes the batch or channel axis")
        return layout

    def _param_axis(self, layout: Layout, arg: fx.Node | str, out: tuple[int, ...]) -> None:
        """A tensor broadcast from the right against the activation ``out``: a producer if it
        is a parameter that varies along the channel axis, an error if it is another tensor
        that does, nothing otherwise."""
        key = arg if isinstance(arg, str) else str(arg.target) if arg.op == "get_attr" else None
        t = self.state.get(key) if key is not None else None
        shape = tuple(t.shape) if t is not None else dims(arg)
        idx = -1 if shape is None else len(shape) - (len(out) - 1)
        if idx < 0 or shape[idx] == 1:
            return
        if t is None or shape[idx] != out[1] or any(shape[i] != 1 for i in range(idx)):
            raise Unsupported(f"combines activations with a tensor of shape {list(shape)} that "
                              "varies along the channel axis and is not a parameter of it")
        self._per_seg(layout, key, idx, "producer")

    # handlers, one per kind ------------------------------------------------------------------
    def _on_input(self, node, info):
        shape = dims(node)
        if shape is None or len(shape) < 2:
            return None
        return (Seg(self.spaces.new(shape[1], [node.name], "network input"), shape[1]),)

    def _on_output(self, node, info):
        for arg in flat_nodes(node.args):
            for seg in self.layout(arg) or ():
                self.spaces.block(seg.space, "network output")
        return None

    def _on_param(self, node, info):
        return None

    _on_shape = _on_param

    def _on_unsupported(self, node, info):
        raise Unsupported(info.reason, always=True)

    def _on_linear(self, node, info):
        x = first_node(node)
        layout, weight = self.layout(x), self.state[info.params["weight"]]
        if layout is not None:
            if len(dims(x)) != 2:
                raise Unsupported("Linear on the last axis of a tensor with more than 2 axes: "
                                  "ccamerge reads features on axis 1")
            self._consume(layout, info.params["weight"], x)
        return self._open(node, weight.shape[0], info)

    def _on_conv(self, node, info):
        x = first_node(node)
        layout, weight = self.layout(x), self.state[info.params["weight"]]
        groups = dims(x)[1] // weight.shape[1]
        if groups == dims(x)[1] > 1 and weight.shape[0] % groups == 0:
            return self._depthwise(node, info, x, weight.shape[0] // groups)
        if groups != 1:
            raise Unsupported(f"grouped (groups={groups}) convolution ties each output channel to "
                              "its own group of input channels; a permutation across groups "
                              "changes the function", always=True)
        if layout is not None:
            self._consume(layout, info.params["weight"], x)
        return self._open(node, weight.shape[0], info)

    def _depthwise(self, node, info, x: fx.Node, multiplier: int) -> Layout:
        """A depthwise conv (one group per input channel, ``multiplier`` outputs each) filters
        every channel alone, so it keeps the input's channel spaces: each channel ``multiplier``
        times (``repeat``), its kernels and bias producers along axis 0. It also reads them (the
        features before it join the point's statistics, as a residual stream pools its
        writers). A permutation of the space commutes with it; a dense map mixes kernels as it
        mixes BatchNorm vectors (see :mod:`ccamerge.trace.family`)."""
        layout = self.layout(x)
        if layout is None:
            return self._open(node, self.state[info.params["weight"]].shape[0], info)
        out = tuple(Seg(s.space, s.channels, s.repeat * multiplier) for s in layout)
        for role in ("weight", "bias"):
            if role in info.params:
                self._per_seg(out, info.params[role], 0, "producer")
        for seg in layout:
            self.spaces[seg.space].reads.append(x.name)
        return out

    def _on_channel_norm(self, node, info):
        layout = self._keep(node)
        if layout is None:
            return None
        for key in info.vectors:
            t = self.state.get(key)
            if t is None or (t.numel() == 1 and entries(layout) != 1):
                continue
            if t.shape[0] != entries(layout):
                raise Unsupported(f"{key} has {t.shape[0]} entries for {entries(layout)} channels")
            self._per_seg(layout, key, 0, "producer")
        return layout

    def _on_layer_norm(self, node, info):
        layout = self._keep(node)
        for key in info.params.values() if layout is not None else ():
            self._param_axis(layout, key, dims(node))
        return layout

    def _on_group_norm(self, node, info):
        groups = getattr(info.module, "num_groups", None)
        if groups not in (1, (dims(node) or (0, 0))[1]):
            raise Unsupported(f"GroupNorm with {groups} groups normalises channels group-wise",
                              always=True)
        return self._on_channel_norm(node, info)

    def _on_activation(self, node, info):
        return self._keep(node)

    _on_pass = _on_activation

    def _on_reshape(self, node, info):
        x = first_node(node)
        layout = self.layout(x)
        if layout is None:
            return None
        si, so = dims(x), dims(node)
        if so is None or len(so) < 2 or so[0] != si[0]:
            raise Unsupported("reshape moves the channel axis or mixes it with the batch axis")
        q_in, q_out = math.prod(si[2:]), math.prod(so[2:])
        if any((seg.repeat * q_in) % q_out for seg in layout):
            raise Unsupported(f"reshape {list(si)} -> {list(so)} splits channels")
        return tuple(Seg(s.space, s.channels, s.repeat * q_in // q_out) for s in layout)

    def _on_permute(self, node, info):
        x = first_node(node)
        layout = self.layout(x)
        if layout is None:
            return None
        nd, args = len(dims(x)), [*node.args[1:], *node.kwargs.values()]
        if info.name == "permute":
            perm = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
            moved = {i for i, d in enumerate(perm) if _norm_dim(d, nd) != i}
        elif info.name == "t":
            moved = {0, 1} if nd == 2 else set()
        else:
            a, b = (_norm_dim(d, nd) for d in args[:2])
            moved = {a, b} if a != b else set()
        if moved & {0, 1}:
            raise Unsupported(f"{info.name} moves the channel axis")
        return layout

    def _on_index(self, node, info):
        x = node.args[0]
        if isinstance(x, fx.Node) and x.name in self.tuples:
            return self._opaque(node, f"comes out of an unsupported operation at {location(x)}")
        layout, si, so = self.layout(x), dims(x), dims(node)
        if layout is None or so is None:
            return None
        if info.name == "getitem":
            keeps = _getitem_keeps(node.args[1], si, so)
        else:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            dim = _norm_dim(dim, len(si))
            keeps = dim >= 2 or (info.name != "select" and (dim == 0 or so[1] == si[1]))
        if not keeps:
            raise Unsupported("indexes the channel (or batch) axis")
        return layout

    def _on_reduce(self, node, info):
        x = first_node(node)
        layout = self.layout(x)
        if layout is None or dims(node) is None:
            return None
        kwargs = node.kwargs
        arg = node.args[1] if len(node.args) > 1 else kwargs.get("dim", kwargs.get("axis"))
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if arg is None or isinstance(arg, (list, tuple)) and not arg:
            raise Unsupported(f"{info.name} over all axes mixes channels")
        nd = len(dims(x))
        reduced = {_norm_dim(d, nd) for d in (arg if isinstance(arg, (list, tuple)) else [arg])}
        if 1 in reduced or (0 in reduced and keepdim is not True):
            raise Unsupported(f"{info.name} over the channel (or batch) axis")
        return layout

    def _unify(self, layouts: list[Layout]) -> Layout:
        base = layouts[0]
        for other in layouts[1:]:
            if [(s.channels, s.repeat) for s in other] != [(s.channels, s.repeat) for s in base]:
                raise Unsupported("combines tensors whose channel groups differ")
            for a, b in zip(base, other, strict=True):
                self.spaces.union(a.space, b.space)
        return base

    def _on_binary(self, node, info):
        out = dims(node)
        if out is None:
            return None
        layouts, constants = [], []
        for arg in flat_nodes((node.args, node.kwargs)):
            layout, shape = self.layout(arg), dims(arg)
            if layout is None:
                constants.append(arg)
            elif len(shape) != len(out):
                raise Unsupported("combines activations of different ranks")
            elif shape[1] == 1 and out[1] != 1:
                for seg in layout:
                    self.spaces.block(seg.space, f"broadcast across channels at {location(node)}")
            else:
                layouts.append(layout)
        if not layouts:
            return None
        base = self._unify(layouts)
        for arg in constants:
            self._param_axis(base, arg, out)
        return base

    def _on_cat(self, node, info):
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        layouts = [self.layout(t) for t in tensors]
        if all(layout is None for layout in layouts):
            return None
        if any(layout is None for layout in layouts):
            raise Unsupported("concatenates activations with tensors ccamerge cannot follow")
        if _norm_dim(dim, len(dims(node))) == 1:
            return tuple(seg for layout in layouts for seg in layout)
        return self._unify(layouts)


def _getitem_keeps(index, si: tuple[int, ...], so: tuple[int, ...]) -> bool:
    """Whether ``x[index]`` leaves axes 0 (as a slice) and 1 (whole) in place."""
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, fx.Node) for i in index) or None in index[:2]:
        return False
    if index and index[0] is Ellipsis:
        return len(si) - (len(index) - 1) >= 2
    if index and not isinstance(index[0], slice):
        return False
    if len(index) < 2 or index[1] is Ellipsis:
        return True
    return isinstance(index[1], slice) and len(so) >= 2 and so[1] == si[1]


def propagate(gm: fx.GraphModule) -> Propagator:
    """Channel spaces of a shape-propagated graph module."""
    return Propagator(gm, gm.state_dict(keep_vars=True)).run()
