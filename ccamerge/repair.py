"""REPAIR (Jordan et al., 2023): undo the variance collapse of an averaged network.

Averaging decorrelated units shrinks their variance layer after layer. For every merge point whose
features come from a single Linear/Conv with a bias (no BatchNorm), REPAIR rescales each
pre-activation unit of the merged model to the weighted mean of the aligned endpoints' statistics:
``W' = s W``, ``b' = s (b - mu_merged) + mu_target`` with ``s = sigma_target / sigma_merged``.
Points are corrected in depth order, since each correction changes the statistics below it.
BatchNorm nets get the same effect from the BatchNorm reset.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from ccamerge.spec import AlignmentSpec, MergePoint

EPS = 1e-8


def repairable(point: MergePoint) -> str | None:
    """Name of the single Linear/Conv module producing ``point`` (with a bias), else None."""
    params = {axis.param for axis in point.producers}
    modules = {p.rsplit(".", 1)[0] for p in params}
    if len(modules) != 1:
        return None
    module = modules.pop()
    return module if params == {f"{module}.weight", f"{module}.bias"} else None


@contextlib.contextmanager
def _recording(model: nn.Module, names: Sequence[str]):
    """Yields ``{name: [outputs]}`` of the named modules while the block runs."""
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [modules[n].register_forward_hook(
        lambda _m, _i, out, n=n: seen[n].append(out.detach())) for n in names]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def unit_moments(model: nn.Module, names: Sequence[str], x: torch.Tensor,
                 batch_size: int = 256) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per output unit mean and std ``[C]`` of each named module over inputs ``x``."""
    model.eval()
    with _recording(model, names) as seen:
        for start in range(0, len(x), batch_size):
            model(x[start:start + batch_size])
    out = {}
    for name, chunks in seen.items():
        samples = torch.cat([c.movedim(1, -1).reshape(-1, c.shape[1]) for c in chunks]).double()
        out[name] = (samples.mean(0), samples.std(0))
    return out


@torch.no_grad()
def repair(merged: nn.Module, aligned: Sequence[nn.Module], weights: Sequence[float],
           spec: AlignmentSpec, x: torch.Tensor) -> list[str]:
    """Rescale ``merged`` in place towards the endpoints' unit statistics; returns the names of
    the merge points corrected. ``aligned``: the endpoints after their transforms."""
    names = [m for m in (repairable(p) for p in spec.points) if m is not None]
    if not names:
        return []
    targets = [unit_moments(model, names, x) for model in aligned]
    params = dict(merged.named_parameters())
    for name in names:
        mean_t = sum(w * t[name][0] for w, t in zip(weights, targets, strict=True))
        std_t = sum(w * t[name][1] for w, t in zip(weights, targets, strict=True))
        mean_m, std_m = unit_moments(merged, [name], x)[name]
        scale = std_t / (std_m + EPS)
        weight, bias = params[f"{name}.weight"], params[f"{name}.bias"]
        shape = (-1,) + (1,) * (weight.dim() - 1)
        weight.mul_(scale.view(shape).to(weight.dtype))
        bias.copy_((scale * (bias.double() - mean_m) + mean_t).to(bias.dtype))
    return [p.name for p in spec.points if repairable(p)]
