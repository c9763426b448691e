"""Alignment methods, one function each, one signature, one registry (:data:`METHODS`).

Every solver takes an :class:`AlignContext` (state dicts of N >= 2 models, the spec, the activation
statistics if the method needs them, the reference index) and keyword-only options, and returns
per-model transforms into the merged basis plus per-point details for the UI. The registry is the
single source for CLI choices, dashboard selectors and option validation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ccamerge.alignment import AlignContext, Alignment, hungarian, identity_transforms
from ccamerge.cca import cca
from ccamerge.errors import CcamergeError
from ccamerge.transform import Transform
from ccamerge.weight_matching import align_weight_matching
from ccamerge.zipit import zipit_transforms


def _per_model(ctx: AlignContext, solve_point: Callable[[str, int], tuple[Transform, dict]]) -> Alignment:
    """Align every non-reference model to the reference, point by point."""
    result = Alignment(identity_transforms(ctx))
    for point in ctx.spec.points:
        result.details[point.name] = {}
        for i in ctx.others:
            transform, detail = solve_point(point.name, i)
            result.transforms[i][point.name] = transform
            result.details[point.name][i] = detail
    return result


def align_average(ctx: AlignContext) -> Alignment:
    """Plain averaging: every transform is the identity."""
    return Alignment(identity_transforms(ctx))


def align_permute(ctx: AlignContext) -> Alignment:
    """Activation matching: Hungarian assignment on the Pearson correlation of units."""
    def solve(name, i):
        corr = ctx.stats[name].corr(ctx.reference, i)
        perm = hungarian(corr)
        return Transform.from_permutation(perm), {"matched_corr": corr[np.arange(len(perm)), perm]}
    return _per_model(ctx, solve)


def align_ot(ctx: AlignContext) -> Alignment:
    """Optimal transport with uniform masses on the squared Euclidean distance between unit
    activation vectors. With equal widths the exact plan is a permutation (Birkhoff), found
    exactly by linear assignment on the cost."""
    def solve(name, i):
        p, r = ctx.stats[name], ctx.reference
        sq_x, sq_y = np.diag(p.second_moment(r, r)), np.diag(p.second_moment(i, i))
        cost = sq_x[:, None] + sq_y[None, :] - 2.0 * p.second_moment(r, i)  # [n, n], per sample
        perm = hungarian(-cost)
        return Transform.from_permutation(perm), {
            "transport_cost": cost[np.arange(len(perm)), perm],
            "matched_corr": p.corr(r, i)[np.arange(len(perm)), perm]}
    return _per_model(ctx, solve)


def align_cca(ctx: AlignContext, *, gamma: float = 0.1, relative: bool = True) -> Alignment:
    """CCA Merge: T from the regularised CCA of reference and model i features."""
    def solve(name, i):
        p, r = ctx.stats[name], ctx.reference
        fit = cca(p.cov(r, r), p.cov(i, i), p.cov(r, i), gamma=gamma, relative=relative)
        return Transform(fit.T, fit.T_inv), {
            "rho": fit.rho, "cond_xx": fit.cond_xx, "cond_yy": fit.cond_yy,
            "dead_x": len(fit.dead_x), "dead_y": len(fit.dead_y)}
    return _per_model(ctx, solve)


def align_zipit(ctx: AlignContext, *, alpha: float = 0.3, beta: float = 0.125) -> Alignment:
    """ZipIt!: greedy joint matching of all N*n features (see :mod:`ccamerge.zipit`)."""
    result = Alignment(identity_transforms(ctx))
    n_models = len(ctx.states)
    for point in ctx.spec.points:
        p = ctx.stats[point.name]
        joint = np.block([[p.corr(i, j) for j in range(n_models)] for i in range(n_models)])
        transforms, groups = zipit_transforms(joint, n_models, point.width, alpha=alpha, beta=beta,
                                              reference=ctx.reference)
        for i, t in enumerate(transforms):
            result.transforms[i][point.name] = t
        result.details[point.name] = {i: {"group_sizes": groups} for i in ctx.others}
    return result


@dataclass(frozen=True)
class Option:
    default: object
    kind: type
    help: str
    minimum: float | None = None


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    solve: Callable[..., Alignment]
    statistics: str | None  # None (no data), "reference" or "all" covariance pairs
    options: dict[str, Option] = field(default_factory=dict)
    exact: bool = False  # transforms are permutations: the aligned model computes the same function
    joint: bool = False  # aligns all models together (no path between two models)

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


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("average", "Plain averaging of weights, no alignment.", align_average, None, exact=True),
    Method("permute", "Permutation by activation matching (Hungarian on unit correlations).",
           align_permute, "reference", exact=True),
    Method("weight_matching", "Git Re-Basin weight matching: coordinate descent over permutations; "
           "needs no data.", align_weight_matching, None,
           {"max_sweeps": Option(100, int, "stop after this many sweeps", 1)}, exact=True),
    Method("zipit", "ZipIt!: greedy joint matching of all models' features, same-model merges "
           "allowed.", align_zipit, "all",
           {"alpha": Option(0.3, float, "similarity kept by a merged group (0..1)", 0.0),
            "beta": Option(0.125, float, "fraction of a model's units that may merge within the "
                           "model", 0.0)}, joint=True),
    Method("ot", "OT fusion: exact optimal transport on Euclidean activation distances.", align_ot,
           "reference", exact=True),
    Method("cca", "CCA Merge: linear maps from canonical correlation analysis.", align_cca,
           "reference",
           {"gamma": Option(0.1, float, "ridge added to the covariances", 0.0),
            "relative": Option(True, bool, "gamma in units of each layer's mean variance "
                               "(tr(S)/n); false = absolute, as in the paper's code")}),
]}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise CcamergeError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def describe_methods() -> dict:
    """JSON-able registry: name -> summary, options with defaults, needs data or not."""
    return {m.name: {"summary": m.summary, "needs_data": m.statistics is not None,
                     "exact": m.exact, "joint": m.joint,
                     "options": {k: {"default": o.default, "type": o.kind.__name__, "help": o.help}
                                 for k, o in m.options.items()}}
            for m in METHODS.values()}
