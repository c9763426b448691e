"""The weighted average of aligned models, one state-dict entry at a time.

``average_states(aligned_states(...), weights)`` holds every model's aligned state dict at once:
N - 1 more copies of the models' weights (the reference's identity maps share its tensors) on
top of the models themselves, 6.6 GB for VGG11 x8 with N = 4. A merge needs only their average, so
:func:`average_aligned_state` builds each entry of each model's aligned state from the model's
own state dict (BatchNorm folded, maps applied: :func:`ccamerge.transform.param_maps`), adds it to
that entry's float64 sum and drops it: one aligned tensor is alive at a time (two while the
next is made). The arithmetic and
its order are those of the held average, so the two agree bit for bit
(``tests/test_average.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ccamerge.batchnorm import (
    STATIC,
    batchnorm_eps,
    folded_shift,
    folded_weight,
    static_vector,
    without_static_vectors,
)
from ccamerge.methods import Alignment
from ccamerge.spec import AlignmentSpec, resized_spec
from ccamerge.transform import Transforms, param_maps, transformed_entry, weighted_sum


def average_aligned_state(models: Sequence[nn.Module], alignment: Alignment,
                          spec: AlignmentSpec, weights: Sequence[float],
                          folded: Sequence[tuple[str, str]] = (),
                          sizes: Mapping[str, torch.Size] | None = None
                          ) -> dict[str, torch.Tensor]:
    """``sum_i weights[i] * aligned_i`` for every floating-point entry (in float64, rounded back to
    the entry's dtype; integer buffers from model 0), where ``aligned_i`` is model ``i``'s state
    after its transforms at ``spec`` (the reference's), ``folded`` ``(conv, batchnorm)`` pairs
    folded first and their constant vectors left untransformed, as ``api.aligned_states`` builds
    it. ``sizes``: the merged model's entry shapes, when it is narrower (a ``target_width``);
    1-d entries no map resized are cut to them."""
    sources = aligned_entries(models, alignment, spec, folded)
    out = {}
    for key, value in models[0].state_dict().items():
        if not value.is_floating_point():
            out[key] = value.clone()
            continue
        entries = (_cut(s.entry(key), key, sizes) for s in sources)
        out[key] = weighted_sum(entries, weights)
    return out


def aligned_entries(models: Sequence[nn.Module], alignment: Alignment, spec: AlignmentSpec,
                    folded: Sequence[tuple[str, str]] = ()) -> list[AlignedEntries]:
    """Every model's aligned state at ``spec`` (the reference's), ``folded`` ``(conv,
    batchnorm)`` pairs folded first and their constant vectors left untransformed, as entries
    built on request (:class:`AlignedEntries`)."""
    bns = [bn for _conv, bn in folded]
    spec = without_static_vectors(spec, bns)
    eps = batchnorm_eps(models[0], bns)
    return [AlignedEntries(m.state_dict(), own_spec(spec, ts), ts, folded, eps)
            for m, ts in zip(models, alignment.transforms, strict=True)]


def own_spec(spec: AlignmentSpec, transforms: Transforms) -> AlignmentSpec:
    """``spec`` (the reference's) at the widths of the model ``transforms`` map (the rows of
    each ``T`` ``[n_i, n]``), its concatenation offsets moved to match."""
    return resized_spec(spec, {name: t.width for name, t in transforms.items()})


class AlignedEntries:
    """One model's aligned state dict, built an entry at a time on request; ``eps``: every
    folded BatchNorm's own epsilon (:func:`ccamerge.batchnorm.batchnorm_eps`)."""

    def __init__(self, state: Mapping[str, torch.Tensor], spec: AlignmentSpec,
                 transforms: Transforms, folded: Sequence[tuple[str, str]],
                 eps: Mapping[str, float]):
        self.state, self.eps = state, eps
        self.maps = param_maps(spec, transforms)
        self.folded_weights = {f"{conv}.weight": (conv, bn) for conv, bn in folded}
        self.folded_shifts = {f"{bn}.bias": bn for _conv, bn in folded}
        self.static = {f"{bn}.{kind}": (bn, kind) for _conv, bn in folded for kind in STATIC}

    def entry(self, key: str) -> torch.Tensor:
        """Entry ``key`` of the aligned state (a folded BatchNorm's constants at the size of its
        transformed shift)."""
        if key in self.static:
            bn, kind = self.static[key]
            return static_vector(kind, self.entry(f"{bn}.bias"), self.eps[bn])
        return transformed_entry(self._folded(key), self.maps.get(key, ()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole aligned state (entries no map changes are the model's own tensors)."""
        return {key: self.entry(key) for key in self.state}

    def _folded(self, key: str) -> torch.Tensor:
        if key in self.folded_weights:
            conv, bn = self.folded_weights[key]
            return folded_weight(self.state, conv, bn, self.eps)
        if key in self.folded_shifts:
            return folded_shift(self.state, self.folded_shifts[key], self.eps)
        return self.state[key]


def _cut(value: torch.Tensor, key: str, sizes: Mapping[str, torch.Size] | None) -> torch.Tensor:
    """``value`` cut to the merged model's size when a 1-d entry no map resized is longer."""
    if sizes is None or value.dim() != 1 or value.shape == sizes[key]:
        return value
    return value[:sizes[key][0]]
