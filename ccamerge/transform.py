"""Apply per-merge-point transforms to weights, average models, reset BatchNorm.

A :class:`Transform` at a merge point of width ``n`` maps a feature row ``y`` (``[n]``) of model i
to ``y @ T`` in the target basis. Producers of the point become ``T^T @ W`` and consumers
``W @ T_inv^T`` along the point's axis (``method.md`` section 4). For CCA and permutations
``T_inv`` is ``T^-1``; for ZipIt it is the unmerge matrix.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ccamerge.allocator import for_a_pass
from ccamerge.data import as_source
from ccamerge.layout import choose_layout, in_layout, weights_in
from ccamerge.models import check_input_fit
from ccamerge.spec import AlignmentSpec, Axis


@dataclass(frozen=True)
class Transform:
    """``T`` and ``T_inv``, ``[n, n]`` float64; rectangular between models of different widths:
    ``T`` ``[n, m]`` takes model i's ``n`` units to a target of ``m``, ``T_inv`` ``[m, n]``."""

    T: np.ndarray
    T_inv: np.ndarray

    @staticmethod
    def identity(n: int) -> Transform:
        return Transform(np.eye(n), np.eye(n))

    @staticmethod
    def from_permutation(perm: Sequence[int]) -> Transform:
        """``perm[j]`` is the unit of model i placed at position j (matched to reference unit j)."""
        perm = np.asarray(perm)
        T = np.zeros((len(perm), len(perm)))
        T[perm, np.arange(len(perm))] = 1.0
        return Transform(T, T.T.copy())

    @property
    def width(self) -> int:
        """Model i's width ``n`` (the rows of ``T``)."""
        return self.T.shape[0]

    @property
    def target_width(self) -> int:
        """The width ``m`` the transformed model has at this point (the columns of ``T``)."""
        return self.T.shape[1]


Transforms = dict[str, Transform]  # merge point name -> transform, for one model


def _apply_along(tensor: torch.Tensor, axis: Axis, matrix: np.ndarray) -> torch.Tensor:
    """``matrix @ tensor`` along ``axis.axis``, on the point's entries (``n`` blocks of
    ``repeat``, from ``offset``); other entries of the axis are left as they are. An identity
    returns ``tensor`` itself, a permutation reorders the entries (exact, no arithmetic), any
    other matrix multiplies in float64."""
    perm = _permutation(matrix) if matrix.shape[0] == matrix.shape[1] else None
    if perm is not None:
        if np.array_equal(perm, np.arange(len(perm))):
            return tensor
        index = axis.offset + (perm[:, None] * axis.repeat + np.arange(axis.repeat)).ravel()
        out = tensor.clone()
        out.narrow(axis.axis, axis.offset, len(index)).copy_(
            tensor.index_select(axis.axis, torch.from_numpy(index).to(tensor.device)))
        return out
    return _dense_along(tensor, axis, matrix)


def _dense_along(tensor: torch.Tensor, axis: Axis, matrix: np.ndarray) -> torch.Tensor:
    """``matrix @ tensor`` along the point's entries of ``axis``, in float64: one converting
    copy of those entries in, one product, one converting copy out. A rectangular ``matrix``
    ``[m, n]`` turns the ``n * repeat`` entries into ``m * repeat``."""
    n = matrix.shape[1]
    part = tensor.narrow(axis.axis, axis.offset, n * axis.repeat).movedim(axis.axis, 0)
    block = torch.empty(part.shape, dtype=torch.float64, device=tensor.device)
    block.copy_(part)  # [n * repeat, ...] contiguous float64
    # channel-major flatten keeps each unit's `repeat` entries together: [n, repeat * rest]
    mixed = torch.from_numpy(matrix).to(tensor.device) @ block.view(n, -1)
    if matrix.shape[0] != n:
        return _resized_along(tensor, axis, n, mixed.view(-1, *part.shape[1:]))
    out = tensor.clone()
    out.narrow(axis.axis, axis.offset, n * axis.repeat).movedim(axis.axis, 0).copy_(
        mixed.view(part.shape))
    return out


def _resized_along(tensor: torch.Tensor, axis: Axis, n: int, mixed: torch.Tensor) -> torch.Tensor:
    """``tensor`` with its ``n * repeat`` point entries along ``axis`` replaced by ``mixed``
    ``[m * repeat, ...]`` (the axis moved first), entries before and after kept."""
    end = axis.offset + n * axis.repeat
    before = tensor.narrow(axis.axis, 0, axis.offset)
    after = tensor.narrow(axis.axis, end, tensor.shape[axis.axis] - end)
    middle = mixed.to(tensor.dtype).movedim(0, axis.axis)
    return torch.cat([before, middle, after], dim=axis.axis).contiguous()


def _permutation(matrix: np.ndarray) -> np.ndarray | None:
    """``perm`` with ``matrix[r, perm[r]] = 1`` when ``matrix`` ``[n, n]`` is a permutation
    matrix (so ``matrix @ x = x[perm]``), else None."""
    ones = matrix == 1.0
    if np.count_nonzero(matrix) != len(matrix) or np.count_nonzero(ones) != len(matrix):
        return None
    if not (ones.sum(0) == 1).all() or not (ones.sum(1) == 1).all():
        return None
    return ones.argmax(1)


def apply_transforms(state: dict[str, torch.Tensor], spec: AlignmentSpec,
                     transforms: Transforms) -> dict[str, torch.Tensor]:
    """New state dict with every merge point's transform applied to its producers and consumers.

    Merge points missing from ``transforms`` are left as they are (identity), and so are the
    entries an identity transform maps (the returned dict then shares those tensors). With
    rectangular maps (models of different widths) ``spec`` must be the transformed model's own
    (its widths and offsets: :func:`ccamerge.spec.resized_spec`).
    """
    out = dict(state)
    for param, maps in param_maps(spec, transforms).items():
        out[param] = transformed_entry(out[param], maps)
    return out


def param_maps(spec: AlignmentSpec, transforms: Transforms
               ) -> dict[str, list[tuple[Axis, np.ndarray]]]:
    """``{param: [(axis, matrix), ...]}``: the maps :func:`apply_transforms` applies to each
    entry, in the order it applies them (a map only ever changes its own entry)."""
    out: dict[str, list[tuple[Axis, np.ndarray]]] = {}
    for axis, matrix in _maps(spec, transforms):
        out.setdefault(axis.param, []).append((axis, matrix))
    return out


def transformed_entry(tensor: torch.Tensor, maps: Sequence[tuple[Axis, np.ndarray]]
                      ) -> torch.Tensor:
    """One state-dict entry after its ``maps`` (:func:`param_maps`); ``tensor`` itself when they
    are all identities."""
    for axis, matrix in maps:
        tensor = _apply_along(tensor, axis, matrix)
    return tensor


def _maps(spec: AlignmentSpec, transforms: Transforms) -> list[tuple[Axis, np.ndarray]]:
    """``(axis, matrix)`` for every producer (``T^T``) and consumer (``T_inv``) axis, the
    blocks furthest along an axis first: a rectangular map resizes its block, which moves the
    blocks after it (a concatenation read by one layer) but never those before it, so the
    offsets of ``spec`` (the model's own) stay valid."""
    maps = []
    for point in spec.points:
        if point.name in transforms:
            t = transforms[point.name]
            maps += [(axis, t.T.T) for axis in point.producers]
            maps += [(axis, t.T_inv) for axis in point.consumers]
    return sorted(maps, key=lambda item: -item[0].offset)


def average_states(states: Sequence[dict[str, torch.Tensor]],
                   weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Weighted average of floating-point entries (default 1/N each); integer buffers such as
    BatchNorm's ``num_batches_tracked`` are taken from the first state."""
    if weights is None:
        weights = [1.0 / len(states)] * len(states)
    out = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        out[key] = weighted_sum((state[key] for state in states), weights)
    return out


def weighted_sum(entries: Iterable[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_i weights[i] * entries[i]`` in float64, in the first entry's dtype (each entry
    may be made as it is needed: only the sum and one entry are held)."""
    acc, dtype = None, None
    for w, value in zip(weights, entries, strict=True):
        if acc is None:
            acc, dtype = torch.zeros_like(value, dtype=torch.float64), value.dtype
        acc += w * value.to(torch.float64)
    return acc.to(dtype)


def with_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``model`` carrying ``state``."""
    clone = copy.deepcopy(model)
    clone.load_state_dict(state)
    return clone


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def reset_batchnorm(model: nn.Module, x, *, batch_size: int = 256,
                    progress: Callable[[float], None] | None = None) -> nn.Module:
    """Recompute every BatchNorm's running statistics in place with one train-mode pass over
    ``x``: a tensor ``[B, ...]`` or any data source (:func:`ccamerge.data.as_source`), streamed
    ``batch_size`` samples at a time (average of the batch statistics weighted by batch size, no
    gradients). Image batches run in the faster memory layout (:mod:`ccamerge.layout`); the
    parameters keep theirs. No-op without BatchNorm."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    source = as_source(x)
    check_input_fit(model, source.sample_shape)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
    model.train()
    total, seen = source.size_hint(), 0
    place = norms[0].running_mean.device
    layout = None
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(for_a_pass())  # freed maps kept for the next batch, if asked
            for xb, _ in source.batches(batch_size):
                xb = xb.to(place)
                if layout is None:
                    layout = choose_layout(model, xb, lambda part: _in_eval(model, part))
                    stack.enter_context(weights_in(model, layout))
                xb = in_layout(xb, layout)
                for m in norms:  # sample-weighted running average: a short last batch weighs less
                    m.momentum = len(xb) / (seen + len(xb))
                model(xb)
                seen += len(xb)
                if progress and total:
                    progress(min(1.0, seen / total))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
    return model.eval()


def _in_eval(model: nn.Module, xb: torch.Tensor) -> None:
    """``model(xb)`` in eval mode (running statistics untouched), back in train mode after."""
    model.eval()
    try:
        model(xb)
    finally:
        model.train()


def random_permutations(spec: AlignmentSpec, seed: int = 0) -> Transforms:
    """A random permutation for every merge point (for tests and spec verification)."""
    rng = np.random.default_rng(seed)
    return {p.name: Transform.from_permutation(rng.permutation(p.width)) for p in spec.points}


@torch.no_grad()
def verify_spec(model: nn.Module, spec: AlignmentSpec, x: torch.Tensor, *,
                seed: int = 0) -> dict[str, float]:
    """Max absolute output difference ``[B, classes]`` after permuting each merge point alone
    through ``spec`` (and ``"all"`` of them together). A correct spec gives ~0 everywhere."""
    model.eval()
    reference = model(x)
    perms = random_permutations(spec, seed)
    state = model.state_dict()
    report = {}
    for name in [*spec.names, "all"]:
        chosen = perms if name == "all" else {name: perms[name]}
        twin = with_state(model, apply_transforms(state, spec, chosen)).eval()
        report[name] = float((twin(x) - reference).abs().max())
    return report
