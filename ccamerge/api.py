"""The Python API: align and merge N models, interpolate between two. The CLI and the dashboard
are built on these functions.

    >>> result = merge([model_a, model_b], load_dataset("digits"), "cca", gamma=0.1)
    >>> result.model, result.alignment.details["fc1"][1]["rho"], result.recipe
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ccamerge import validate
from ccamerge.batchnorm import (
    POLICIES,
    conv_bn_pairs,
    fold_state,
    reset_to_endpoints,
    without_static_vectors,
)
from ccamerge.errors import CcamergeError
from ccamerge.evaluate import barrier, evaluate_model
from ccamerge.methods import AlignContext, Alignment, Method, get_method, hungarian
from ccamerge.methods.cca import solve_near_exact, solve_pair
from ccamerge.models import ARCHITECTURES, same_architecture
from ccamerge.repair import repair as repair_units
from ccamerge.spec import AlignmentSpec, build_spec
from ccamerge.stats import MIN_SAMPLES_PER_FEATURE, Statistics, collect_statistics
from ccamerge.trace.derive import derive_and_verify
from ccamerge.transform import (
    apply_transforms,
    average_states,
    has_batchnorm,
    reset_batchnorm,
    with_state,
)

Progress = Callable[[float, str], None]


def _silent(_fraction: float, _message: str) -> None:
    pass


def train_inputs(data) -> torch.Tensor:
    """Inputs ``[B, C, S, S]`` for statistics and BatchNorm reset: a Dataset's training images
    or a tensor / array given directly."""
    x = getattr(data, "x_train", data)
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise CcamergeError(f"expected a Dataset or an array of inputs, got {type(data).__name__}")
    return x.float()


def is_builtin(model: nn.Module) -> bool:
    return getattr(model, "arch", None) in ARCHITECTURES


def check_compatible(models: Sequence[nn.Module], x: torch.Tensor, reference: int) -> None:
    """Fail with a clear message for < 2 models, mismatched models, a bad reference index or
    inputs of the wrong shape."""
    if len(models) < 2:
        raise CcamergeError(f"merging needs at least 2 models, got {len(models)}")
    if not 0 <= reference < len(models):
        raise CcamergeError(f"reference must be in 0..{len(models) - 1}, got {reference}")
    if all(is_builtin(m) for m in models):
        same_architecture(list(models))
        config = models[0].config
        expected = (config.get("in_channels"), config.get("image_size"), config.get("image_size"))
        if tuple(x.shape[1:]) != expected:
            raise CcamergeError(f"the models expect inputs of shape {list(expected)} but the data "
                                f"has {list(x.shape[1:])}; pick the dataset they were trained on")
        return
    _same_state_shapes(models)
    try:
        with torch.no_grad():
            models[0].eval()(x[:2])
    except Exception as exc:
        raise CcamergeError(f"model 0 cannot run on inputs of shape {list(x.shape[1:])}: {exc}; "
                            "pick the dataset it was trained on") from exc


def _same_state_shapes(models: Sequence[nn.Module]) -> None:
    first = {k: tuple(v.shape) for k, v in models[0].state_dict().items()}
    for index, model in enumerate(models[1:], start=1):
        other = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        for key in sorted(set(first) | set(other)):
            if first.get(key) != other.get(key):
                raise CcamergeError(f"model {index} does not match model 0 at {key} "
                                    f"({other.get(key)} vs {first.get(key)}); only models of one "
                                    "architecture and size merge")


def resolve_spec(models: Sequence[nn.Module], x: torch.Tensor) -> AlignmentSpec:
    """The hand-written spec of a built-in family, else one derived by tracing and verified
    with a random permutation (points that fail verification are not used)."""
    if is_builtin(models[0]):
        return build_spec(models[0])
    derived = derive_and_verify(models[0], x[:64])
    if not derived.spec.points:
        reasons = "; ".join(derived.unmerged[:3]) or "no Linear/Conv layer feeds another"
        raise CcamergeError(f"found no merge point that can be aligned safely ({reasons}); "
                            "run `ccamerge spec MODEL` for details")
    return derived.spec


def subsample(x: torch.Tensor, samples: int | None, seed: int) -> torch.Tensor:
    """``samples`` rows of ``x`` chosen at random with ``seed`` (all rows when None)."""
    if samples is None or samples >= len(x):
        return x
    if samples < 2:
        raise CcamergeError(f"need at least 2 statistics samples, got {samples}")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[order[:samples]]


@dataclass
class AlignResult:
    alignment: Alignment
    statistics: Statistics | None
    spec: AlignmentSpec
    options: dict
    method: str = "cca"


def align(models: Sequence[nn.Module], data, method: str = "cca", *, reference: int = 0,
          stats_samples: int | None = None, batch_size: int = 256, seed: int = 0,
          statistics: Statistics | None = None, spec: AlignmentSpec | None = None,
          progress: Progress = _silent, **options) -> AlignResult:
    """Transforms bringing every model into the reference's basis (jointly for ZipIt).

    ``statistics``: reuse statistics collected earlier (same models and reference, and every
    pair when the method is joint) instead of a new pass over the data. ``spec``: the merge
    points (default: the family's spec, or one derived by tracing for other models).
    """
    spec_method: Method = get_method(method)
    resolved = spec_method.resolve(options)
    x = train_inputs(data)
    check_compatible(models, x, reference)
    spec = spec or resolve_spec(models, x)
    stats = statistics if spec_method.statistics else None
    if spec_method.statistics and stats is None:
        progress(0.0, "collecting activation statistics")
        stats = collect_statistics(models, spec, subsample(x, stats_samples, seed), reference=reference,
                                   pairs=spec_method.statistics, batch_size=batch_size,
                                   progress=lambda f: progress(0.6 * f, "collecting activation statistics"))
    progress(0.6, f"solving {method}")
    ctx = AlignContext([m.state_dict() for m in models], spec, stats, reference, seed)
    return AlignResult(spec_method.solve(ctx, **resolved), stats, spec, resolved, method)


def aligned_states(models: Sequence[nn.Module], aligned: AlignResult,
                   folded: Sequence[tuple[str, str]] = ()) -> list[dict[str, torch.Tensor]]:
    """Every model's state dict after its transforms; ``folded`` ``(conv, batchnorm)`` pairs are
    folded first and their BatchNorm scale and statistics left untransformed."""
    spec = without_static_vectors(aligned.spec, [bn for _conv, bn in folded])
    return [apply_transforms(fold_state(m.state_dict(), folded), spec, t)
            for m, t in zip(models, aligned.alignment.transforms, strict=True)]


@dataclass
class MergeResult:
    """The merged model and everything that produced it.

    ``recipe`` is the one record of the merge that every front end saves and shows: ``method``,
    ``options`` (resolved, defaults filled in), ``reference``, ``bn_reset``, ``bn_policy``,
    ``repair``, ``weights`` ``[N]``, ``stats_samples``, ``seed``, ``data`` (``name`` and
    ``data_dir`` for ``load_dataset``, plus sizes; None for a bare input tensor), ``models``
    (each model's source file, None when unknown), ``model_sha256`` (the sha256 of the bytes
    each model was loaded from, None when unknown) and ``model_files`` (each file's name).
    ``ccamerge replay`` checks the sha256 and turns it into the same weights.
    """

    model: nn.Module
    alignment: Alignment
    statistics: Statistics | None
    spec: AlignmentSpec
    recipe: dict
    warnings: list[str] = field(default_factory=list)

    def correlations(self) -> dict[str, dict[int, np.ndarray]]:
        """Per merge point and model: canonical (CCA) or matched (permutations) correlations."""
        out = {}
        for point, per_model in self.alignment.details.items():
            out[point] = {i: d.get("rho", d.get("matched_corr")) for i, d in per_model.items()
                          if d.get("rho", d.get("matched_corr")) is not None}
        return out


def sample_warnings(stats: Statistics | None) -> list[str]:
    if stats is None:
        return []
    out = []
    for name, info in stats.summary().items():
        if info["samples_per_feature"] < MIN_SAMPLES_PER_FEATURE:
            out.append(f"merge point {name}: only {info['samples_per_feature']:.1f} samples per "
                       f"feature ({info['samples']} samples, width {info['width']}); covariances "
                       "are unreliable, use more statistics data")
        if any(info["dead_units"]):
            out.append(f"merge point {name}: dead units per model {info['dead_units']}")
    return out


def merge(models: Sequence[nn.Module], data, method: str = "cca", *, reference: int = 0,
          bn_reset: bool = True, bn_policy: str = "paper", repair: bool = False,
          weights: Sequence[float] | None = None, stats_samples: int | None = None,
          batch_size: int = 256, seed: int = 0, spec: AlignmentSpec | None = None,
          sources: Sequence[str | None] | None = None, data_dir: str | None = None,
          progress: Progress = _silent, **options) -> MergeResult:
    """Align ``models`` (N >= 2, one architecture) with ``method`` and average them.

    ``data``: a Dataset (its training images give the statistics and the BatchNorm reset) or an
    input tensor ``[B, C, S, S]``. Options are the method's (see ``METHODS``), keyword-only.
    ``repair``: rescale units towards the endpoints' statistics (nets without BatchNorm).
    ``bn_policy``: "paper" transforms BatchNorm vectors with the conv rows; "fold" folds each
    BatchNorm into its conv first and, with ``bn_reset``, restores the endpoints' per-unit scale
    (see :mod:`ccamerge.batchnorm`).
    ``sources``: the file each model was loaded from (default: each model's ``.source``) and
    ``data_dir``: the folder the dataset was read from, both recorded in the recipe.
    Returns the merged model (eval mode) in the reference's basis, with details and the recipe
    (see :class:`MergeResult`). Arguments are checked before any work (finite numbers, counts
    and indices in range); a bad one raises :class:`CcamergeError`.
    """
    weights = validate.merge_arguments(models, method, reference=reference, weights=weights,
                                       stats_samples=stats_samples, batch_size=batch_size,
                                       seed=seed, bn_reset=bn_reset, repair=repair)
    if bn_policy not in POLICIES:
        raise CcamergeError(f"bn_policy must be one of {POLICIES}, not {bn_policy!r}")
    aligned = align(models, data, method, reference=reference, stats_samples=stats_samples,
                    batch_size=batch_size, seed=seed, spec=spec, progress=progress, **options)
    progress(0.8, "averaging")
    folded = conv_bn_pairs(models[0]) if bn_policy == "fold" and has_batchnorm(models[0]) else []
    states = aligned_states(models, aligned, folded)
    weights = weights if weights is not None else [1.0 / len(models)] * len(models)
    merged = with_state(models[reference], average_states(states, weights))
    notes = sample_warnings(aligned.statistics)
    if repair:
        progress(0.85, "REPAIR: rescaling units")
        notes += _repair(merged, models, states, weights, aligned, data, stats_samples, seed)
    if bn_reset and folded:
        progress(0.9, "restoring the endpoints' BatchNorm scale")
        endpoints = [with_state(m, s) for m, s in zip(models, states, strict=True)]
        reset_to_endpoints(merged, endpoints, weights, [bn for _conv, bn in folded],
                           subsample(train_inputs(data), stats_samples, seed))
    elif bn_reset:
        progress(0.9, "resetting BatchNorm statistics")
        reset_batchnorm(merged, train_inputs(data), batch_size=batch_size)
    progress(1.0, "done")
    recipe = {"method": method, "options": aligned.options, "reference": reference,
              "bn_reset": bn_reset, "bn_policy": bn_policy, "repair": repair, "weights": weights,
              "stats_samples": stats_samples, "seed": seed,
              "data": describe_data(data, data_dir), "models": model_sources(models, sources),
              "model_sha256": [getattr(m, "sha256", None) for m in models],
              "model_files": [_file_name(m) for m in models]}
    merged.info = {"merge": recipe}
    return MergeResult(merged.eval(), aligned.alignment, aligned.statistics, aligned.spec, recipe,
                       notes)


def _file_name(model: nn.Module) -> str | None:
    """The name of the file a model was loaded from (its ``.source``), None when unknown."""
    source = getattr(model, "source", None)
    return None if source is None else Path(str(source)).name


def describe_data(data, data_dir: str | None = None) -> dict | None:
    """A recipe's ``data``: ``{"name", "data_dir"}`` (what ``load_dataset`` takes) and the
    Dataset's sizes; None for a bare input tensor."""
    if not hasattr(data, "describe"):
        return None
    described = data.describe()
    return {"name": described["name"], "data_dir": data_dir, **described}


def model_sources(models: Sequence[nn.Module], sources: Sequence[str | None] | None) -> list:
    """A recipe's ``models``: ``sources`` as strings (one per model), else each ``.source``."""
    if sources is None:
        return [getattr(m, "source", None) for m in models]
    if len(sources) != len(models):
        raise CcamergeError(f"got {len(sources)} sources for {len(models)} models")
    return [None if s is None else str(s) for s in sources]


def score_merge(models, method: str, options: dict, stats, spec, x_fit: torch.Tensor,
                 x_eval: torch.Tensor, y_eval: torch.Tensor, reference: int, bn_reset: bool) -> dict:
    """Accuracy and loss on ``x_eval`` ``[B, ...]`` / ``y_eval`` ``[B]`` of a merge built from
    statistics collected earlier (to score several methods or settings on one pass over the
    data), its BatchNorm reset (if on) run over ``x_fit``."""
    aligned = align(models, x_fit, method, reference=reference, statistics=stats, spec=spec,
                    **options)
    merged = with_state(models[reference], average_states(aligned_states(models, aligned)))
    if bn_reset:
        reset_batchnorm(merged, x_fit)
    return evaluate_model(merged, x_eval, y_eval)


def _repair(merged, models, states, weights, aligned, data, stats_samples, seed) -> list[str]:
    """Apply REPAIR; returns warnings when it cannot act."""
    if get_method(aligned.method).joint:
        raise CcamergeError("REPAIR needs each model aligned to the reference; a joint method "
                            "such as zipit has no aligned endpoints")
    endpoints = [with_state(m, s) for m, s in zip(models, states, strict=True)]
    x = subsample(train_inputs(data), stats_samples, seed)
    fixed = repair_units(merged, endpoints, weights, aligned.spec, x)
    if fixed:
        return []
    return ["REPAIR found no merge point fed by a single Linear/Conv with a bias (BatchNorm nets "
            "are corrected by the BatchNorm reset instead); nothing was rescaled"]


def interpolate(model_a: nn.Module, model_b: nn.Module, data, method: str = "average", *,
                steps: int = 11, bn_reset: bool = True, stats_samples: int | None = None,
                seed: int = 0, progress: Progress = _silent, **options) -> dict:
    """Test accuracy and loss along ``(1 - l) A + l B'`` for ``l`` on a grid of ``steps``.

    B' is B aligned to A. For methods whose transforms are not exact (CCA), the second half uses
    A aligned to B instead, so both endpoints are the true models (the paper's protocol).
    Returns ``{"method", "lambdas", "accuracy", "loss", "barrier"}``.
    """
    validate.models([model_a, model_b])
    spec_method = get_method(validate.method_name(method))
    if spec_method.joint:
        raise CcamergeError(f"{method} aligns all models jointly and defines no path between two "
                            "models; use it with merge")
    validate.integer("steps", steps, 2, validate.MAX_STEPS)
    validate.flag("bn_reset", bn_reset)
    validate.sampling(stats_samples, seed)
    spec_method.resolve(options)
    pair = [model_a, model_b]
    common = dict(stats_samples=stats_samples, seed=seed, **options)
    to_a = align(pair, data, method, reference=0, **common)
    states_a = aligned_states(pair, to_a)
    states_b = states_a
    if not spec_method.exact:  # same statistics, other reference
        states_b = aligned_states(pair, align(pair, data, method, reference=1,
                                              statistics=to_a.statistics, **common))
    lambdas = np.linspace(0.0, 1.0, steps)
    curve = {"method": method, "lambdas": lambdas.tolist(), "accuracy": [], "loss": []}
    for k, lam in enumerate(lambdas):
        states, base = (states_a, model_a) if lam <= 0.5 else (states_b, model_b)
        model = with_state(base, average_states(states, [1.0 - lam, lam]))
        if bn_reset:
            reset_batchnorm(model, train_inputs(data))
        scores = evaluate_model(model, data.x_test, data.y_test)
        curve["accuracy"].append(scores["accuracy"])
        curve["loss"].append(scores["loss"])
        progress((k + 1) / steps, f"lambda = {lam:.2f}")
    curve["barrier"] = barrier(lambdas, curve["loss"])
    return curve


def spectrum(models: Sequence[nn.Module], data, *, reference: int = 0, gamma: float | None = None,
             relative: bool | None = None, stats_samples: int | None = None, seed: int = 0,
             statistics: Statistics | None = None) -> list[dict]:
    """Per merge point and non-reference model: canonical correlations at ``gamma`` (default: the
    cca method's) and nearly unregularised (``rho``, ``rho_exact``, each ``[n]`` descending), the
    Hungarian-matched unit correlations sorted descending (``matched``), their means, and
    numerical health."""
    validate.models(models)
    validate.integer("reference", reference, 0, len(models) - 1)
    validate.sampling(stats_samples, seed)
    get_method("cca").resolve({k: v for k, v in (("gamma", gamma), ("relative", relative))
                               if v is not None})
    x = train_inputs(data)
    check_compatible(models, x, reference)
    spec = resolve_spec(models, x)
    stats = statistics or collect_statistics(models, spec, subsample(x, stats_samples, seed),
                                             reference=reference)
    rows = []
    for point in spec.points:
        p = stats[point.name]
        for i in (k for k in range(len(models)) if k != reference):
            rows.append(_spectrum_row(p, reference, i, gamma, relative))
    return rows


def _spectrum_row(p, ref: int, i: int, gamma: float | None, relative: bool | None) -> dict:
    fit = solve_pair(p, ref, i, gamma=gamma, relative=relative)
    exact = solve_near_exact(p, ref, i)
    corr = p.corr(ref, i)
    matched = np.sort(corr[np.arange(p.width), hungarian(corr)])[::-1]
    return {"name": p.name, "model": i, "width": p.width, "samples": p.count,
            "samples_per_feature": p.count / p.width,
            "rho": fit.rho.tolist(), "rho_exact": exact.rho.tolist(), "matched": matched.tolist(),
            "mean_rho": float(fit.rho.mean()), "mean_matched": float(matched.mean()),
            "cond_xx": fit.cond_xx, "cond_yy": fit.cond_yy,
            "dead_reference": int(len(p.dead_units(ref))), "dead_model": int(len(p.dead_units(i)))}
