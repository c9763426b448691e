"""TorchScript archives: load them, and replay their graph as an fx module ccamerge can trace.

An archive written by ``torch.jit.save`` carries its own compiled code and tensors, so loading it
unpickles no Python objects (unlike a ``torch.save`` pickle of a whole model). Its code still
runs whenever the model runs: only load archives you trust. ``safetensors`` weights of a
built-in family carry no code at all and are the safe format.

TorchScript modules cannot take forward hooks, so :func:`script_to_module` rebuilds an
``fx.GraphModule`` from the archive's graph: calls of ``torch.nn`` submodules become module
calls (rebuilt as eager modules when an eager twin gives identical outputs, kept compiled
otherwise), ``aten::`` operations become calls of the same operators, calls of
``torch.nn.functional`` functions become calls of the Python functions, branches on constants or
attributes (``self.training``) are resolved for eval mode. A custom submodule whose code cannot
be replayed (loops, branches on tensor values, calls of unknown functions) stays one compiled,
opaque call, which the trace reports as unsupported. The replay must reproduce the archive's
outputs on the example input, and its state-dict keys are the archive's.
"""

from __future__ import annotations

import builtins
import copy
import io
import operator
import os
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import BinaryIO

import torch
import torch.nn.functional as F
from torch import fx, nn

from ccamerge.errors import CcamergeError
from ccamerge.trace.eager import is_leaf, tensors, use_eager_layers


def load_torchscript(source: str | os.PathLike | bytes | BinaryIO, *,
                     map_location: str = "cpu") -> torch.jit.ScriptModule:
    """Load a ``torch.jit.save`` archive (path, bytes or binary file) in eval mode.

    Security: no Python objects are unpickled, but the archive's TorchScript code runs whenever
    the model runs (and is compiled at load). Load archives only from sources you trust.
    """
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        module = torch.jit.load(source, map_location=map_location)
    except Exception as exc:
        raise CcamergeError(f"not a TorchScript archive (torch.jit.save): {exc}") from exc
    return module.eval()


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """True for a ``torch.jit.save`` archive (a zip holding compiled code), False for anything
    else, ``torch.save`` pickles included."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


class CannotReplay(Exception):
    """A construct of the archive's code that the replay does not reproduce."""


@dataclass(frozen=True)
class _Ref:
    """A (sub)module of the archive and its dotted path."""

    path: str
    module: torch.jit.ScriptModule


@dataclass(frozen=True)
class _Function:
    name: str


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class _Replay:
    """Emit the archive's forward into an fx graph, inlining custom submodules."""

    def __init__(self, script: torch.jit.ScriptModule):
        self.script, self.graph, self.root = script, fx.Graph(), nn.Module()
        self.notes: list[str] = []
        self.constants = 0

    def run(self) -> fx.GraphModule:
        x = self.graph.placeholder("x")
        self.graph.output(self.call(_Ref("", self.script), "forward", [x]))
        return fx.GraphModule(self.root, self.graph)

    def call(self, ref: _Ref, method: str, args: list):
        graph = getattr(ref.module, method).graph
        inputs = list(graph.inputs())
        if len(inputs) != len(args) + 1:
            raise CcamergeError(f"{ref.path or 'the model'}.{method} takes {len(inputs) - 1} "
                                f"inputs; ccamerge feeds one tensor")
        env = {v.unique(): a for v, a in zip(inputs, [ref, *args], strict=True)}
        self.block(graph.nodes(), env, ref)
        outs = [env[v.unique()] for v in graph.return_node().inputs()]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def block(self, nodes, env: dict, ref: _Ref) -> None:
        for node in nodes:
            kind = node.kind()
            handler = _PRIM.get(kind) or (_aten if kind.startswith("aten::") else None)
            if handler is None:
                raise CannotReplay(f"it uses {kind}")
            values = handler(self, node, [env.get(v.unique()) for v in node.inputs()], ref, env)
            for value, out in zip(values, node.outputs(), strict=True):
                env[out.unique()] = value

    def emit(self, ref: _Ref, target, args: tuple, kwargs: dict | None = None,
             op: str = "call_function") -> fx.Node:
        node = self.graph.create_node(op, target, args, kwargs or {})
        if ref.path:
            node.meta["nn_module_stack"] = OrderedDict(
                [(ref.path, (ref.path, getattr(ref.module, "original_name", "")))])
        return node

    def install(self, path: str, value, kind: str = "module") -> None:
        """Put a module, parameter, buffer or constant at ``path`` in the root module tree."""
        parent, _, name = path.rpartition(".")
        owner = self.root
        for part in parent.split(".") if parent else []:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        if kind == "module":
            owner.add_module(name, value)
        elif kind == "parameter":
            owner.register_parameter(name, nn.Parameter(value.detach(), value.requires_grad))
        elif kind == "buffer":
            owner.register_buffer(name, value)
        else:
            object.__setattr__(owner, name, value)

    def constant(self, ref: _Ref, value: torch.Tensor) -> fx.Node:
        name = f"_ts_constant{self.constants}"
        self.constants += 1
        self.install(name, value, "constant")
        return self.emit(ref, name, (), op="get_attr")

    def call_submodule(self, ref: _Ref, method: str, args: list):
        """A leaf layer becomes a module call; a custom module is inlined, or kept compiled and
        opaque when its code cannot be replayed."""
        if is_leaf(ref.module) and method == "forward":
            self.install(ref.path, ref.module)
            return self.emit(ref, ref.path, tuple(args), op="call_module")
        mark, notes = list(self.graph.nodes)[-1], len(self.notes)
        try:
            return self.call(ref, method, args)
        except CannotReplay as exc:
            if not ref.path or method != "forward":
                raise
            for node in reversed(list(self.graph.nodes)[list(self.graph.nodes).index(mark) + 1:]):
                self.graph.erase_node(node)
            del self.notes[notes:]
            self.notes.append(f"{ref.path} ({ref.module.original_name}) is kept as compiled "
                              f"TorchScript: {exc}")
            self.install(ref.path, ref.module)
            return self.emit(ref, ref.path, tuple(args), op="call_module")


def _constant(replay: _Replay, node, inputs, ref, env):
    out = node.output()
    if out.type().kind() == "FunctionType":
        return [_Function(node.s("name"))]
    value = out.toIValue()
    return [replay.constant(ref, value) if isinstance(value, torch.Tensor) else value]


def _get_attr(replay: _Replay, node, inputs, ref, env):
    owner, name = inputs[0], node.s("name")
    if not isinstance(owner, _Ref):
        raise CannotReplay(f"it reads attribute {name} of an object")
    value, path = getattr(owner.module, name), _join(owner.path, name)
    if isinstance(value, torch.jit.ScriptModule):
        return [_Ref(path, value)]
    if not isinstance(value, torch.Tensor):
        return [value]
    if name in dict(owner.module.named_parameters(recurse=False)):
        replay.install(path, value, "parameter")
    elif name in dict(owner.module.named_buffers(recurse=False)):
        replay.install(path, value, "buffer")
    else:
        replay.install(path, value, "constant")
    return [replay.emit(owner, path, (), op="get_attr")]


def _call_method(replay: _Replay, node, inputs, ref, env):
    return [replay.call_submodule(inputs[0], node.s("name"), inputs[1:])]


def _call_function(replay: _Replay, node, inputs, ref, env):
    name = inputs[0].name
    function = getattr(F, name, None)
    if not callable(function):
        raise CannotReplay(f"it calls function {name}, which is not in torch.nn.functional")
    return [replay.emit(ref, function, tuple(inputs[1:]))]


def _if(replay: _Replay, node, inputs, ref, env):
    """A branch on a constant or an attribute: replay the branch taken (in eval mode)."""
    if not isinstance(inputs[0], bool):
        raise CannotReplay("it branches on a tensor value")
    block = list(node.blocks())[0 if inputs[0] else 1]
    scope = _Scope(env)
    replay.block(block.nodes(), scope, ref)
    return [scope[v.unique()] for v in block.outputs()]


class _Scope(dict):
    """Values of a branch, falling back to the enclosing graph's values."""

    def __init__(self, outer: dict):
        super().__init__()
        self.outer = outer

    def get(self, key, default=None):
        return super().get(key, self.outer.get(key, default))

    def __getitem__(self, key):
        return super().__getitem__(key) if key in self.keys() else self.outer[key]


def _construct(replay, node, inputs, ref, env):
    return [tuple(inputs) if node.kind() == "prim::TupleConstruct" else list(inputs)]


def _unpack(replay: _Replay, node, inputs, ref, env):
    seq = inputs[0]
    if isinstance(seq, (list, tuple)):
        return list(seq)
    return [replay.emit(ref, operator.getitem, (seq, i)) for i in range(node.outputsSize())]


def _index(replay: _Replay, node, inputs, ref, env):
    seq, i = inputs[:2]
    if isinstance(seq, (list, tuple)) and isinstance(i, int):
        return [seq[i]]
    return [replay.emit(ref, operator.getitem, (seq, i))]


def _identity(replay, node, inputs, ref, env):
    return [inputs[0]]


def _dtype_or_device(replay: _Replay, node, inputs, ref, env):
    attr = node.kind().split("::")[1]
    return [replay.emit(ref, builtins.getattr, (inputs[0], attr))]


def _num_to_tensor(replay: _Replay, node, inputs, ref, env):
    if isinstance(inputs[0], fx.Node):
        return [replay.emit(ref, torch.ops.prim.NumToTensor.Scalar, (inputs[0],))]
    return [replay.constant(ref, torch.tensor(inputs[0]))]


def _aten(replay: _Replay, node, inputs, ref, env):
    """An ``aten::`` operation: called at once when every input is known, else emitted."""
    try:
        schema = torch._C.parse_schema(node.schema())
        overload = getattr(getattr(torch.ops.aten, schema.name.split("::")[1]),
                           schema.overload_name or "default")
    except (RuntimeError, AttributeError) as exc:
        raise CannotReplay(f"it uses {node.kind()} without a usable schema") from exc
    if node.outputsSize() == 0:
        return []
    args, kwargs = [], {}
    for arg, value in zip(schema.arguments, inputs, strict=True):
        if arg.kwarg_only:
            kwargs[arg.name] = value
        else:
            args.append(value)
    if not _has_node((args, kwargs)):
        value = overload(*args, **kwargs)
        return [replay.constant(ref, value) if isinstance(value, torch.Tensor) else value]
    out = replay.emit(ref, overload, tuple(args), kwargs)
    if node.outputsSize() == 1:
        return [out]
    return [replay.emit(ref, operator.getitem, (out, i)) for i in range(node.outputsSize())]


def _has_node(args) -> bool:
    found: list = []
    fx.node.map_arg(args, found.append)
    return bool(found)


_PRIM = {
    "prim::Constant": _constant, "prim::GetAttr": _get_attr, "prim::CallMethod": _call_method,
    "prim::CallFunction": _call_function, "prim::If": _if,
    "prim::ListConstruct": _construct, "prim::TupleConstruct": _construct,
    "prim::ListUnpack": _unpack, "prim::TupleUnpack": _unpack, "prim::TupleIndex": _index,
    "aten::__getitem__": _index, "prim::unchecked_cast": _identity,
    "prim::dtype": _dtype_or_device, "prim::device": _dtype_or_device,
    "prim::NumToTensor": _num_to_tensor}


def script_to_module(script: torch.jit.ScriptModule, example_input: torch.Tensor) -> fx.GraphModule:
    """An eval-mode ``fx.GraphModule`` that computes what ``script`` computes, with the same
    state-dict keys, and whose ``torch.nn`` layers take forward hooks. ``.replay_notes`` lists
    submodules kept compiled. Raises :class:`CcamergeError` when the forward cannot be replayed
    or the replay's outputs differ from the archive's on ``example_input``."""
    was_training = script.training
    script.eval()
    try:
        replay = _Replay(copy.deepcopy(script))  # the replay shares no tensors with the archive
        try:
            gm = replay.run()
        except CannotReplay as exc:
            raise CcamergeError(f"ccamerge cannot replay this archive's forward: {exc}") from exc
        gm.replay_notes = replay.notes
        use_eager_layers(gm, example_input)
        _check_same(gm.eval(), script, example_input)
    finally:
        script.train(was_training)
    return gm


@torch.no_grad()
def _check_same(gm: fx.GraphModule, script: torch.jit.ScriptModule, x: torch.Tensor) -> None:
    ours, theirs = tensors(gm(x)), tensors(script(x))
    if len(ours) != len(theirs) or any(
            a.shape != b.shape or not torch.allclose(a, b, atol=1e-5, rtol=1e-4)
            for a, b in zip(ours, theirs, strict=True)):
        raise CcamergeError("the replay of this archive's graph does not reproduce its outputs; "
                            "ccamerge cannot analyse it")
    missing = set(script.state_dict()) - set(gm.state_dict())
    if missing:
        gm.replay_notes.append("parameters the forward never uses are not part of the "
                               f"replay: {sorted(missing)}")


def with_script_state(script: torch.jit.ScriptModule,
                      state: dict[str, torch.Tensor]) -> torch.jit.ScriptModule:
    """A copy of the archive carrying ``state`` (e.g. merged weights), ready for
    ``torch.jit.save``; entries missing from ``state`` keep their values, entries of another
    shape (a merge into other widths) replace the archive's tensors, whose shapes its compiled
    layers read."""
    clone = copy.deepcopy(script)
    own = clone.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            set_tensor(clone, key, value.detach().clone())
    clone.load_state_dict({**clone.state_dict(), **state})
    return clone


def set_tensor(module: nn.Module, key: str, value: torch.Tensor) -> None:
    """Replace state-dict entry ``key`` of ``module`` (eager or compiled) by ``value`` of any
    shape; a parameter stays a parameter."""
    owner_name, _, leaf = key.rpartition(".")
    owner = module
    for part in owner_name.split(".") if owner_name else ():
        owner = getattr(owner, part)  # ScriptModules have no get_submodule
    if isinstance(getattr(owner, leaf), nn.Parameter):
        value = nn.Parameter(value, requires_grad=getattr(owner, leaf).requires_grad)
    setattr(owner, leaf, value)
