"""What every alignment method is (:class:`Method`, its :class:`Option` s), receives
(:class:`AlignContext`) and returns (:class:`Alignment`), and the helpers they share.

A method module defines one solver ``align_<name>(ctx, **options) -> Alignment`` and one
``METHOD`` entry; :mod:`ccamerge.methods.registry` collects them. Options are declared once, in
the entry: the registry fills in their defaults, so solvers take them keyword-only without
defaults of their own.
"""

from __future__ import annotations

import math
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
    """State dicts of N >= 2 models, their spec, statistics (None for data-free methods);
    ``widths``: the merged model's width per merge point when it is narrower than the
    reference's (``target_width``; None: the reference's, see :mod:`ccamerge.methods.narrow`)."""

    states: list[dict[str, torch.Tensor]]
    spec: AlignmentSpec
    stats: Statistics | None
    reference: int = 0
    seed: int = 0
    widths: dict[str, int] | None = None

    def narrowed(self, name: str, width: int) -> int | None:
        """The merged width at point ``name`` when below the reference's ``width``, else None."""
        target = (self.widths or {}).get(name, width)
        return target if target < width else None

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
    """One option of a method: its default, type, help text and allowed range.

    Front ends offer it under its name (CLI flag ``--max-sweeps`` for ``max_sweeps``); a bool
    option also gets a flag that sets it false: ``--<negative_flag>``, default ``--no-<name>``.
    Numbers must be finite and within ``[minimum, maximum]`` (either bound None: open).
    """

    default: object
    kind: type
    help: str
    minimum: float | None = None
    negative_flag: str | None = None
    maximum: float | None = None

    def check(self, method: str, name: str, value) -> object:
        """``value`` as this option's type, checked; raises :class:`CcamergeError` saying what
        is allowed (``nan``, ``inf``, ``2.5`` for an int and ``"yes please"`` are refused)."""
        if self.kind is bool:
            return _as_bool(value, f"{method} option {name}")
        number = _as_number(value, self.kind, f"{method} option {name}")
        low = -math.inf if self.minimum is None else self.minimum
        high = math.inf if self.maximum is None else self.maximum
        if not low <= number <= high:
            raise CcamergeError(f"{method} option {name} must be in {self.range()}, got {number}")
        return number

    def range(self) -> str:
        """The allowed values in words, e.g. ``[0, 1]`` or ``>= 1``."""
        if self.minimum is not None and self.maximum is not None:
            return f"[{self.minimum:g}, {self.maximum:g}]"
        if self.minimum is not None:
            return f">= {self.minimum:g}"
        return "any finite number" if self.maximum is None else f"<= {self.maximum:g}"


def _as_number(value, kind: type, what: str):
    """``value`` as a finite ``kind`` (int or float); bools and non-integral ints refused."""
    wanted = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float | str | np.number):
        raise CcamergeError(f"{what} must be {wanted}, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CcamergeError(f"{what} must be {wanted}, got {value!r}") from None
    if not math.isfinite(number):
        raise CcamergeError(f"{what} must be a finite number, got {value!r}")
    if kind is int:
        if not number.is_integer():
            raise CcamergeError(f"{what} must be an integer, got {value!r}")
        return int(number)
    return number


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
    mixed_widths: bool = False  # merges models of one family whose widths differ (rectangular maps)
    target_width: bool = False  # merges into a chosen narrower width (ccamerge.methods.narrow)

    def align(self, ctx: AlignContext, **options) -> Alignment:
        """Run the solver with ``options`` resolved (defaults filled in, values checked)."""
        return self.solve(ctx, **self.resolve(options))

    def defaults(self) -> dict:
        """``{option: default}``."""
        return {name: opt.default for name, opt in self.options.items()}

    def resolve(self, options: dict) -> dict:
        """Defaults filled in, types coerced, values checked (finite, in range); unknown names
        fail and list the valid ones."""
        unknown = set(options) - set(self.options)
        if unknown:
            valid = ", ".join(sorted(self.options)) or "none"
            raise CcamergeError(f"method {self.name} has no option {sorted(unknown)}; "
                                f"valid: {valid}")
        return {name: opt.check(self.name, name, options.get(name, opt.default))
                for name, opt in self.options.items()}


def _as_bool(value, what: str = "value") -> bool:
    """True/False, 1/0 or the words true/false/yes/no/1/0; anything else is refused."""
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if isinstance(value, bool | int | np.bool_ | np.integer) and value in (0, 1):
        return bool(value)
    raise CcamergeError(f"{what} must be true or false, got {value!r}")
