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

from ccamerge.data import as_source
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


class UnitMoments:
    """Running per-unit count, mean and sum of squared deviations ``[C]`` (float64, chunks merged
    with Chan's update: the batch size does not change the result)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, None, None

    def update(self, samples: torch.Tensor) -> None:
        """Add samples ``[S, C]``."""
        samples = samples.double()
        n, mean = len(samples), samples.mean(0)
        m2 = (samples - mean).square().sum(0)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def std(self) -> torch.Tensor:
        """Unbiased standard deviation ``[C]``."""
        return (self.m2 / (self.count - 1)).sqrt()


@torch.no_grad()
def unit_moments(model: nn.Module, names: Sequence[str], x,
                 batch_size: int = 256) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per output unit mean and std ``[C]`` (float64) of each named module over the inputs
    ``x`` (a tensor ``[B, ...]`` or any data source), streamed batch by batch."""
    model.eval()
    moments = {name: UnitMoments() for name in names}
    with _recording(model, names) as seen:
        place = next((t.device for t in model.parameters()), torch.device("cpu"))
        for xb, _ in as_source(x).batches(batch_size):
            model(xb.to(place))
            for name, chunks in seen.items():
                for c in chunks:
                    moments[name].update(c.movedim(1, -1).reshape(-1, c.shape[1]))
                chunks.clear()
    return {name: (m.mean, m.std()) for name, m in moments.items()}


@torch.no_grad()
def repair(merged: nn.Module, aligned: Sequence[nn.Module], weights: Sequence[float],
           spec: AlignmentSpec, x) -> list[str]:
    """Rescale ``merged`` in place towards the endpoints' unit statistics over the inputs ``x``
    (a tensor or a data source); returns the names of the merge points corrected.
    ``aligned``: the endpoints after their transforms."""
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
