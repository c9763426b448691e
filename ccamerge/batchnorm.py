"""BatchNorm under a dense alignment map: fold it into the conv before merging.

The paper's policy transforms a BatchNorm's weight, bias and running statistics with the same
``T^T`` as the conv rows. For a permutation that is exact; for CCA's dense ``T`` it mixes the
per-channel scales and running variances of different units, and the aligned model computes
something else. The ``fold`` policy instead

1. folds every BatchNorm that directly follows a conv into it (exact in eval mode):
   ``W <- (w / sqrt(rv + eps)) W``, BatchNorm left as ``x + (b - rm * w / sqrt(rv + eps))``;
2. transforms only the conv rows and that bias (the identity scale stays untouched);
3. after averaging, sets each BatchNorm's scale and shift to the weighted mean of the aligned
   endpoints' output statistics, then recomputes the running statistics in one train-mode pass
   (a BatchNorm reset that keeps the endpoints' scale: REPAIR for BatchNorm nets).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx, nn

from ccamerge.errors import CcamergeError
from ccamerge.repair import unit_moments
from ccamerge.spec import AlignmentSpec, MergePoint
from ccamerge.transform import reset_batchnorm

POLICIES = ("paper", "fold")
STATIC = ("weight", "running_mean", "running_var")  # identity after folding: never transformed


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv, batchnorm)`` module names where the BatchNorm reads only that conv's output."""
    try:
        graph = model.graph if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model).graph
    except Exception as exc:
        raise CcamergeError(f"cannot trace the model to fold BatchNorm: {exc}") from exc
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        source = node.args[0]
        if (isinstance(source, fx.Node) and source.op == "call_module"
                and isinstance(modules.get(source.target), nn.Conv2d) and len(source.users) == 1):
            pairs.append((source.target, node.target))
    return pairs


def fold_state(state: dict[str, torch.Tensor], pairs: Sequence[tuple[str, str]],
               eps: float = 1e-5) -> dict[str, torch.Tensor]:
    """A state dict with each paired BatchNorm folded into its conv (same function in eval)."""
    out = dict(state)
    for conv, bn in pairs:
        scale = state[f"{bn}.weight"] / torch.sqrt(state[f"{bn}.running_var"] + eps)  # [C]
        out[f"{conv}.weight"] = state[f"{conv}.weight"] * scale.view(-1, 1, 1, 1)
        out[f"{bn}.bias"] = state[f"{bn}.bias"] - state[f"{bn}.running_mean"] * scale
        out[f"{bn}.weight"] = torch.ones_like(scale)
        out[f"{bn}.running_mean"] = torch.zeros_like(scale)
        out[f"{bn}.running_var"] = torch.full_like(scale, 1.0 - eps)
    return out


def without_static_vectors(spec: AlignmentSpec, bns: Sequence[str]) -> AlignmentSpec:
    """``spec`` minus the folded BatchNorms' scale and running statistics as producers."""
    static = {f"{bn}.{v}" for bn in bns for v in STATIC}
    return AlignmentSpec(tuple(
        MergePoint(p.name, p.width, p.features,
                   tuple(a for a in p.producers if a.param not in static),
                   p.consumers) for p in spec.points))


@torch.no_grad()
def reset_to_endpoints(merged: nn.Module, aligned: Sequence[nn.Module], weights: Sequence[float],
                       bns: Sequence[str], x) -> None:
    """Give every folded BatchNorm of ``merged`` the weighted mean of the aligned endpoints'
    output mean and std, then recompute running statistics on ``x`` (a tensor ``[B, ...]`` or a
    data source, streamed)."""
    targets = [unit_moments(model, bns, x) for model in aligned]
    modules = dict(merged.named_modules())
    for bn in bns:
        modules[bn].bias.copy_(sum(w * t[bn][0] for w, t in zip(weights, targets, strict=True)))
        modules[bn].weight.copy_(sum(w * t[bn][1] for w, t in zip(weights, targets, strict=True)))
    reset_batchnorm(merged, x)
