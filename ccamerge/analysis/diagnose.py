"""Why did this merge fail? Per-layer health, partial merges and a plain-language checklist.

:func:`diagnose` aligns and merges once, then measures per merge point

* similarity of the endpoints: mean canonical correlation (nearly unregularised) and mean
  Hungarian-matched correlation;
* numerical health: condition numbers, dead units, samples per feature;
* collapse: total activation variance of the merged model over the endpoints' mean;
* damage: accuracy and loss of the partial merge that merges the first k points only and keeps the
  reference's remaining layers (they are in the reference basis already); the loss added at point
  k ranks the layers.

The findings of :mod:`ccamerge.analysis.checklist` turn these numbers into causes and next steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ccamerge.analysis.checklist import findings_for
from ccamerge.api import (
    align,
    average_aligned,
    finish_batchnorm,
    place_models,
    resolve_spec,
    score_merge,
    score_source,
    subsample,
    train_source,
)
from ccamerge.batchnorm import DEFAULT_POLICY, check_policy, moment_batchnorms
from ccamerge.data import as_source, holdout_split
from ccamerge.data.sources import DataSource
from ccamerge.errors import CcamergeError
from ccamerge.evaluate import evaluate_model, stream_metrics, with_bn_reset
from ccamerge.methods import get_method
from ccamerge.methods.base import hungarian
from ccamerge.methods.cca import solve_near_exact
from ccamerge.spec import AlignmentSpec
from ccamerge.stats import CrossMoments, Statistics, batch_features, collect_statistics
from ccamerge.transform import has_batchnorm, reset_batchnorm, with_state


def merged_prefix(spec: AlignmentSpec, k: int) -> set[str]:
    """Parameters merged when only the first ``k`` merge points are: those whose every merge
    point (as producer or consumer) is among the first ``k``; the logits layer joins at k = all."""
    inside = set(spec.names[:k])
    table = spec.axes_by_param()
    return {param for param, entries in table.items()
            if all(point.name in inside for _axis, point, _role in entries)}


def partial_state(reference_state: dict[str, torch.Tensor], merged_state: dict[str, torch.Tensor],
                  spec: AlignmentSpec, k: int) -> dict[str, torch.Tensor]:
    """Merged values for the first ``k`` points' parameters, the reference's elsewhere. Parameters
    outside every merge point (the logits bias) follow the last layer."""
    chosen = merged_prefix(spec, k)
    covered = set(spec.axes_by_param())
    everything = k == len(spec.points)
    return {key: merged_state[key] if key in chosen or (everything and key not in covered)
            else reference_state[key] for key in reference_state}


def partial_curve(reference: nn.Module, merged_state: dict[str, torch.Tensor], spec: AlignmentSpec,
                  data, bn_reset: bool, first: int = 0, last: int = 0) -> list[dict]:
    """Test accuracy and loss of the partial merges k = ``first`` (0: the reference) .. all
    points (``last`` < 0: that many fewer), BatchNorm statistics recomputed on the training
    data."""
    train, test = train_source(data), score_source(data)
    rows = []
    for k in range(first, len(spec.points) + 1 + last):
        model = with_state(reference, partial_state(reference.state_dict(), merged_state, spec, k))
        if bn_reset:
            reset_batchnorm(model, train)
        rows.append(evaluate_model(model, test))
    return rows


@torch.no_grad()
def _total_variance(model: nn.Module, spec: AlignmentSpec, x,
                    batch_size: int = 256) -> dict[str, float | None]:
    """Per point: the trace of ``model``'s feature covariance over ``x`` (a tensor or a source,
    streamed); None where the features are not finite (e.g. negative BatchNorm variances after
    a non-permutation transform)."""
    moments = {p.name: CrossMoments(p.width, p.width) for p in spec.points}
    broken: set[str] = set()
    model.eval()
    for xb, _ in as_source(x).batches(batch_size):
        for name, feats in batch_features(model, spec, xb).items():
            if not bool(torch.isfinite(feats).all()):
                broken.add(name)
            elif name not in broken:
                moments[name].update(feats)
    return {name: None if name in broken else float(np.trace(m.covariance))
            for name, m in moments.items()}


def _collapse(merged: nn.Module, spec: AlignmentSpec, stats, x) -> dict[str, float | None]:
    """Per point: total variance of the merged model's features / mean over the endpoints
    (None where the merged model's features are NaN/inf)."""
    merged_var = _total_variance(merged, spec, x)
    ratios = {}
    for point in spec.points:
        endpoint = np.mean([np.trace(stats[point.name].cov(i, i)) for i in range(stats.num_models)])
        var = merged_var[point.name]
        ratios[point.name] = None if var is None else float(var / max(endpoint, 1e-30))
    return ratios


def _similarity(stats, point: str, ref: int, others: Sequence[int]) -> dict:
    p = stats[point]
    rho, matched, same, cond_x, cond_y = [], [], [], [], []
    for i in others:
        fit = solve_near_exact(p, ref, i)
        corr = p.corr(ref, i)
        rho.append(fit.rho.mean())
        matched.append(corr[np.arange(p.width), hungarian(corr)].mean())
        # unit j with unit j: what averaging without alignment pairs
        same.append(np.diag(corr).mean())
        cond_x.append(fit.cond_xx)
        cond_y.append(fit.cond_yy)
    dead = [len(p.dead_units(i)) for i in range(stats.num_models)]
    return {"mean_rho": float(np.mean(rho)), "mean_matched": float(np.mean(matched)),
            "mean_same_index": float(np.mean(same)),
            "cond_reference": float(np.max(cond_x)), "cond_models": float(np.max(cond_y)),
            "dead_units": dead, "dead_fraction": float(max(dead) / p.width),
            "samples": p.count, "samples_per_feature": p.count / p.width}


def diagnose(models: Sequence[nn.Module], data, method: str = "cca", *, reference: int = 0,
             bn_reset: bool = True, stats_samples: int | None = None, seed: int = 0,
             with_sweep: bool = False, statistics: Statistics | None = None, device=None,
             bn_policy: str = DEFAULT_POLICY, progress=None, **options) -> dict:
    """A JSON-able report: base, ensemble and merged scores; per point similarity, health,
    collapse and damage (``points``, in depth order); ``ranking`` (points by loss added);
    ``sweep`` (with ``with_sweep``, for cca and zipit); ``findings`` (checklist, most severe
    first) and ``healthy``. ``statistics``: reuse statistics collected earlier on
    ``subsample(train, stats_samples, seed)`` (every model with the reference, or every pair)
    instead of a new pass (collected with ``self_only=moment_batchnorms(...)`` they also give
    the mapped BatchNorm reset its moments; else one more pass per model measures them); the
    sweep reuses them only with ``validation`` (see :func:`sweep`).
    ``device``: where it runs (see :func:`ccamerge.api.place_models`). ``bn_policy``: the
    merge's BatchNorm policy (see :func:`ccamerge.api.merge`): ``merged`` is the merge as
    ``merge`` builds it; the partial merges before it recompute their BatchNorm statistics
    plainly (the merged points' units and the reference's mixed)."""
    check_policy(bn_policy)
    models, _place = place_models(models, device)
    report = progress or (lambda _f, _m: None)
    x, test = train_source(data), score_source(data)
    x_stats = subsample(x, stats_samples, seed)
    spec = resolve_spec([models[reference]], x)  # the merged model's widths
    if statistics is None:  # every model against the reference, even for data-free methods
        report(0.0, "collecting activation statistics")
        pairs = get_method(method).statistics or "reference"
        statistics = collect_statistics(models, spec, x_stats, reference=reference, pairs=pairs,
                                        self_only=moment_batchnorms(models[0], bn_policy,
                                                                    bn_reset=bn_reset),
                                        progress=lambda f: report(0.25 * f,
                                                                  "collecting statistics"))
    aligned = align(models, data, method, reference=reference, stats_samples=stats_samples,
                    seed=seed, statistics=statistics, spec=spec, **options)
    stats = statistics
    report(0.3, "merging")
    weights = [1.0 / len(models)] * len(models)
    merged = average_aligned(models, aligned, weights, reference, bn_policy)
    merged_state = merged.state_dict()
    if bn_reset:
        finish_batchnorm(merged, models, aligned, weights, bn_policy, x, x_stats)
    base, predicted, ensemble = base_scores(models, x, test)
    report(0.5, "partial merges")
    # k = 0 is the reference after its own reset, k = all the merged model as merge builds it
    partial = [base[reference], *partial_curve(models[reference], merged_state, aligned.spec,
                                                data, bn_reset, first=1, last=-1),
               evaluate_model(merged, test)]
    collapse = _collapse(merged, aligned.spec, stats, x_stats)
    others = [i for i in range(len(models)) if i != reference]
    points = []
    for k, point in enumerate(aligned.spec.points, start=1):
        row = {"name": point.name, "width": point.width,
               **_similarity(stats, point.name, reference, others),
               "variance_ratio": collapse[point.name],
               "partial_accuracy": partial[k]["accuracy"], "partial_loss": partial[k]["loss"],
               "damage_loss": _loss_added(partial[k - 1]["loss"], partial[k]["loss"]),
               "damage_accuracy": partial[k - 1]["accuracy"] - partial[k]["accuracy"]}
        points.append(row)
    result = {
        "method": method, "options": aligned.options, "reference": reference, "bn_reset": bn_reset,
        "bn_policy": bn_policy,
        "has_batchnorm": has_batchnorm(models[0]), "num_classes": int(test.labels().max()) + 1,
        "base": base, "ensemble": ensemble, "merged": partial[-1],
        "reference_only": partial[0], "points": points,
        "ranking": [p["name"] for p in sorted(points, key=_damage_order)],
        "predicted_classes": predicted,
    }
    if method == "cca" and result["has_batchnorm"]:
        # a permutation merge from the same statistics: do CCA's dense maps, rather than the
        # models, cost the accuracy on this BatchNorm net?
        result["permute_check"] = score_merge(models, "permute", {}, stats, aligned.spec, x,
                                               test, None, reference, bn_reset,
                                               bn_policy=bn_policy, fit=x_stats)
    if with_sweep and method in ("cca", "zipit"):
        report(0.7, f"sweeping {method} hyperparameters")
        result["sweep"] = sweep(models, data, method, reference=reference, bn_reset=bn_reset,
                                stats_samples=stats_samples, seed=seed, current=aligned.options,
                                bn_policy=bn_policy,
                                progress=lambda f, m: report(0.7 + 0.2 * f, m))
    report(0.9, "checklist")
    result["findings"] = findings_for(result)
    result["healthy"] = not any(f["severity"] == "failure" for f in result["findings"])
    report(1.0, "done")
    return result


def _loss_added(before: float, after: float) -> float | None:
    """Loss added by one more merged point: inf where the loss turns NaN/inf there (the point
    that breaks the model), None where it was not finite before either."""
    if not np.isfinite(before):
        return None
    return float(after - before) if np.isfinite(after) else float("inf")


def _damage_order(point: dict) -> tuple[float, float]:
    """Sort key, most damaging first: loss added (unknown last), then accuracy lost."""
    loss = point["damage_loss"]
    return (-loss if loss is not None else float("inf"), -point["damage_accuracy"])


def base_scores(models: Sequence[nn.Module], x, test: DataSource
                ) -> tuple[list[dict], list[list[float]], dict]:
    """One pass per model over ``test``: each model's scores (after its BatchNorm reset on
    ``x``, as the merge gets), the share of inputs it predicts as each class, and the ensemble's
    scores (the mean of the recorded logits, batch by batch, as :func:`evaluate_ensemble`)."""
    scores, predicted, recorded = [], [], []
    for model in models:
        logits: list[torch.Tensor] = []
        scores.append(evaluate_model(_Recorder(with_bn_reset(model, x), logits), test))
        predicted.append(_class_shares(logits))
        recorded.append(logits)
    means = iter([torch.stack(batch).mean(0) for batch in zip(*recorded, strict=True)])
    ensemble = stream_metrics(lambda _xb: next(means), test)
    return scores, predicted, ensemble


class _Recorder(nn.Module):
    """``model`` that also appends each batch's logits ``[B, K]`` to ``logits``."""

    def __init__(self, model: nn.Module, logits: list):
        super().__init__()
        self.model, self.logits = model, logits

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        out = self.model(xb)
        self.logits.append(out.float().cpu())
        return out


def _class_shares(logits: Sequence[torch.Tensor]) -> list[float]:
    """Share of inputs predicted as each class (which labels a model actually uses), from its
    logits ``[B, K]`` per batch."""
    counts = np.bincount(torch.cat(list(logits)).argmax(1).numpy()).astype(float)
    return (counts / counts.sum()).tolist()


def default_grid(method: str) -> list[dict]:
    """Log grid of relative gamma for CCA; alpha x beta for ZipIt."""
    if method == "cca":
        return [{"gamma": g, "relative": True} for g in np.logspace(-4, 3, 8).tolist()]
    if method == "zipit":
        return [{"alpha": a, "beta": b} for a in (0.1, 0.3, 0.5, 1.0) for b in (0.0, 0.125, 0.25)]
    raise CcamergeError(f"no hyperparameters to sweep for {method}; sweep cca or zipit")


def sweep(models: Sequence[nn.Module], data, method: str = "cca", *, grid: list[dict] | None = None,
          holdout: float = 0.2, reference: int = 0, bn_reset: bool = True,
          stats_samples: int | None = None, seed: int = 0, current: dict | None = None,
          validation=None, statistics: Statistics | None = None, device=None,
          bn_policy: str = DEFAULT_POLICY, progress=None) -> dict:
    """Merged accuracy over a grid of option settings, measured on a held-out slice of the
    training set (never the test set); statistics and BatchNorm reset use the rest.
    ``validation`` (``(x [B, ...], y [B])`` or a labelled source) gives the held-out samples
    explicitly (then all of ``data.train`` is used for statistics). Returns ``{"method", "grid",
    "accuracy", "loss", "best", "best_index", "best_at_edge", "parameter", "selected_on"}``, and
    ``"current": {"options", "accuracy", "loss"}`` for the ``current`` options (the ones a merge
    used) scored the same way. ``statistics``: with ``validation``, statistics collected
    earlier on ``subsample(data.train, stats_samples, seed)`` (the pairs the method needs), so
    the sweep needs no pass of its own; the validation images must lie outside them.
    ``device``: where it runs. ``bn_policy``: the merges' BatchNorm policy (see
    :func:`ccamerge.api.merge`)."""
    models, _place = place_models(models, device)
    report = progress or (lambda _f, _m: None)
    grid = grid or default_grid(method)
    if validation is None:
        fit_idx, val_idx = holdout_split(len(data.train), holdout, seed)
        x_fit, val = data.train.subset(fit_idx), data.train.subset(val_idx)
        selected_on = f"held-out {holdout:.0%} of the training set ({len(val_idx)} images)"
    else:
        x_fit, val = data.train, as_source(validation)
        selected_on = f"{len(val)} held-out images"
    method_info = get_method(method)
    spec = resolve_spec([models[reference]], x_fit)  # the merged model's widths
    if statistics is not None and validation is None:
        raise CcamergeError("sweep reuses statistics only with explicit validation images (the "
                            "held-out split needs statistics of its own)")
    stats = statistics or collect_statistics(models, spec, subsample(x_fit, stats_samples, seed),
                                             reference=reference,
                                             pairs=method_info.statistics or "reference",
                                             self_only=moment_batchnorms(models[0], bn_policy,
                                                                         bn_reset=bn_reset))

    def score(options: dict) -> dict:
        return score_merge(models, method, options, stats, spec, x_fit, val, None, reference,
                           bn_reset, bn_policy=bn_policy)

    scores = []
    for k, options in enumerate(grid):
        scores.append(score(options))
        report((k + 1) / len(grid), f"{method} {options}")
    best = int(np.argmax([s["accuracy"] - 1e-9 * np.nan_to_num(s["loss"], nan=1e9)
                          for s in scores]))
    varied = [key for key in grid[0] if len({str(g[key]) for g in grid}) > 1]
    edge = any(grid[best][key] in (grid[0][key], grid[-1][key]) for key in varied
               if isinstance(grid[best][key], (int, float)) and len(varied) == 1)
    out = {"method": method, "grid": grid, "accuracy": [s["accuracy"] for s in scores],
           "loss": [s["loss"] for s in scores], "best": grid[best], "best_index": best,
           "best_at_edge": bool(edge), "parameter": ", ".join(varied),
           "selected_on": selected_on}
    if current is not None:
        out["current"] = {"options": dict(current), **score(current)}
    return out
