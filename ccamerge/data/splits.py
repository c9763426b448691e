"""The data splits of the paper (same data, 80/20 class-skewed halves, Dirichlet parts) and the
held-out slice used to select hyperparameters. Pure functions of the labels and a seed."""

from __future__ import annotations

import numpy as np
import torch

from ccamerge.errors import CcamergeError

SPLITS = ("same", "skewed", "dirichlet")


def split_indices(y: np.ndarray | torch.Tensor, kind: str, *, parts: int, part: int,
                  seed: int = 0) -> np.ndarray:
    """Sorted int64 indices ``[M]`` into the training labels ``y`` ``[N]`` for one part of a split.

    ``"same"``: every index. ``"skewed"`` (``parts=2``): part 0 gets 80% of each class in the first
    half of the classes and 20% of each other class; part 1 the rest. ``"dirichlet"``: each class is
    divided over ``parts`` with proportions drawn from Dirichlet(0.5). Parts are disjoint, cover
    every index, are never empty, and depend only on ``y``, ``parts`` and ``seed``.
    """
    labels = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y).reshape(-1)
    if kind not in SPLITS:
        raise CcamergeError(f"unknown split {kind!r}; choose one of {list(SPLITS)}")
    if not (isinstance(parts, int | np.integer) and parts >= 1 and 0 <= part < parts):
        raise CcamergeError(f"split needs parts >= 1 and 0 <= part < parts (got parts={parts}, "
                            f"part={part})")
    if kind == "same":
        return np.arange(len(labels), dtype=np.int64)
    assignment = (_skewed_assignment(labels, parts, seed) if kind == "skewed"
                  else _dirichlet_assignment(labels, parts, seed))
    return np.flatnonzero(assignment == part).astype(np.int64)


def _skewed_assignment(labels: np.ndarray, parts: int, seed: int) -> np.ndarray:
    """Part (0 or 1) of every sample ``[N]`` for the paper's 80/20 class-skewed halves."""
    if parts != 2:
        raise CcamergeError(f"the skewed split has exactly 2 parts (got parts={parts}); use "
                            "'dirichlet' for more models")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    first_half = set(classes[: (len(classes) + 1) // 2].tolist())
    assignment = np.ones(len(labels), dtype=np.int64)
    for cls in classes:
        members = rng.permutation(np.flatnonzero(labels == cls))
        share = 0.8 if cls in first_half else 0.2
        assignment[members[: int(round(share * len(members)))]] = 0
    return assignment


def _dirichlet_assignment(labels: np.ndarray, parts: int, seed: int) -> np.ndarray:
    """Part of every sample ``[N]``: each class split over parts by Dirichlet(0.5) proportions."""
    if len(labels) < parts:
        raise CcamergeError(f"cannot divide {len(labels)} samples into {parts} non-empty parts")
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        proportions = rng.dirichlet(np.full(parts, 0.5))
        cuts = np.round(np.cumsum(proportions)[:-1] * len(members)).astype(int)
        for index, chunk in enumerate(np.split(members, cuts)):
            assignment[chunk] = index
    counts = np.bincount(assignment, minlength=parts)
    for empty in np.flatnonzero(counts == 0):  # move one sample from the largest part
        donor = int(np.argmax(counts))
        assignment[np.flatnonzero(assignment == donor)[0]] = empty
        counts[donor] -= 1
        counts[empty] += 1
    return assignment


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random disjoint ``(train_idx, val_idx)`` (sorted int64) over ``range(n)``, with
    ``round(fraction * n)`` (at least 1) validation indices, for selecting hyperparameters."""
    if not 0.0 < fraction < 1.0:
        raise CcamergeError(f"holdout fraction must be between 0 and 1 (got {fraction})")
    n_val = max(1, int(round(fraction * n)))
    if n_val >= n:
        raise CcamergeError(f"cannot hold out {fraction:.0%} of {n} samples and keep some to train")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]).astype(np.int64), np.sort(order[:n_val]).astype(np.int64)

