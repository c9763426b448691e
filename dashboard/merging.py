"""One "run" of the Merge page: every chosen method on the selection (and on growing subsets for
the accuracy-vs-N curve), the downloads and recipes. No ``st.*``: progress goes through a
``step(index, label) -> callback`` object, results come back as a plain dict for session state.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ccamerge import target
from ccamerge.api import is_builtin
from ccamerge.batchnorm import DEFAULT_POLICY as BN_DEFAULT
from ccamerge.batchnorm import POLICIES as BN_POLICIES  # noqa: F401 - the page's choices
from ccamerge.errors import CcamergeError
from ccamerge.methods import METHODS
from ccamerge.spec import STREAM_POINTS  # noqa: F401 - the page's choices
from dashboard import archives, data
from dashboard.registry import Inputs

StepFactory = Callable[[int, str], Callable[[float, str], None]]


def subset_indices(n_models: int, reference: int, n: int) -> list[int]:
    """Indices of the first ``n`` models of the selection that include the reference (selection
    order kept): the reference and the first ``n - 1`` others."""
    others = [i for i in range(n_models) if i != reference][: n - 1]
    return sorted([reference, *others])


def signature(inputs: Inputs, methods: Sequence[str], options: dict, bn_reset: bool,
              repair: bool, stats_samples: int | None, curve: bool,
              bn_policy: str = BN_DEFAULT, reset_base_bn: bool = False,
              stream_points: str = "pooled", test_samples: int | None = None,
              target_width: float | None = None) -> str:
    """What a run depends on, to tell whether shown results match the current controls."""
    return json.dumps([list(inputs.digests), inputs.reference, inputs.data_key, list(methods),
                       {m: options.get(m, {}) for m in methods}, bn_reset, repair, stats_samples,
                       curve, bn_policy, reset_base_bn, stream_points, test_samples,
                       target_width],
                      sort_keys=True, default=str)


def width_for(method: str, target_width: float | None) -> float | None:
    """The ``target_width`` a method merges into: the chosen one for the methods that take it
    (``Method.target_width``), None (the reference's width) for the others."""
    return target_width if METHODS[method].target_width else None


@dataclass(frozen=True)
class WidthRange:
    """The Merge page's target width control: the reference's value, the largest allowed, the
    field's label and what the unit means (for its help)."""

    own: float
    largest: float
    label: str
    unit: str


def target_width_range(inputs: Inputs) -> WidthRange:
    """:class:`WidthRange` of the selection: the width multiplier of built-in models
    (:func:`ccamerge.target.largest_width`), a fraction of the reference's widths for traced
    ones (:func:`dashboard.data.largest_target_width`). One line when traced models cannot be
    measured (e.g. no merge point)."""
    models, reference = inputs.models, inputs.reference
    if all(is_builtin(m) for m in models):
        own = float(models[reference].config["width"])
        return WidthRange(own, target.largest_width(models, reference),
                          "Target width (width multiplier)",
                          f"in its config's width multiplier (the reference has {own:g})")
    largest = data.largest_target_width(inputs.digests, inputs.data_key, reference, models,
                                        inputs.data)
    return WidthRange(1.0, largest, "Target width (fraction of the reference's widths)",
                      "as a fraction of the reference's width at every merge point (1: the "
                      "reference's; the merged model is a resized copy of it)")


def repairs(method: str, repair: bool) -> bool:
    """REPAIR needs each model aligned to the reference: never for joint methods (ZipIt)."""
    return repair and not METHODS[method].joint


def plan(n_models: int, methods: Sequence[str], curve: bool) -> list[tuple[str, int]]:
    """``(method, N)`` merges to run: every method on all models first, then the subsets."""
    tasks = [(m, n_models) for m in methods]
    if curve:
        tasks += [(m, n) for n in range(2, n_models) for m in methods]
    return tasks


def forwards(inputs: Inputs, methods: Sequence[str], curve: bool, *, bn_reset: bool,
             stats_samples: int | None, test_samples: int | None) -> int:
    """Image-model forward passes a :func:`run` makes besides the statistics pass, for its
    estimate: the base models' and every merge's scores, the held-out ranking (a pass of its
    own over the training images when none are left outside the statistics), BatchNorm resets
    over the training images and the curve's ensembles."""
    n, n_train = len(inputs.models), len(inputs.data.train)
    scores = test_samples or len(inputs.data.test)
    held = data.held_out_indices(inputs.data, stats_samples)
    resets = n_train if bn_reset else 0
    ranking = len(held) if held is not None else n * n_train
    total = n * (scores + resets) + len(methods) * (ranking + resets)
    total += len(plan(n, methods, curve)) * (scores + resets)
    total += sum(k * scores for k in range(2, n)) if curve else 0
    return int(total)


def run(inputs: Inputs, methods: Sequence[str], options: dict, *, bn_reset: bool, repair: bool,
        stats_samples: int | None, curve: bool, step: StepFactory,
        bn_policy: str = BN_DEFAULT, reset_base_bn: bool = False,
        stream_points: str = "pooled", test_samples: int | None = None,
        target_width: float | None = None) -> dict:
    """Merge with every method, every one (and every subset of the accuracy-vs-N curve) on one
    statistics pass (``data.shared_statistics``: step 0 of ``step``, the merges steps 1..),
    scored on ``test_samples`` test images; returns ``{"signature", "names", "reference",
    "data_name", "base", "merges", "errors", "curve", "files", "recipes", "suffix",
    "held_out_on"}`` (``files``/``recipes``: method -> merged model bytes / recipe JSON text;
    ``suffix``: ``.safetensors``, or ``.pt`` for a TorchScript archive when the reference is
    one; each merge has a ``held_out_accuracy`` on the training images ``held_out_on`` names,
    for ranking). Nothing is returned from a run that is stopped. A base-model BatchNorm reset
    or last-block stream points make each merge collect its own statistics (of other models or
    other features); the shared pass still serves the held-out ranking. ``target_width``: the
    merged width of the methods that take one (:func:`width_for`); those merges are not ranked
    on held-out images (the ranking sweep merges at the reference's width)."""
    n_models = len(inputs.models)
    tasks = plan(n_models, methods, curve)
    out = {"signature": signature(inputs, methods, options, bn_reset, repair, stats_samples, curve,
                                  bn_policy, reset_base_bn, stream_points, test_samples,
                                  target_width),
           "names": [e.name for e in inputs.entries], "reference": inputs.reference,
           "data_name": inputs.data_name, "merges": [], "errors": {}, "curve": [], "files": {},
           "recipes": {}, "suffix": ".safetensors", "held_out_on": None}
    own_pass = data.reads_own_statistics(reset_base_bn, stream_points)
    stats = data.shared_statistics(inputs.models, inputs.digests, inputs.data, inputs.data_key,
                                   reference=inputs.reference, stats_samples=stats_samples,
                                   pairs=data.pairs_needed(methods), progress=step(0, "statistics"))
    out["base"] = data.base_scores(inputs.digests, inputs.data_key, bn_reset, test_samples,
                                   inputs.models, inputs.data)
    for k, (method, n) in enumerate(tasks, start=1):
        if method in out["errors"]:
            continue
        indices = subset_indices(n_models, inputs.reference, n)
        models, digests = inputs.pick(indices)
        width = width_for(method, target_width)
        picked = None if own_pass else _picked(stats, models, indices,
                                               indices.index(inputs.reference), width)
        try:
            result = data.merge(models, digests, inputs.data, inputs.data_key, method,
                                options.get(method, {}), reference=indices.index(inputs.reference),
                                bn_reset=bn_reset, repair=repairs(method, repair),
                                bn_policy=bn_policy, reset_base_bn=reset_base_bn,
                                stream_points=stream_points, stats_samples=stats_samples,
                                test_samples=test_samples, statistics=picked, target_width=width,
                                sources=[inputs.entries[i].path for i in indices],
                                progress=step(k, f"{method}, N = {n}"))
        except CcamergeError as exc:
            out["errors"][method] = str(exc)
            continue
        out["curve"].append({"method": method, "n": n, "accuracy": result["accuracy"]})
        if n == n_models:
            out["merges"].append({k2: result[k2] for k2 in
                                  ("method", "options", "accuracy", "loss", "seconds", "warnings")})
            out["merges"][-1].update({"held_out_accuracy": None} if width is not None else
                                     _held_out(out, inputs, method, options, bn_reset,
                                               stats_samples, stats, bn_policy))
            _attach_files(out, inputs, result)
    _ensemble_curve(out, inputs, bn_reset, n_models if curve else None, test_samples)
    return out


def _picked(stats, models, indices: list[int], reference: int, width: float | None):
    """The shared statistics of the subset ``indices``, or None when ``width`` makes another
    model the reference (:func:`ccamerge.target.reference_for`: its pairs were not collected)."""
    if target.reference_for(models, reference, width) != reference:
        return None
    return data.pick_statistics(stats, indices, reference)


def _held_out(out: dict, inputs: Inputs, method: str, options: dict, bn_reset: bool,
              stats_samples: int | None, stats, bn_policy: str = BN_DEFAULT) -> dict:
    """``{"held_out_accuracy"}``: the merge of every selected model scored on held-out training
    images (``data.held_out_score`` on the run's statistics ``stats``; None when the data is
    too small to hold some out; with the run's ``bn_policy``); the images are named in
    ``out["held_out_on"]``."""
    try:
        score = data.held_out_score(inputs.models, inputs.digests, inputs.data, inputs.data_key,
                                    method, options.get(method, {}), reference=inputs.reference,
                                    bn_reset=bn_reset, stats_samples=stats_samples,
                                    statistics=stats, bn_policy=bn_policy)
    except CcamergeError:
        return {"held_out_accuracy": None}
    out["held_out_on"] = score["selected_on"]
    return {"held_out_accuracy": score["accuracy"]}


def ranked(merges: Sequence[dict]) -> list[dict]:
    """Merges best first by held-out accuracy (those without one last), then by method order."""
    scored = [m for m in merges if m.get("held_out_accuracy") is not None]
    return sorted(scored, key=lambda m: -m["held_out_accuracy"]) + [
        m for m in merges if m.get("held_out_accuracy") is None]


def dashboard_recipe(inputs: Inputs, recipe: dict) -> dict:
    """``api.merge``'s ``recipe`` (a copy, every other field kept) made portable: ``models``
    names each upload by the file name the user gave it (a demo model by its cached file),
    ``model_files`` those names, ``model_sha256`` the sha256 of exactly those files (what
    ``ccamerge replay`` verifies), ``model_architectures`` the architecture a weights-only
    ``.pt`` was loaded with (so replay reads the user's ``.pt``), ``data`` an uploaded dataset
    by its file name and sha256; plus the models' display names and the replay command."""
    entries = inputs.entries
    out = {**recipe, "models": inputs.files, "model_files": [e.filename for e in entries],
           "model_sha256": [e.digest for e in entries],
           "model_names": [e.name for e in entries]}
    architectures = [e.architecture for e in entries]
    if any(architectures):
        out["model_architectures"] = architectures
    if inputs.data_entry is not None and recipe.get("data"):
        entry = inputs.data_entry
        out["data"] = {**recipe["data"], "name": entry.recipe_name, "file": entry.name,
                       "sha256": entry.digest}
        if entry.prepare:
            out["data"]["prepare"] = entry.prepare
    out["replay"] = replay_command(out, archives.is_archive_model(inputs.models[inputs.reference]))
    return out


def replay_command(recipe: dict, archive: bool) -> str:
    """``ccamerge replay recipe_cca.json --models a.pt b.pt --out merged_cca.safetensors``:
    the command that redoes the merge in a folder holding the files the recipe names (and the
    dataset file, when one was uploaded), preceded by the ``unzip`` an image folder needs."""
    method = recipe["method"]
    suffix = ".pt" if archive else ".safetensors"
    words = ["ccamerge", "replay", f"recipe_{method}.json", "--models",
             *map(shlex.quote, recipe["models"]), "--out", f"merged_{method}{suffix}"]
    if archive:
        words.append("--trust-code")
    prepare = (recipe.get("data") or {}).get("prepare")
    return f"{prepare} && {' '.join(words)}" if prepare else " ".join(words)


def _attach_files(out: dict, inputs: Inputs, result: dict) -> None:
    """The download of one merge of every selected model: its file and its recipe."""
    method, reference = result["method"], inputs.models[inputs.reference]
    recipe = dashboard_recipe(inputs, result["recipe"])
    out["suffix"] = ".pt" if archives.is_archive_model(reference) else ".safetensors"
    info = {"merge": recipe, "dataset": recipe["data"]["name"],
            "test_accuracy": result["accuracy"], "test_loss": result["loss"]}
    out["files"][method] = data.merged_file(result["model"], info, reference=reference)
    out["recipes"][method] = json.dumps(recipe, indent=2)


def _ensemble_curve(out: dict, inputs: Inputs, bn_reset: bool, n_max: int | None,
                    test_samples: int | None = None) -> None:
    """The ensemble of the same subsets, as the reference line of the accuracy-vs-N chart."""
    n_models = len(inputs.models)
    for n in range(2, (n_max or n_models) + 1) if n_max else [n_models]:
        models, digests = inputs.pick(subset_indices(n_models, inputs.reference, n))
        scores = data.base_scores(digests, inputs.data_key, bn_reset, test_samples, models,
                                  inputs.data)
        out["curve"].append({"method": "ensemble", "n": n,
                             "accuracy": scores["ensemble"]["accuracy"]})
