"""What every alignment method receives (:class:`AlignContext`) and returns (:class:`Alignment`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ccamerge.spec import AlignmentSpec
from ccamerge.stats import Statistics
from ccamerge.transform import Transform, Transforms


@dataclass
class AlignContext:
    """State dicts of N >= 2 models, their spec, statistics (None for data-free methods)."""

    states: list[dict[str, torch.Tensor]]
    spec: AlignmentSpec
    stats: Statistics | None
    reference: int = 0
    seed: int = 0

    @property
    def others(self) -> list[int]:
        return [i for i in range(len(self.states)) if i != self.reference]


@dataclass
class Alignment:
    """``transforms[i][point]`` for every model i; ``details[point][i]``: per-pair quantities
    the method computed (canonical correlations, matched correlations, ...)."""

    transforms: list[Transforms]
    details: dict[str, dict[int, dict]] = field(default_factory=dict)


def identity_transforms(ctx: AlignContext) -> list[Transforms]:
    return [{p.name: Transform.identity(p.width) for p in ctx.spec.points} for _ in ctx.states]


def hungarian(score: np.ndarray) -> np.ndarray:
    """``perm`` ``[n]`` maximising ``sum_j score[j, perm[j]]`` (rows: reference units)."""
    _, cols = linear_sum_assignment(score, maximize=True)
    return cols
