"""The Python API: align and merge N models, interpolate between two. The CLI and the dashboard
are built on these functions.

    >>> result = merge([model_a, model_b], load_dataset("digits"), "cca", gamma=0.1)
    >>> result.model, result.alignment.details["fc1"][1]["rho"], result.recipe

Data is a :class:`~ccamerge.data.Dataset` (its ``train`` part feeds the statistics and the
BatchNorm reset, its ``test`` part the evaluation), or for merging alone any source of inputs: a
tensor ``[N, ...]``, a ``DataLoader``, an iterable of ``(x, y)`` batches. Everything streams:
memory does not grow with the number of samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ccamerge import linalg, target, validate
from ccamerge.analysis.shared import shared_spectrum_rows
from ccamerge.analysis.spectra import HOLDOUT, MIN_HELDOUT, spectrum_rows
from ccamerge.average import aligned_entries, average_aligned_state
from ccamerge.batchnorm import (
    DEFAULT_POLICY,
    carried_moments,
    check_policy,
    folded_pairs,
    mapped_targets,
    moment_batchnorms,
    output_moments,
    set_moments,
    written_points,
)
from ccamerge.data import holdout_split
from ccamerge.data.fit import (
    check_compatible,
    is_builtin,
    resolve_spec,
    score_source,
    subsample,
    train_inputs,
    train_source,
    widths_vary,
)
from ccamerge.devices import models_to, work_device
from ccamerge.distributed import rank_and_size, reset_batchnorm_sharded
from ccamerge.errors import CcamergeError
from ccamerge.evaluate import barrier, evaluate_model, labelled_source
from ccamerge.methods import AlignContext, Alignment, Method, get_method
from ccamerge.moments import PRODUCTS
from ccamerge.repair import repair as repair_units
from ccamerge.spec import STREAM_POINTS, AlignmentSpec, with_stream_points
from ccamerge.stats import MIN_SAMPLES_PER_FEATURE, Statistics, collect_statistics
from ccamerge.transform import (
    average_states,
    has_batchnorm,
    with_state,
)

Progress = Callable[[float, str], None]
__all__ = ["AlignResult", "MergeResult", "align", "aligned_states", "check_compatible",
           "interpolate", "is_builtin", "merge", "resolve_spec", "score_merge", "score_source",
           "shared_spectrum", "spectrum", "split_statistics", "subsample", "train_inputs",
           "train_source"]


def _silent(_fraction: float, _message: str) -> None:
    pass


def _check_choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise CcamergeError(f"{name} must be one of {tuple(choices)}, not {value!r}")


def place_models(models: Sequence[nn.Module], device=None) -> tuple[list[nn.Module], torch.device]:
    """``models`` on ``device`` (``"auto" | "cpu" | "cuda" | "cuda:N"`` or a torch.device;
    default: where model 0 is) and that device: the models already there, copies of the others
    (the caller's models never move). A device that is not there fails in one line."""
    place = work_device(models, device)
    return models_to(models, place), place


@dataclass
class AlignResult:
    alignment: Alignment
    statistics: Statistics | None
    spec: AlignmentSpec
    options: dict
    method: str = "cca"
    widths: dict[str, int] | None = None  # the merged model's, when narrower than the reference's


def align(models: Sequence[nn.Module], data, method: str = "cca", *, reference: int = 0,
          stats_samples: int | None = None, batch_size: int = 256, seed: int = 0,
          statistics: Statistics | None = None, spec: AlignmentSpec | None = None,
          stream_points: str = "pooled", device=None, group=None, progress: Progress = _silent,
          widths: dict[str, int] | None = None, self_only: Sequence[str] = (),
          products: str = "float32", **options) -> AlignResult:
    """Transforms bringing every model into the reference's basis (jointly for ZipIt).

    ``statistics``: reuse statistics collected earlier (same models and reference, and every
    pair when the method is joint) instead of a new pass over the data. ``spec``: the merge
    points (default: the family's spec, or one derived by tracing for other models).
    ``stream_points``: which outputs of a residual stream feed its statistics: ``"pooled"``
    (every module writing it: the stem and every block, pooled) or ``"last"`` (the last one of
    each stage, as the official code reads it); it only matters when statistics are collected
    here. ``device``: where the statistics pass runs (see :func:`place_models`); ``group``: a
    torch.distributed process group whose ranks share the statistics data (every rank passes
    the same data and gets the same result; see :mod:`ccamerge.distributed`). ``widths``: the
    merged model's width per merge point where it is below the reference's (a method with
    ``Method.target_width``; see :mod:`ccamerge.methods.narrow`). ``self_only``: modules whose
    output moments the statistics pass also measures, each model with itself (the mapped
    BatchNorm reset's: :func:`ccamerge.batchnorm.moment_batchnorms`); only when collected here.
    ``products``: the precision of the statistics pass's products, ``"float32"`` or
    ``"bfloat16"`` (faster on CPUs with AMX or AVX512-BF16; see
    :func:`ccamerge.stats.collect_statistics`); only when collected here.
    """
    spec_method: Method = get_method(method)
    resolved = spec_method.resolve(options)
    _check_choice("stream_points", stream_points, STREAM_POINTS)
    _check_choice("products", products, PRODUCTS)
    source = train_source(data)
    check_compatible(models, source, reference, method)
    models, place = place_models(models, device)
    spec = spec or resolve_spec([models[reference]], source)  # the merged model's widths
    stats = statistics if spec_method.statistics else None
    if spec_method.statistics and stats is None:
        progress(0.0, "collecting activation statistics")
        stats = collect_statistics(models, with_stream_points(spec, stream_points),
                                   subsample(source, stats_samples, seed),
                                   reference=reference,
                                   pairs=spec_method.statistics, batch_size=batch_size,
                                   device=place, group=group, self_only=self_only,
                                   products=products,
                                   progress=lambda f: progress(0.6 * f, "collecting statistics"))
    progress(0.6, f"solving {method}")
    ctx = AlignContext([m.state_dict() for m in models], spec, stats, reference, seed, widths)
    with linalg.solving_on(place):  # a GPU's statistics are factorised on that GPU
        alignment = spec_method.solve(ctx, **resolved)
    return AlignResult(alignment, stats, spec, resolved, method, widths)


def aligned_states(models: Sequence[nn.Module], aligned: AlignResult,
                   folded: Sequence[tuple[str, str]] = ()) -> list[dict[str, torch.Tensor]]:
    """Every model's state dict after its transforms; ``folded`` ``(conv, batchnorm)`` pairs are
    folded first and their BatchNorm scale and statistics left untransformed."""
    return [entries.state_dict()
            for entries in aligned_entries(models, aligned.alignment, aligned.spec, folded)]


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
    collection: dict = field(default_factory=dict)

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
          bn_reset: bool = True, bn_policy: str = DEFAULT_POLICY, reset_base_bn: bool = False,
          stream_points: str = "pooled", repair: bool = False,
          weights: Sequence[float] | None = None, stats_samples: int | None = None,
          batch_size: int = 256, seed: int = 0, spec: AlignmentSpec | None = None,
          sources: Sequence[str | None] | None = None, data_dir: str | None = None,
          statistics: Statistics | None = None, device=None, group=None,
          target_model: int | None = None, target_width: float | None = None,
          products: str = "float32", progress: Progress = _silent, **options) -> MergeResult:
    """Align ``models`` (N >= 2, one architecture) with ``method`` and average them.

    Models of one family whose widths differ merge with the methods that allow it
    (``Method.mixed_widths``: cca, gcca): ``target_model`` is the model whose widths (and
    units) the merged model has, merging into a narrower one compresses the others. It is the
    reference the others are aligned to, so it replaces ``reference`` (default: the reference).
    ``target_width``: a free width for the merged model instead (cca, gcca): for built-in
    models the family's ``width`` multiplier (the reference's layout at that multiplier), for
    traced models a fraction in (0, 1] of the reference's width at every merge point (a resized
    copy of the reference); at most the narrowest model's at every point; narrower than the
    reference it compresses, the
    merged units being reference units picked by the shared directions (see
    :mod:`ccamerge.target` and :mod:`ccamerge.methods.narrow`). Without ``target_model``, a
    built-in model whose widths ``target_width`` gives becomes the reference (the first such),
    so the merge is the one into that model (``target_model``) rather than a compression.

    ``data``: a Dataset (its training part gives the statistics and the BatchNorm reset) or any
    source of inputs (a tensor ``[B, ...]``, a DataLoader, an iterable of batches), streamed.
    Options are the method's (see ``METHODS``), keyword-only.
    ``repair``: rescale units towards the endpoints' statistics (nets without BatchNorm).
    ``bn_policy``: "mapped" (default) folds each BatchNorm into its conv first and, with
    ``bn_reset``, gives each merged unit the mean and scale of the mapped endpoint features,
    from the original models' statistics mapped by T (exact for permutations, principled for
    dense maps; see :mod:`ccamerge.batchnorm`); "paper" transforms BatchNorm vectors with the
    conv rows, as the paper and its official code do.
    ``reset_base_bn``: recompute the base models' BatchNorm statistics on the training data
    before anything else (on copies; the official code does this). ``stream_points``: see
    :func:`align`. ``statistics`` given with ``reset_base_bn`` must be those of the reset models.
    ``products``: the precision of the alignment statistics' products (:func:`align`).
    ``sources``: the file each model was loaded from (default: each model's ``.source``) and
    ``data_dir``: the folder the dataset was read from, both recorded in the recipe.
    ``statistics``: reuse statistics collected earlier (:func:`align`), so several methods
    and settings need one pass over the data. ``device``, ``group``: where it runs and which
    torch.distributed ranks share the data (see :func:`align`); the result's ``collection`` says
    ``device``, ``world_size`` and
    ``samples_per_rank`` (statistics inputs each rank read). The merged model stays on
    ``device``.
    Returns the merged model (eval mode) in the reference's basis, with details and the recipe
    (see :class:`MergeResult`). Arguments are checked before any work (finite numbers, counts
    and indices in range); a bad one raises :class:`CcamergeError`.
    """
    weights = validate.merge_arguments(models, method, reference=reference, weights=weights,
                                       stats_samples=stats_samples, batch_size=batch_size,
                                       seed=seed, bn_reset=bn_reset, repair=repair)
    reference = target_reference(reference, target_model, len(models))
    if target_model is None:
        reference = target.reference_for(models, reference, target_width)
    check_policy(bn_policy)
    validate.flag("reset_base_bn", reset_base_bn)
    _check_choice("stream_points", stream_points, STREAM_POINTS)
    _check_choice("products", products, PRODUCTS)
    recorded = model_sources(models, sources)
    _check_width_options(models, repair)
    shell, widths = target.plan(models, method, reference, target_width, data)
    if shell is not None and repair:
        raise CcamergeError("repair with a narrower target_width is not supported; the BatchNorm "
                            "reset or no correction, or target_width None")
    models, place = place_models(models, device)
    if reset_base_bn:
        progress(0.0, "resetting the base models' BatchNorm statistics")
        models = reset_base_models(models, train_source(data), batch_size=batch_size, group=group)
    aligned = align(models, data, method, reference=reference, stats_samples=stats_samples,
                    batch_size=batch_size, seed=seed, spec=spec, statistics=statistics,
                    stream_points=stream_points, group=group, progress=progress, widths=widths,
                    self_only=moment_batchnorms(models[0], bn_policy, bn_reset=bn_reset),
                    products=products, **options)
    progress(0.8, "averaging")
    weights = weights if weights is not None else [1.0 / len(models)] * len(models)
    merged = average_aligned(models, aligned, weights, reference, bn_policy,
                             shell=shell.to(place) if shell is not None else None)
    notes = sample_warnings(aligned.statistics)
    if repair:
        progress(0.85, "REPAIR: rescaling units")
        notes += _repair(merged, models, weights, aligned, bn_policy, data, stats_samples, seed)
    if bn_reset:
        progress(0.9, "setting BatchNorm statistics")
        fit = subsample(train_source(data), stats_samples, seed)
        finish_batchnorm(merged, models, aligned, weights, bn_policy, train_source(data), fit,
                         batch_size=batch_size, group=group)
    progress(1.0, "done")
    recipe = {"method": method, "options": aligned.options, "reference": reference,
              "target_model": reference, "target_width": target_width,
              "target_widths": target_widths(aligned),
              "bn_reset": bn_reset, "bn_policy": bn_policy, "reset_base_bn": reset_base_bn,
              "stream_points": stream_points, "repair": repair,
              "products": products if aligned.statistics is None else aligned.statistics.products,
              "weights": weights,
              "stats_samples": stats_samples, "seed": seed,
              "data": describe_data(data, data_dir), "models": recorded,
              "model_sha256": [getattr(m, "sha256", None) for m in models],
              "model_files": [_file_name(m) for m in models]}
    merged.info = {"merge": recipe}
    return MergeResult(merged.eval(), aligned.alignment, aligned.statistics, aligned.spec, recipe,
                       notes, collection_of(aligned.statistics, place, group))


def target_reference(reference: int, target_model: int | None, count: int) -> int:
    """The reference a merge aligns to: ``target_model`` when given (the model whose widths the
    merged model takes), else ``reference``; both given and different fails in one line."""
    if target_model is None:
        return reference
    validate.integer("target_model", target_model, 0, count - 1)
    if reference not in (0, target_model):
        raise CcamergeError(f"target_model {target_model} and reference {reference} differ; the "
                            "merged model takes the reference's widths and units, give one of them")
    return target_model


def target_widths(aligned: AlignResult) -> dict[str, int]:
    """``{merge point: width}`` of the merged model (the reference's, or the narrower
    ``aligned.widths``)."""
    if aligned.widths:
        return dict(aligned.widths)
    return {p.name: p.width for p in aligned.spec.points}


def _check_width_options(models: Sequence[nn.Module], repair: bool) -> None:
    """The options that need models of one width refuse mixed widths in one line."""
    if not widths_vary(models):
        return
    if repair:
        raise CcamergeError("repair needs models of one width; these differ in width, merge "
                            "without repair")


def reset_base_models(models: Sequence[nn.Module], x, *, batch_size: int = 256,
                      group=None) -> list[nn.Module]:
    """Copies of ``models`` with their BatchNorm statistics recomputed on ``x`` (a tensor or a
    data source; shared by the ranks of ``group``); models without BatchNorm as they are. The
    (deep) copies keep attributes such as ``source`` and ``sha256``."""
    out = []
    for model in models:
        if not has_batchnorm(model):
            out.append(model)
            continue
        out.append(reset_batchnorm_sharded(with_state(model, model.state_dict()), x,
                                           batch_size=batch_size, group=group))
    return out


def average_aligned(models: Sequence[nn.Module], aligned: AlignResult, weights: Sequence[float],
                    reference: int, bn_policy: str = DEFAULT_POLICY,
                    shell: nn.Module | None = None
                    ) -> nn.Module:
    """The weighted average of the aligned models (BatchNorm folded first under the "mapped"
    policy): a copy of the reference carrying it, or of ``shell``, the merged model of a
    narrower ``target_width``. Built an entry at a time (:mod:`ccamerge.average`): no aligned
    model is held."""
    sizes = None if shell is None else {k: v.shape for k, v in shell.state_dict().items()}
    state = average_aligned_state(models, aligned.alignment, aligned.spec, weights,
                                  folded_pairs(models[0], bn_policy), sizes)
    return with_state(shell if shell is not None else models[reference], state)


def finish_batchnorm(merged: nn.Module, models: Sequence[nn.Module], aligned: AlignResult,
                     weights: Sequence[float], bn_policy: str, train, fit, *,
                     batch_size: int = 256, group=None) -> None:
    """The BatchNorm reset of a merged model, in place. "paper": running statistics recomputed
    on ``train``; "mapped": each folded BatchNorm given the mapped moments of the original
    ``models`` (:mod:`ccamerge.batchnorm`), statistics recomputed on ``fit``. The moments are
    those ``aligned.statistics`` carry (collected with ``self_only``, on their own inputs: the
    statistics sample, ``fit`` in a merge), else measured on ``fit`` in one pass per model.
    No-op without BatchNorm."""
    bns = moment_batchnorms(models[0], bn_policy)
    if not bns:
        reset_batchnorm_sharded(merged, train, batch_size=batch_size, group=group)
        return
    moments = (carried_moments(aligned.statistics, bns)
               or output_moments(models, bns, fit, batch_size=batch_size, group=group))
    targets = mapped_targets(moments, aligned.alignment.transforms,
                             written_points(aligned.spec, bns), weights)
    set_moments(merged, targets, fit, batch_size=batch_size, group=group)


def collection_of(stats: Statistics | None, place: torch.device, group=None) -> dict:
    """``{"device", "world_size", "samples_per_rank", "samples", "layout", "products",
    "threads"}`` of a merge (no samples for a data-free method)."""
    if stats is not None:
        return stats.collection()
    return {"device": str(place), "world_size": rank_and_size(group)[1], "samples_per_rank": [],
            "samples": 0, "layout": "n/a", "products": "n/a", "threads": "n/a"}


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


def score_merge(models, method: str, options: dict, stats, spec, x_fit, x_eval,
                y_eval: torch.Tensor | None, reference: int, bn_reset: bool, *,
                bn_policy: str = DEFAULT_POLICY, fit=None, group=None) -> dict:
    """Accuracy and loss on ``x_eval`` ``[B, ...]`` / ``y_eval`` ``[B]`` (or a labelled source
    ``x_eval`` with ``y_eval`` None) of a merge built from statistics collected earlier (to score
    several methods or settings on one pass over the data), its BatchNorm reset (if on, with
    ``bn_policy``) run over ``x_fit`` (a tensor or a source; shared by the ranks of ``group``).
    ``fit``: the inputs the mapped policy recomputes the running statistics on (default
    ``x_fit``; a merge uses its statistics sample); its moments are those ``stats`` carry
    (collected with ``self_only=moment_batchnorms(...)``), else measured on ``fit``."""
    check_policy(bn_policy)
    aligned = align(models, x_fit, method, reference=reference, statistics=stats, spec=spec,
                    **options)
    weights = [1.0 / len(models)] * len(models)
    merged = average_aligned(models, aligned, weights, reference, bn_policy)
    if bn_reset:
        train = train_source(x_fit)
        finish_batchnorm(merged, models, aligned, weights, bn_policy, train,
                         train if fit is None else fit, group=group)
    return evaluate_model(merged, labelled_source(x_eval, y_eval))


def _repair(merged, models, weights, aligned, bn_policy, data, stats_samples,
            seed) -> list[str]:
    """Apply REPAIR; returns warnings when it cannot act."""
    if get_method(aligned.method).joint:
        raise CcamergeError("REPAIR needs each model aligned to the reference; a joint method "
                            "such as zipit has no aligned endpoints")
    states = aligned_states(models, aligned, folded_pairs(models[0], bn_policy))
    endpoints = [with_state(m, s) for m, s in zip(models, states, strict=True)]
    x = subsample(train_source(data), stats_samples, seed)
    fixed = repair_units(merged, endpoints, weights, aligned.spec, x)
    if fixed:
        return []
    return ["REPAIR found no merge point fed by a single Linear/Conv with a bias (BatchNorm nets "
            "are corrected by the BatchNorm reset instead); nothing was rescaled"]


def interpolate(model_a: nn.Module, model_b: nn.Module, data, method: str = "average", *,
                steps: int = 11, bn_reset: bool = True, stats_samples: int | None = None,
                seed: int = 0, statistics: Statistics | None = None, device=None, group=None,
                progress: Progress = _silent, **options) -> dict:
    """Test accuracy and loss along ``(1 - l) A + l B'`` for ``l`` on a grid of ``steps``.

    B' is B aligned to A. For methods whose transforms are not exact (CCA), the second half uses
    A aligned to B instead, so both endpoints are the true models (the paper's protocol).
    ``statistics``: reuse statistics of the pair collected earlier (A as reference);
    ``device``, ``group``: see :func:`align`.
    Returns ``{"method", "lambdas", "accuracy", "loss", "barrier"}``.
    """
    validate.models([model_a, model_b])
    if widths_vary([model_a, model_b]):
        raise CcamergeError("interpolation needs two models of one width (the path runs between "
                            "their weights); these differ in width, merge them instead")
    spec_method = get_method(validate.method_name(method))
    if spec_method.joint:
        raise CcamergeError(f"{method} aligns all models jointly and defines no path between two "
                            "models; use it with merge")
    validate.integer("steps", steps, 2, validate.MAX_STEPS)
    validate.flag("bn_reset", bn_reset)
    validate.sampling(stats_samples, seed)
    if spec_method.resolve(options).get("consensus_units"):
        raise CcamergeError("interpolation runs between the two models themselves; "
                            "consensus_units moves every model, the endpoints included, into "
                            "averaged units: interpolate without it, or merge with it")
    train, test = train_source(data), score_source(data)
    pair, _place = place_models([model_a, model_b], device)
    model_a, model_b = pair
    common = dict(stats_samples=stats_samples, seed=seed, group=group, **options)
    to_a = align(pair, data, method, reference=0, statistics=statistics, **common)
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
            reset_batchnorm_sharded(model, train, group=group)
        scores = evaluate_model(model, test)
        curve["accuracy"].append(scores["accuracy"])
        curve["loss"].append(scores["loss"])
        progress((k + 1) / steps, f"lambda = {lam:.2f}")
    curve["barrier"] = barrier(lambdas, curve["loss"])
    return curve


def spectrum(models: Sequence[nn.Module], data, *, reference: int = 0, gamma: float | None = None,
             relative: bool | None = None, stats_samples: int | None = None, seed: int = 0,
             holdout: float = HOLDOUT,
             statistics: Statistics | tuple[Statistics, Statistics | None] | None = None,
             device=None, group=None) -> list[dict]:
    """What CCA between model ``reference`` and each other model finds, per merge point: rows of
    :func:`ccamerge.analysis.spectra.spectrum_row`. CCA at ``gamma`` (default: the cca method's)
    and nearly unregularised CCA are fitted on a random ``1 - holdout`` of the ``stats_samples``
    training images; each row holds the ridge's shrunk singular values (``shrunk``, not
    correlations) beside the correlations the canonical pairs reach on the fitting images and
    on the held-out rest (``reached_fit``, ``reached_heldout``; ``exact_*`` for the nearly
    unregularised pairs), the Hungarian-matched unit pairs measured the same way
    (``matched_*``), ``mean_*`` of each, the chance level for that many samples
    (``noise_level``) and numerical health. Held-out entries are None when under
    :data:`~ccamerge.analysis.spectra.MIN_HELDOUT` images would be held out. ``statistics``:
    ``(fit, held-out or None)`` or one :class:`Statistics` (nothing held out), collected with
    this reference, instead of the passes here. ``device``, ``group``: see :func:`align`."""
    validate.models(models)
    validate.integer("reference", reference, 0, len(models) - 1)
    validate.sampling(stats_samples, seed)
    get_method("cca").resolve({k: v for k, v in (("gamma", gamma), ("relative", relative))
                               if v is not None})
    if statistics is None:
        statistics = split_statistics(models, data, stats_samples=stats_samples, seed=seed,
                                      holdout=holdout, reference=reference, pairs="reference",
                                      method="cca", device=device, group=group)
    elif isinstance(statistics, Statistics):
        statistics = (statistics, None)
    with linalg.solving_on(work_device(models, device)):
        return spectrum_rows(*statistics, gamma=gamma, relative=relative)


def shared_spectrum(models: Sequence[nn.Module], data, *, gamma: float | None = None,
                    relative: bool | None = None, stats_samples: int | None = None,
                    seed: int = 0, holdout: float = HOLDOUT,
                    statistics: tuple[Statistics, Statistics | None] | None = None,
                    device=None, group=None) -> list[dict]:
    """The gcca shared space of all N models per merge point
    (:func:`ccamerge.analysis.shared.shared_spectrum_row`): MAXVAR eigenvalues ``[k]``, the
    mean pairwise correlation of each shared direction's N variates on the fitting images and
    on a held-out ``holdout`` of the ``stats_samples`` training images, each model's
    correlation with the consensus variate, and per model how well it spans the space.
    ``gamma``, ``relative``: gcca's options (default: its registry defaults). ``statistics``:
    ``(fit, held-out or None)`` collected with ``pairs="all"``, instead of two passes here.
    ``device``, ``group``: see :func:`align`."""
    validate.models(models)
    validate.sampling(stats_samples, seed)
    get_method("gcca").resolve({k: v for k, v in (("gamma", gamma), ("relative", relative))
                                if v is not None})
    if statistics is None:
        statistics = split_statistics(models, data, stats_samples=stats_samples, seed=seed,
                                      holdout=holdout, method="gcca", device=device, group=group)
    with linalg.solving_on(work_device(models, device)):
        return shared_spectrum_rows(*statistics, gamma=gamma, relative=relative)


def split_statistics(models: Sequence[nn.Module], data, *, stats_samples: int | None = None,
                     seed: int = 0, holdout: float = HOLDOUT, reference: int = 0,
                     pairs: str = "all", method: str | None = None, device=None,
                     group=None) -> tuple[Statistics, Statistics | None]:
    """Statistics (``pairs`` with ``reference``) on a random ``1 - holdout`` of the
    ``stats_samples`` training images and on the rest (None when under :data:`MIN_HELDOUT`
    images would be held out), for fitting and measuring on images the fit did not see; the
    models are checked for ``method`` first (:func:`check_compatible`)."""
    source = train_source(data)
    check_compatible(models, source, reference, method)
    spec = resolve_spec([models[reference]], source)
    models, place = place_models(models, device)
    x = subsample(source, stats_samples, seed)
    if not MIN_HELDOUT <= round(holdout * len(x)) <= len(x) - 2:
        parts = [x]
    else:
        parts = [_rows(x, idx) for idx in holdout_split(len(x), holdout, seed)]
    stats = [collect_statistics(models, spec, part, reference=reference, pairs=pairs,
                                device=place, group=group)
             for part in parts]
    return stats[0], stats[1] if len(stats) > 1 else None


def _rows(x, indices: np.ndarray):
    """Rows ``indices`` of a tensor or a data source (lazily)."""
    return x.subset(indices) if hasattr(x, "subset") else x[torch.as_tensor(indices)]
