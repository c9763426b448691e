"""Git Re-Basin weight matching (Ainsworth et al., 2023): permutations from weights alone.

Maximise ``sum_l <W^A_l, P_l W^B_l P_{l-1}^T>`` by coordinate descent: visit the merge points in
random order, solve each as a linear assignment over every weight that shares it (the others held
at their current permutation), until a sweep brings no gain. BatchNorm running statistics are not
weights and do not vote.
"""

from __future__ import annotations

import numpy as np
import torch

from ccamerge.methods.base import (
    AlignContext,
    Alignment,
    Method,
    Option,
    hungarian,
    identity_transforms,
)
from ccamerge.spec import AlignmentSpec, Axis
from ccamerge.transform import Transform

NOT_WEIGHTS = ("running_mean", "running_var", "num_batches_tracked")


def _rows(tensor: np.ndarray, axis: Axis, n: int) -> np.ndarray:
    """``[n, rest]`` view of the point's entries of ``axis`` (n blocks of ``repeat``) in front."""
    return np.moveaxis(tensor, axis.axis, 0)[axis.span(n)].reshape(n, -1)


def _permute_axis(tensor: np.ndarray, axis: Axis, perm: np.ndarray) -> np.ndarray:
    moved = np.moveaxis(tensor, axis.axis, 0).copy()
    block = moved[axis.span(len(perm))]
    moved[axis.span(len(perm))] = block.reshape(len(perm), -1)[perm].reshape(block.shape)
    return np.moveaxis(moved, 0, axis.axis)


def _permuted_except(b: np.ndarray, entries, perms: dict[str, np.ndarray],
                     skip: Axis) -> np.ndarray:
    for axis, point, _role in entries:
        if axis != skip:
            b = _permute_axis(b, axis, perms[point.name])
    return b


def match_pair(state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor],
               spec: AlignmentSpec, *, seed: int = 0,
               max_sweeps: int = 100) -> dict[str, np.ndarray]:
    """``{point: perm}`` bringing model B's units into model A's order (``perm[j]`` = B's unit
    placed at A's position j)."""
    table = spec.axes_by_param()
    a = {k: v.double().numpy() for k, v in state_a.items()
         if k in table and not k.endswith(NOT_WEIGHTS)}
    b = {k: state_b[k].double().numpy() for k in a}
    perms = {p.name: np.arange(p.width) for p in spec.points}
    rng = np.random.default_rng(seed)
    for _ in range(max_sweeps):
        improved = False
        for index in rng.permutation(len(spec.points)):
            point = spec.points[index]
            score = np.zeros((point.width, point.width))
            for axis in point.producers + point.consumers:
                if axis.param in a:
                    other = _permuted_except(b[axis.param], table[axis.param], perms, axis)
                    score += (_rows(a[axis.param], axis, point.width)
                              @ _rows(other, axis, point.width).T)
            perm = hungarian(score)
            rows = np.arange(point.width)
            if score[rows, perm].sum() > score[rows, perms[point.name]].sum() + 1e-9:
                perms[point.name], improved = perm, True
        if not improved:
            break
    return perms


def align_weight_matching(ctx: AlignContext, *, max_sweeps: int) -> Alignment:
    """Weight matching of every model to the reference."""
    result = Alignment(identity_transforms(ctx))
    ref = ctx.states[ctx.reference]
    for i in ctx.others:
        perms = match_pair(ref, ctx.states[i], ctx.spec, seed=ctx.seed + i, max_sweeps=max_sweeps)
        for name, perm in perms.items():
            result.transforms[i][name] = Transform.from_permutation(perm)
            result.details.setdefault(name, {})[i] = {"permutation": perm}
    return result


METHOD = Method("weight_matching", "Git Re-Basin weight matching: coordinate descent over "
                "permutations; needs no data.", align_weight_matching, None,
                {"max_sweeps": Option(100, int, "stop after this many sweeps", 1,
                                      maximum=10_000)}, exact=True)
