"""What every alignment method is (:class:`Method`, its :class:`Option` s), receives
(:class:`AlignContext`) and returns (:class:`Alignment`), and the helpers they share.

A method module defines one solver ``align_<name>(ctx, **options) -> Alignment`` and one
``METHOD`` entry; :mod:`ccamerge.methods.registry` collects them. Options are declared once, in
the entry: the registry fills in their defaults, so solvers take them keyword-only without
defaults of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ccamerge.errors import CcamergeError
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


def per_model(ctx: AlignContext,
              solve_point: Callable[[str, int], tuple[Transform, dict]]) -> Alignment:
    """Align every non-reference model to the reference, point by point."""
    result = Alignment(identity_transforms(ctx))
    for point in ctx.spec.points:
        result.details[point.name] = {}
        for i in ctx.others:
            transform, detail = solve_point(point.name, i)
            result.transforms[i][point.name] = transform
            result.details[point.name][i] = detail
    return result


@dataclass(frozen=True)
class Option:
    """One option of a method: its default, type, help text and lowest allowed value.

    Front ends offer it under its name (CLI flag ``--max-sweeps`` for ``max_sweeps``); a bool
    option also gets a flag that sets it false: ``--<negative_flag>``, default ``--no-<name>``.
    """

    default: object
    kind: type
    help: str
    minimum: float | None = None
    negative_flag: str | None = None


@dataclass(frozen=True)
class Method:
    """A registry entry: the solver and everything a front end needs to offer it."""

    name: str
    summary: str
    solve: Callable[..., Alignment]
    statistics: str | None  # None (no data), "reference" or "all" covariance pairs
    options: dict[str, Option] = field(default_factory=dict)
    exact: bool = False  # transforms are permutations: the aligned model computes the same function
    joint: bool = False  # aligns all models together (no path between two models)

    def align(self, ctx: AlignContext, **options) -> Alignment:
        """Run the solver with ``options`` resolved (defaults filled in, values checked)."""
        return self.solve(ctx, **self.resolve(options))

    def defaults(self) -> dict:
        """``{option: default}``."""
        return {name: opt.default for name, opt in self.options.items()}

    def resolve(self, options: dict) -> dict:
        """Defaults filled in, types coerced; unknown names fail and list the valid ones."""
        unknown = set(options) - set(self.options)
        if unknown:
            valid = ", ".join(sorted(self.options)) or "none"
            raise CcamergeError(f"method {self.name} has no option {sorted(unknown)}; valid: {valid}")
        out = {}
        for name, opt in self.options.items():
            value = options.get(name, opt.default)
            value = opt.kind(value) if opt.kind is not bool else _as_bool(value)
            if opt.minimum is not None and value < opt.minimum:
                raise CcamergeError(f"{self.name} option {name} must be >= {opt.minimum}, got {value}")
            out[name] = value
        return out


def _as_bool(value) -> bool:
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise CcamergeError(f"expected true/false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    return bool(value)
