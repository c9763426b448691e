"""What each traced operation does to the channel axis: the table behind
:mod:`ccamerge.trace.derive`.

Every node of a ``torch.fx`` graph (from ``symbolic_trace`` or from a TorchScript archive, see
:mod:`ccamerge.trace.torchscript`) gets an :class:`OpInfo` whose ``kind`` tells the channel-space
propagation (:mod:`ccamerge.trace.graph`) what to do:

==============  =================================================================================
kind            effect on the channel axis (axis 1 of ``[B, C, ...]``)
==============  =================================================================================
linear, conv    read the input's channels (weight axis 1), open a new space (weight axis 0, bias);
                a depthwise conv keeps its input's spaces (kernels and bias producers)
channel_norm    keep; 1-D per-channel vectors (BatchNorm, InstanceNorm, PReLU) are producers
layer_norm      keep; parameters broadcast from the right are producers when they span channels
group_norm      keep when groups are 1 or one per channel, else unsupported
activation      keep (elementwise or softmax); defines features
pass            keep (dropout, identity, pooling, padding, resizing, dtype casts)
reshape         flatten / unflatten / view, judged from the shapes
permute         keep when axes 0 and 1 stay in place, else unsupported
index           keep when the channel axis is not indexed, else unsupported
reduce          keep when neither batch nor channel axis is reduced, else unsupported
binary          elementwise of several tensors (add, mul, ...): their spaces become one
cat             along channels: the output is the concatenation of the input spaces
shape           bookkeeping without tensor data (``x.size(0)``, ``x.dim()``)
unsupported     attention, matmul, grouped convolutions, unknown operations: spaces touching it
                are left unmerged and the operation is reported with a reason
==============  =================================================================================
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

KEEP_KINDS = ("channel_norm", "layer_norm", "group_norm", "activation", "pass")

_ACTIVATION_MODULES = {
    "ReLU", "ReLU6", "LeakyReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Sigmoid", "Tanh",
    "Hardtanh", "Hardswish", "Hardsigmoid", "Softplus", "Softsign", "Softshrink", "Hardshrink",
    "Tanhshrink", "LogSigmoid", "Threshold", "Softmax", "LogSoftmax"}
_PASS_MODULES = {
    "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout",
    "Identity", "Upsample", "UpsamplingNearest2d", "UpsamplingBilinear2d",
    *(f"{p}{d}d" for p in ("MaxPool", "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool", "ZeroPad",
                           "ConstantPad", "ReflectionPad", "ReplicationPad", "CircularPad")
      for d in (1, 2, 3)), "LPPool1d", "LPPool2d"}
_MODULE_KINDS = {
    "Linear": "linear", "Conv1d": "conv", "Conv2d": "conv", "Conv3d": "conv",
    "BatchNorm1d": "channel_norm", "BatchNorm2d": "channel_norm", "BatchNorm3d": "channel_norm",
    "SyncBatchNorm": "channel_norm", "InstanceNorm1d": "channel_norm",
    "InstanceNorm2d": "channel_norm", "InstanceNorm3d": "channel_norm", "PReLU": "channel_norm",
    "LayerNorm": "layer_norm", "GroupNorm": "group_norm", "Flatten": "reshape",
    "Unflatten": "reshape",
    **{name: "activation" for name in _ACTIVATION_MODULES},
    **{name: "pass" for name in _PASS_MODULES}}
_ATTENTION = ("attention: heads mix positions and split the channels into groups, so the "
              "projections around it cannot be aligned unit by unit")
_MODULE_REASONS = {
    "MultiheadAttention": _ATTENTION, "Transformer": _ATTENTION,
    "TransformerEncoder": _ATTENTION, "TransformerEncoderLayer": _ATTENTION,
    "TransformerDecoder": _ATTENTION, "TransformerDecoderLayer": _ATTENTION,
    **{f"ConvTranspose{d}d": "transposed convolutions are not supported yet" for d in (1, 2, 3)},
    **{name: "recurrent layers carry state across time steps; not supported"
       for name in ("RNN", "LSTM", "GRU")},
    "Embedding": "embeddings put channels on the last axis; not supported"}

_ACTIVATION_FUNCTIONS = {
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "elu", "selu", "celu", "leaky_relu",
    "hardtanh", "hardswish", "hardsigmoid", "softplus", "softsign", "mish", "logsigmoid",
    "log_sigmoid", "tanhshrink", "threshold", "hardshrink", "softshrink", "exp", "abs", "neg",
    "sqrt", "rsqrt", "square", "clamp", "clamp_min", "clamp_max", "clip", "sin", "cos", "log",
    "log1p", "expm1", "erf", "sign", "reciprocal", "softmax", "log_softmax", "nan_to_num"}
_PASS_FUNCTIONS = {
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "feature_dropout", "contiguous", "clone", "detach", "to", "float", "double", "half",
    "bfloat16", "type_as", "expand", "expand_as", "interpolate", "upsample", "upsample_nearest2d",
    "upsample_bilinear2d", "pad", "constant_pad_nd",
    *(f"{p}{d}d" for p in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool",
                           "lp_pool", "reflection_pad", "replication_pad") for d in (1, 2, 3))}
_FUNCTION_KINDS = {
    **{name: "activation" for name in _ACTIVATION_FUNCTIONS},
    **{name: "pass" for name in _PASS_FUNCTIONS},
    **{name: "reshape" for name in ("view", "reshape", "flatten", "unflatten", "squeeze",
                                    "unsqueeze", "view_as", "reshape_as")},
    **{name: "permute" for name in ("permute", "transpose", "swapaxes", "swapdims", "movedim",
                                    "t")},
    **{name: "index" for name in ("getitem", "slice", "select", "narrow")},
    **{name: "reduce" for name in ("mean", "sum", "amax", "amin", "nanmean", "nansum", "std",
                                   "var", "logsumexp")},
    **{name: "binary" for name in ("add", "sub", "rsub", "mul", "div", "maximum", "minimum",
                                   "pow", "fmax", "fmin")},
    "cat": "cat", "linear": "linear", "conv1d": "conv", "conv2d": "conv", "conv3d": "conv",
    **{name: "shape" for name in ("size", "dim", "numel", "getattr", "len", "Int", "Float",
                                  "NumToTensor", "ScalarImplicit", "floordiv", "floor_divide")}}
_ALIASES = {"iadd": "add", "isub": "sub", "imul": "mul", "itruediv": "div", "truediv": "div",
            "true_divide": "div", "multiply": "mul", "subtract": "sub", "divide": "div",
            "concat": "cat", "concatenate": "cat"}
_FUNCTION_REASONS = {
    **{name: ("product of two activations: channels meet positions or other channels, so "
              "alignment cannot be followed through it")
       for name in ("matmul", "mm", "bmm", "einsum", "baddbmm", "addmm", "addbmm")},
    "scaled_dot_product_attention": _ATTENTION, "multi_head_attention_forward": _ATTENTION,
    **{name: "splits or stacks tensors; not supported"
       for name in ("split", "chunk", "unbind", "stack", "split_with_sizes", "tensor_split")}}


@dataclass(frozen=True)
class OpInfo:
    """How one graph node treats channels. ``params`` maps a role ("weight", "bias") to a
    state-dict key; ``vectors`` lists a norm module's per-channel state-dict keys."""

    kind: str
    name: str
    module: nn.Module | None = None
    reason: str = ""
    params: dict[str, str] = field(default_factory=dict)
    vectors: tuple[str, ...] = ()


def module_type(module: nn.Module) -> str:
    """Class name of an eager module, or of the Python class a scripted module was built from."""
    if isinstance(module, torch.jit.ScriptModule):
        return getattr(module, "original_name", type(module).__name__)
    return type(module).__name__


def _function_names() -> dict[int, str]:
    names = {}
    for space in (F, torch, operator):
        for name in dir(space):
            obj = getattr(space, name, None)
            if callable(obj) and not isinstance(obj, type):
                names.setdefault(id(obj), name)
    return names


_NAMES_BY_ID = _function_names()


def canonical_name(target) -> str:
    """``relu`` for ``torch.relu``, ``F.relu``, ``"relu"`` (a method), ``aten::relu_`` alike."""
    if isinstance(target, str):
        name = target
    elif isinstance(target, torch._ops.OpOverload):
        name = target._schema.name.split("::")[-1]
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target._qualified_op_name.split("::")[-1]
    else:
        name = _NAMES_BY_ID.get(id(target), getattr(target, "__name__", repr(target)))
    name = _ALIASES.get(name, name)
    stripped = name.strip("_")
    return _ALIASES.get(stripped, stripped)


def _module_info(node: fx.Node, module: nn.Module) -> OpInfo:
    kind_name = module_type(module)
    kind = _MODULE_KINDS.get(kind_name)
    if kind is None:
        reason = _MODULE_REASONS.get(kind_name, f"unknown module type {kind_name}: ccamerge "
                                     "cannot tell how it treats channels")
        return OpInfo("unsupported", kind_name, module, reason)
    own = {f"{node.target}.{n}": t for n, t in [*module.named_parameters(recurse=False),
                                                 *module.named_buffers(recurse=False)]}
    params = {role: f"{node.target}.{role}" for role in ("weight", "bias")
              if f"{node.target}.{role}" in own}
    vectors = tuple(k for k, t in own.items() if t is not None and t.dim() == 1)
    return OpInfo(kind, kind_name, module, params=params, vectors=vectors)


def _functional_layer(node: fx.Node, name: str, kind: str) -> OpInfo:
    """``F.linear`` / ``F.conv2d`` on parameters read with ``get_attr`` (a traced custom layer)."""
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return OpInfo("unsupported", name, reason=f"{name} with a weight that is not a parameter")
    params = {"weight": weight.target}
    if isinstance(bias, fx.Node) and bias.op == "get_attr":
        params["bias"] = bias.target
    return OpInfo(kind, name, params=params)


def classify(node: fx.Node, modules: dict[str, nn.Module]) -> OpInfo:
    """The :class:`OpInfo` of one fx node (``modules``: ``dict(graph_module.named_modules())``)."""
    if node.op in ("placeholder", "output", "get_attr"):
        kind = {"placeholder": "input", "get_attr": "param"}.get(node.op, node.op)
        return OpInfo(kind, kind)
    if node.op == "call_module":
        return _module_info(node, modules[node.target])
    name = canonical_name(node.target)
    if name in _FUNCTION_REASONS:
        return OpInfo("unsupported", name, reason=_FUNCTION_REASONS[name])
    kind = _FUNCTION_KINDS.get(name)
    if kind in ("linear", "conv"):
        return _functional_layer(node, name, kind)
    if kind is None:
        return OpInfo("unsupported", name, reason=f"unknown operation {name}: ccamerge cannot "
                      "tell how it treats channels")
    return OpInfo(kind, name)


def supported_operations() -> dict[str, list[str]]:
    """Module classes and function names per kind, for documentation and the dashboard."""
    out: dict[str, list[str]] = {}
    for table in (_MODULE_KINDS, _FUNCTION_KINDS):
        for name, kind in table.items():
            out.setdefault(kind, []).append(name)
    out["unsupported (reported)"] = sorted({*_MODULE_REASONS, *_FUNCTION_REASONS})
    return {kind: sorted(names) for kind, names in out.items()}
