"""Every cache around ccamerge calls, and the demo zoo.

Cache keys are content: the sha256 of a model file's bytes, the dataset key (a built-in name or
``npz:<sha256>`` of the uploaded file) and the options. Sessions therefore share computation on
identical inputs, but nothing is ever looked up by anything a session could not produce itself
from its own files; uploaded bytes live only in that session's ``st.session_state``.

Every cache is a process-wide LRU bounded in bytes (:class:`Memo`; the size of a cached value is
the sum of the ``nbytes`` of the tensors and arrays it holds, a model's being its state dict's):
loaded networks share :data:`MODEL_CACHE_BYTES`, computed results :data:`RESULT_CACHE_BYTES`. The
oldest entries go first; a value larger than its whole cache is computed but not kept (a merge says
so in its warnings). :func:`cached` keys a function like ``st.cache_data`` does (arguments whose
names start with ``_`` are left out; the digests stand for them) and hands out deep copies; merges,
curves and diagnoses report progress through a callback while they run and are shared read-only.
Computations always run on deep copies of the cached models, so concurrent sessions never share
forward hooks or mutate a cached network.

Statistics: one pass per (model digests, dataset, statistics images) with :data:`SEED`
(:func:`shared_statistics`, every pair for N <= 3 or when asked, as the Spectra page's shared
space asks), handed to every merge, method, gamma, subset
of the accuracy-vs-N curve, interpolation, spectrum, diagnosis and sweep; rankings, the sweep
and held-out spectra use :data:`HELD_OUT_SAMPLES` training images outside that sample
(:func:`held_out_images`). Scores are measured on a random ``test_samples`` of the test images
(:func:`scored`). The sidebar sets both sizes (defaults :data:`STATS_SAMPLES`,
:data:`TEST_SAMPLES`).

Uploads: at most :data:`MAX_UPLOAD_BYTES` per file and, per session, :data:`SESSION_UPLOAD_BYTES`
in :data:`SESSION_UPLOAD_FILES` files (see :mod:`dashboard.registry`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st
import torch
from torch import nn

from ccamerge import api, target
from ccamerge.analysis import explorer, shared, spectra, teach
from ccamerge.analysis.checklist import findings_for
from ccamerge.analysis.diagnose import base_scores as diagnose_base_scores
from ccamerge.analysis.diagnose import diagnose, partial_curve, sweep
from ccamerge.analysis.features import (
    AlignedUnits,
    FeatureMatching,
    aligned_units,
    feature_matching,
)
from ccamerge.batchnorm import DEFAULT_POLICY as BN_DEFAULT
from ccamerge.batchnorm import moment_batchnorms
from ccamerge.data import Dataset, load_dataset
from ccamerge.data.sources import DataSource
from ccamerge.errors import CcamergeError
from ccamerge.evaluate import evaluate_ensemble, evaluate_model
from ccamerge.files import check_output_path
from ccamerge.io import is_archive_model, load_model_bytes, save_merged
from ccamerge.methods import get_method
from ccamerge.models import build_model, check_input_fit
from ccamerge.spec import build_spec, matching_names, same_points
from ccamerge.stats import PointStatistics, Statistics, collect_statistics
from ccamerge.trace.derive import derive_and_verify
from ccamerge.trace.explain import explain
from ccamerge.train import default_config, train_zoo, zoo_filename
from ccamerge.transform import average_states, has_batchnorm
from dashboard import archives
from dashboard.caches import Memo, cached
from dashboard.caches import key as _key

Progress = Callable[[float, str], None]
MAX_UPLOAD_BYTES = 200 * 2**20  # one uploaded file
SESSION_UPLOAD_BYTES = 512 * 2**20  # all files one session uploads
SESSION_UPLOAD_FILES = 32
MODEL_CACHE_BYTES = 2 * 2**30  # loaded networks, shared by every session
RESULT_CACHE_BYTES = 2**30  # statistics, spectra, merges, curves, diagnoses...
SEED = 0


def _limit_threads() -> int:
    """One BLAS/torch thread per two cores (at most 4; ``CCAMERGE_THREADS`` overrides): the
    models are small, and oversubscribed threads on a shared machine cost 10x, not 2x."""
    n = int(os.environ.get("CCAMERGE_THREADS") or max(1, min(4, (os.cpu_count() or 1) // 2)))
    torch.set_num_threads(n)
    try:
        import scipy.linalg  # noqa: F401  (load its BLAS before limiting it)
        from threadpoolctl import threadpool_limits
        threadpool_limits(n)
    except ImportError:
        pass
    return n


THREADS = _limit_threads()


# ----------------------------------------------------------------------------- demo zoo
@dataclass(frozen=True)
class ZooGroup:
    """Models of one architecture trained by ``train_zoo`` with one split; ``overrides`` change
    the default config (e.g. BatchNorm), ``label`` names them in the UI."""

    label: str
    arch: str
    seeds: tuple[int, ...]
    split: str = "same"
    epochs: int = 20
    width: float = 1.0
    overrides: tuple[tuple[str, object], ...] = ()


DEMO_DATASET = "digits"
# About 15 s of training on 2 busy cores; MLPs ~97%, VGGs ~99%, skewed halves ~91% on digits.
DEMO_ZOO = (ZooGroup("mlp", "mlp", (0, 1, 2, 3)),
            ZooGroup("vgg+bn", "vgg", (0, 1, 2), epochs=15, overrides=(("batch_norm", True),)),
            ZooGroup("mlp", "mlp", (0, 1), split="skewed"))
_DEMO_LOCK = threading.Lock()


def demo_dir() -> Path:
    """Where the demo zoo lives: ``$CCAMERGE_CACHE_DIR`` or ``~/.cache/ccamerge/demo``."""
    return Path(os.environ.get("CCAMERGE_CACHE_DIR") or "~/.cache/ccamerge/demo").expanduser()


def demo_files() -> list[Path]:
    return [demo_dir() / zoo_filename(g.arch, g.width, g.split, s)
            for g in DEMO_ZOO for s in g.seeds]


def demo_ready() -> bool:
    """True when every demo file exists (the next start needs no training)."""
    return all(p.is_file() for p in demo_files())


def ensure_demo(progress: Progress | None = None) -> list[dict]:
    """Train the missing demo models (reuse the others) and return one row per model:
    ``train_zoo``'s row plus ``label``, ``arch`` and ``split_kind``. One session trains at a time;
    the others wait and then reuse the files."""
    total = sum(len(g.seeds) for g in DEMO_ZOO)
    rows, done = [], 0
    try:
        check_output_path(demo_dir(), folder=True, flag="the demo folder")
    except CcamergeError as exc:
        raise CcamergeError(f"{exc}; set CCAMERGE_CACHE_DIR to a writable folder") from exc
    with _DEMO_LOCK:
        data = load_dataset(DEMO_DATASET)
        for group in DEMO_ZOO:
            def report(fraction: float, message: str, done=done, group=group) -> None:
                if progress is not None:
                    progress((done + fraction * len(group.seeds)) / total,
                             f"{group.arch}: {message}")
            # The full config (defaults the constructor adds included), so that train_zoo
            # recognises its own files on the next start.
            config = default_config(group.arch, data, width=group.width) | dict(group.overrides)
            config = build_model(group.arch, **config).config
            try:
                out = train_zoo(group.arch, data, group.seeds, demo_dir(), split=group.split,
                                width=group.width, epochs=group.epochs, config=config,
                                progress=report)
            except OSError as exc:
                raise CcamergeError(f"cannot write the demo models to {demo_dir()} ({exc}); set "
                                    "CCAMERGE_CACHE_DIR to a writable folder") from exc
            rows += [dict(r, label=group.label, arch=group.arch, split_kind=group.split)
                     for r in out]
            done += len(group.seeds)
    return rows


# ----------------------------------------------------------------------------- models, data
@cached(lambda: model_memo(), share=True)
def _load_model(digest: str, filename: str, arch: str | None, config_json: str,
                _read: Callable[[], bytes]) -> nn.Module:
    config = json.loads(config_json) if config_json else None
    return load_model_bytes(_read(), filename, arch=arch, config=config, max_bytes=MAX_UPLOAD_BYTES)


def load_model(digest: str, filename: str, read: Callable[[], bytes], *, arch: str | None = None,
               config: dict | None = None) -> nn.Module:
    """The network in a model file, loaded once per content (``digest`` = sha256 of the bytes
    ``read()`` returns). Shared and read-only: compute on :func:`fresh` copies."""
    config_json = json.dumps(config, sort_keys=True) if config is not None else ""
    return _load_model(digest, filename, arch, config_json, read)


def fresh(models: Sequence[nn.Module]) -> list[nn.Module]:
    """Private deep copies (hooks, BatchNorm resets and ``eval()`` never touch the shared ones)."""
    return [copy.deepcopy(m) for m in models]


def fast(models: Sequence[nn.Module]) -> list[nn.Module]:
    """:func:`fresh` copies, built-in image models in channels-last memory, for the dashboard's
    scores (about 1.6x faster on CPU; outputs agree to float32 rounding). Weights computed
    from statistics alone come out bit for bit the same; merges whose weights depend on forward
    passes (BatchNorm reset, REPAIR) use :func:`fresh` copies."""
    copies = fresh(models)
    return [m.to(memory_format=torch.channels_last) if _is_image_builtin(m) else m
            for m in copies]


def _is_image_builtin(model: nn.Module) -> bool:
    config = getattr(model, "config", {})
    return api.is_builtin(model) and bool(config.get("image_size"))


def dataset(path_or_name: str) -> Dataset:
    """A built-in dataset by name or an uploaded ``.npz`` by its session-private path (the
    library caches both in-process)."""
    return load_dataset(path_or_name)


def check_fit(models: Sequence[nn.Module], data: Dataset, *,
              names: Sequence[str] | None = None, data_label: str | None = None) -> None:
    """Fail with one readable line when ``data``'s samples (feature vectors ``[F]`` or images
    ``[C, H, W]`` of any size) or classes do not fit a model: the built-in families by
    :func:`ccamerge.models.check_input_fit`, others by running them. ``names`` name the models
    (default ``model <index>``) and ``data_label`` the dataset (default ``dataset <file
    name>``)."""
    label = data_label or f"dataset {Path(data.name).name}"
    for index, model in enumerate(models):
        name = names[index] if names else f"model {index}"
        try:
            if api.is_builtin(model):
                check_input_fit(model, data.input_shape, data.num_classes)
            else:
                _check_runs(model, data)
        except CcamergeError as exc:
            raise CcamergeError(f"{name} does not fit {label}: {exc}") from None


@torch.no_grad()
def _check_runs(model: nn.Module, data: Dataset) -> None:
    """A model outside the built-in families (a TorchScript archive) says nothing about its
    inputs: run it on two test samples and compare its outputs with the dataset's classes."""
    net = copy.deepcopy(model).eval() if model.training else model
    shape = "x".join(map(str, data.input_shape))
    try:
        out = net(data.x_test[:2])
    except Exception as exc:  # the model's own code failed on these samples
        raise CcamergeError(f"it cannot run on its {shape} samples ({type(exc).__name__}); pick "
                            "the dataset the models were trained on") from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != data.num_classes:
        got = list(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CcamergeError(f"it outputs {got} per sample but the data has {data.num_classes} "
                            "classes; pick the dataset the models were trained on")


def uses_batchnorm(models: Sequence[nn.Module]) -> bool:
    return any(has_batchnorm(m) for m in models)


# ----------------------------------------------------------------------------- cached analyses
@cached(lambda: memo())
def model_scores(digest: str, data_key: str, _model: nn.Module, _data: Dataset) -> dict | None:
    """Test accuracy (percent) and loss of one model, None when the dataset does not fit it."""
    try:
        check_fit([_model], _data)
    except CcamergeError:
        return None
    return evaluate_model(copy.deepcopy(_model), _data.x_test, _data.y_test)


STATS_SAMPLES = 3000  # default training images behind the statistics (about 2 s for 2 VGGs)
TEST_SAMPLES = 1000  # default test images scored (each is a forward pass per model and setting)
HELD_OUT_SAMPLES = 1000  # training images outside the statistics: ranking, sweep, held-out spectra
MIN_HELD_OUT = 100  # fewer held-out images left and the library's 80/20 split is used instead


def effective_samples(requested: int | None, available: int) -> int | None:
    """``requested`` images of ``available``; None (all of them) for 0, None or at least all."""
    return None if not requested or requested >= available else int(requested)


def scored(data: Dataset, test_samples: int | None) -> Dataset:
    """``data`` with its test part cut to ``test_samples`` images drawn with :data:`SEED` (all
    when None): what every dashboard score is measured on."""
    if effective_samples(test_samples, len(data.test)) is None:
        return data
    return Dataset(data.name, data.train, data.test.take(int(test_samples), SEED),
                   data.num_classes, data.mean, data.std)


def _training_order(data: Dataset) -> torch.Tensor:
    """The random order ``api.subsample(data.train, n, SEED)`` takes its first ``n`` from."""
    return torch.randperm(len(data.train), generator=torch.Generator().manual_seed(SEED))


def statistics_indices(data: Dataset, stats_samples: int | None) -> np.ndarray:
    """Indices ``[n]`` of the training images behind the statistics (all when None)."""
    if effective_samples(stats_samples, len(data.train)) is None:
        return np.arange(len(data.train))
    return _training_order(data)[:stats_samples].numpy()


def held_out_indices(data: Dataset, stats_samples: int | None) -> np.ndarray | None:
    """Indices ``[m]`` (m <= :data:`HELD_OUT_SAMPLES`) of training images outside the statistics
    sample (the next ones in its random order); None when fewer than :data:`MIN_HELD_OUT` are
    left (then callers hold out 20% of the training set with the library's own split)."""
    n = effective_samples(stats_samples, len(data.train))
    if n is None or len(data.train) - n < MIN_HELD_OUT:
        return None
    return _training_order(data)[n:n + HELD_OUT_SAMPLES].numpy()


def held_out_images(data: Dataset, stats_samples: int | None) -> DataSource | None:
    """The labelled training images of :func:`held_out_indices` (None when too few)."""
    indices = held_out_indices(data, stats_samples)
    return None if indices is None else data.train.subset(indices)


def pairs_needed(methods: Sequence[str]) -> str:
    """``"all"`` when one of ``methods`` (a joint one: zipit) needs every pair, else
    ``"reference"``."""
    return "all" if any(get_method(m).statistics == "all" for m in methods) else "reference"


def shared_statistics(models: Sequence[nn.Module], digests: Sequence[str], data: Dataset,
                      data_key: str, *, reference: int, stats_samples: int | None,
                      pairs: str = "reference", progress: Progress | None = None) -> Statistics:
    """The activation statistics of the selection: one pass over ``stats_samples`` training
    images (:data:`SEED`), kept per (model digests, dataset, samples) and shared by every page,
    method, setting and subset (:func:`pick_statistics`). Collected with every pair when asked
    for or when N <= 3 (then it costs what the reference pairs cost); such an object also serves
    any reference. For BatchNorm nets it also carries the folded BatchNorms' output moments
    (``self_only``: what the mapped reset needs, so no merge runs a pass per model for them;
    the models, hence the key, decide them). Shared and read-only; ``reference`` is set on the
    copy returned."""
    base = ("statistics", list(digests), data_key, data.name, stats_samples, SEED)
    hit = memo().get(_key(*base, "all"))
    if hit is None and pairs == "reference":
        hit = memo().get(_key(*base, "reference", reference))
    if hit is None:
        pairs = "all" if pairs == "all" or len(models) <= 3 else "reference"
        hit = _collect(models, data, reference, stats_samples, pairs, progress or _quiet)
        memo().put(_key(*base, pairs, *([] if pairs == "all" else [reference])), hit)
    return dataclasses.replace(hit, reference=reference)


def _collect(models: Sequence[nn.Module], data: Dataset, reference: int,
             stats_samples: int | None, pairs: str, progress: Progress) -> Statistics:
    models = fresh(models)
    check_fit(models, data)
    x = api.train_source(data)
    api.check_compatible(models, x, reference)
    progress(0.0, f"collecting activation statistics on "
                  f"{len(api.subsample(x, stats_samples, SEED)):,} training images")
    return collect_statistics(models, api.resolve_spec(models, x),
                              api.subsample(x, stats_samples, SEED), reference=reference,
                              pairs=pairs, self_only=moment_batchnorms(models[0], "mapped"),
                              progress=lambda f: progress(f, "collecting statistics"))


def pick_statistics(stats: Statistics, indices: Sequence[int], reference: int) -> Statistics:
    """The statistics of models ``indices`` of ``stats`` (same images), renumbered 0.., with
    ``reference`` (an index into ``indices``); the blocks they need must have been collected."""
    indices = list(indices)
    pairs = [(a, b) for a in range(len(indices)) for b in range(a, len(indices))]
    points = {name: _picked_point(p, indices, pairs) for name, p in stats.points.items()}
    self_only = {name: _picked_point(p, indices, pairs) for name, p in stats.self_only.items()}
    kind = "all" if stats.pairs == "all" or len(indices) == 2 else "reference"
    return dataclasses.replace(stats, points=points, num_models=len(indices), reference=reference,
                               pairs=kind, self_only=self_only)


def _picked_point(point: PointStatistics, indices: list[int], pairs) -> PointStatistics:
    """``point`` of models ``indices`` only, renumbered 0.. (the blocks of ``pairs`` it holds)."""
    return PointStatistics(point.name, point.width, point.count,
                           [point.mean[i] for i in indices], _picked_blocks(point, indices, pairs),
                           [point.widths[i] for i in indices])


def _picked_blocks(point: PointStatistics, indices: list[int], pairs) -> dict:
    blocks = {}
    for a, b in pairs:
        try:
            blocks[(a, b)] = point.cov(indices[a], indices[b])
        except CcamergeError:
            continue  # a pair the statistics do not hold; asking for it later says so
    return blocks


def has_statistics(digests: Sequence[str], data: Dataset, data_key: str, *, reference: int,
                   stats_samples: int | None, pairs: str = "reference") -> bool:
    """True when :func:`shared_statistics` would answer from the cache (no pass)."""
    base = ("statistics", list(digests), data_key, data.name, stats_samples, SEED)
    return memo().get(_key(*base, "all")) is not None or (
        pairs == "reference" and memo().get(_key(*base, "reference", reference)) is not None)


PROBE_IMAGES = 64


@cached(lambda: memo())
def seconds_per_image(digest: str, data_key: str, _model: nn.Module, _data: Dataset) -> float:
    """Seconds one forward pass of the model takes per training image (timed on
    :data:`PROBE_IMAGES` of them after one warm-up batch), for the estimates before long work."""
    model = fast([_model])[0].eval()
    x = api.train_source(_data).head(PROBE_IMAGES)
    with torch.no_grad():
        model(x[:8])
        start = time.perf_counter()
        model(x)
    return (time.perf_counter() - start) / len(x)


def statistics(digests: tuple[str, ...], data_key: str, reference: int, stats_samples: int | None,
               _models: Sequence[nn.Module], _data: Dataset, *,
               pairs: str = "reference") -> Statistics:
    """:func:`shared_statistics` of the selection with its reference (each model's moments and
    its cross-covariance with the reference, at least; every pair with ``pairs="all"``)."""
    return shared_statistics(_models, digests, _data, data_key, reference=reference,
                             stats_samples=stats_samples, pairs=pairs)


def split_statistics(digests: tuple[str, ...], data_key: str, reference: int,
                     stats_samples: int | None, _models: Sequence[nn.Module],
                     _data: Dataset, *,
                     pairs: str = "reference") -> tuple[Statistics, Statistics | None]:
    """Statistics to fit on and statistics of held-out images: the shared statistics (with
    ``pairs``) and, in a pass of their own, :func:`held_out_images`; with all training images
    in the statistics (or too few left), a random 80% and the held-out 20%
    (``api.split_statistics``). The held-out ones always hold every pair."""
    held = held_out_images(_data, stats_samples)
    if held is None:
        fit, rest = _split_all(digests, data_key, _models, _data)
    else:
        fit = statistics(digests, data_key, reference, stats_samples, _models, _data,
                         pairs=pairs)
        rest = _held_out_statistics(digests, data_key, stats_samples, _models, _data)
    return fit, rest if rest is None else dataclasses.replace(rest, reference=reference)


@cached(lambda: memo(), share=True)
def _held_out_statistics(digests: tuple[str, ...], data_key: str, stats_samples: int | None,
                         _models: Sequence[nn.Module], _data: Dataset) -> Statistics:
    models = fresh(_models)
    x = api.train_source(_data)
    return collect_statistics(models, api.resolve_spec(models, x),
                              held_out_images(_data, stats_samples), pairs="all")


@cached(lambda: memo(), share=True)
def _split_all(digests: tuple[str, ...], data_key: str, _models: Sequence[nn.Module],
               _data: Dataset) -> tuple[Statistics, Statistics | None]:
    models = fresh(_models)
    check_fit(models, _data)
    return api.split_statistics(models, _data, seed=SEED, pairs="all")


@cached(lambda: memo())
def held_out_spectrum(digests: tuple[str, ...], data_key: str, reference: int, gamma: float,
                      relative: bool, stats_samples: int | None, _models: Sequence[nn.Module],
                      _data: Dataset) -> list[dict]:
    """``ccamerge.analysis.spectra.spectrum_rows``: CCA fitted on the statistics images, the
    correlations its pairs reach there and on held-out training images
    (:func:`split_statistics`), beside the shrunk singular values and the matched unit pairs."""
    fit, held = split_statistics(digests, data_key, reference, stats_samples, _models, _data)
    return spectra.spectrum_rows(fit, held, gamma=gamma, relative=relative)


@cached(lambda: memo())
def held_out_shared_spectrum(digests: tuple[str, ...], data_key: str, gamma: float,
                             relative: bool, stats_samples: int | None,
                             _models: Sequence[nn.Module], _data: Dataset) -> list[dict]:
    """``ccamerge.analysis.shared.shared_spectrum_rows``: gcca's shared space of all the
    selected models per merge point, fitted on the shared statistics (every pair: for N > 3 an
    own pass the first time, then shared with every page) and measured there and on the
    held-out images of :func:`split_statistics`."""
    fit, held = split_statistics(digests, data_key, 0, stats_samples, _models, _data, pairs="all")
    return shared.shared_spectrum_rows(fit, held, gamma=gamma, relative=relative)


@cached(lambda: memo())
def held_out_alignment(digests: tuple[str, ...], data_key: str, reference: int, other: int,
                       point: str, gamma: float, relative: bool, stats_samples: int | None,
                       _models: Sequence[nn.Module], _data: Dataset) -> AlignedUnits:
    """How closely CCA's map and the Hungarian match (fitted on the statistics images)
    reproduce the reference's units at ``point`` on held-out training images
    (:func:`split_statistics`)."""
    fit, held = split_statistics(digests, data_key, reference, stats_samples, _models, _data)
    if point not in fit.points:
        raise CcamergeError(f"no merge point {point!r}; the models have {list(fit.points)}")
    return aligned_units(fit[point], None if held is None else held[point], reference, other,
                         gamma=gamma, relative=relative)


@cached(lambda: memo())
def partial_merges(digests: tuple[str, ...], data_key: str, method: str, options: dict,
                   bn_reset: bool, stats_samples: int | None, test_samples: int | None,
                   _pair: Sequence[nn.Module], _data: Dataset,
                   _statistics: Statistics | None = None) -> dict:
    """``ccamerge.analysis.compare.partial_merges`` of the reference (first) and one model on
    ``_statistics`` of the pair (the shared ones, :func:`pick_statistics`), scored on
    ``test_samples`` test images: ``{"method", "points", "accuracy", "loss"}``."""
    check_fit(_pair, _data)
    pair = fast(_pair)
    aligned = api.align(pair, _data, method, stats_samples=stats_samples, seed=SEED,
                        statistics=_statistics, **resolve_options(method, options))
    merged = average_states(api.aligned_states(pair, aligned))
    rows = partial_curve(pair[0], merged, aligned.spec, scored(_data, test_samples), bn_reset)
    return {"method": method, "points": aligned.spec.names,
            "accuracy": [r["accuracy"] for r in rows], "loss": [r["loss"] for r in rows]}


@cached(lambda: memo())
def features(digests: tuple[str, ...], data_key: str, reference: int, other: int, point: str,
             gamma: float, relative: bool, stats_samples: int | None, _models: Sequence[nn.Module],
             _data: Dataset) -> FeatureMatching:
    """Feature matching between the reference and model ``other`` at merge point ``point``."""
    stats = statistics(digests, data_key, reference, stats_samples, _models, _data)
    if point not in stats.points:
        raise CcamergeError(f"no merge point {point!r}; the models have {list(stats.points)}")
    return feature_matching(stats[point], reference, other, gamma=gamma, relative=relative)


@cached(lambda: memo())
def base_scores(digests: tuple[str, ...], data_key: str, bn_reset: bool,
                test_samples: int | None, _models: Sequence[nn.Module], _data: Dataset) -> dict:
    """``{"models": [{"accuracy", "loss"}], "ensemble": {...}}`` on ``test_samples`` test images
    (:func:`scored`), one pass per model; BatchNorm statistics recomputed on the training images
    when ``bn_reset`` (as merged models get)."""
    models = fast(_models)
    check_fit(models, _data)
    train, test = api.train_source(_data), api.score_source(scored(_data, test_samples))
    if not bn_reset and has_batchnorm(models[0]):
        return {"models": [evaluate_model(m, test) for m in models],
                "ensemble": evaluate_ensemble(models, test)}
    scores, _classes, ensemble = diagnose_base_scores(models, train, test)
    return {"models": scores, "ensemble": ensemble}


# ----------------------------------------------------------------------------- merges, curves
@st.cache_resource(show_spinner=False)
def memo() -> Memo:
    """The cache of computed results (statistics, spectra, merges, curves, diagnoses)."""
    return Memo(RESULT_CACHE_BYTES)


@st.cache_resource(show_spinner=False)
def model_memo() -> Memo:
    """The cache of loaded networks (model files and replayed archives)."""
    return Memo(MODEL_CACHE_BYTES)


def resolve_options(method: str, options: dict) -> dict:
    """The method's options with defaults filled in (the registry validates them)."""
    return get_method(method).resolve(options)


def reads_own_statistics(reset_base_bn: bool, stream_points: str) -> bool:
    """Whether a merge with these options needs a statistics pass of its own instead of the
    shared one: a base-model BatchNorm reset changes the models, last-block stream points read
    other features."""
    return reset_base_bn or stream_points != "pooled"


def merge(models: Sequence[nn.Module], digests: Sequence[str], data: Dataset, data_key: str,
          method: str, options: dict, *, reference: int, bn_reset: bool, repair: bool = False,
          bn_policy: str = BN_DEFAULT, reset_base_bn: bool = False, stream_points: str = "pooled",
          stats_samples: int | None, test_samples: int | None = None,
          statistics: Statistics | None = None, sources: Sequence[str] | None = None,
          progress: Progress | None = None, target_width: float | None = None) -> dict:
    """Merge ``models`` (content ``digests``, files ``sources``) with ``method`` on
    ``statistics`` (of these models, collected on ``stats_samples`` training images; default:
    :func:`shared_statistics`, except for the options that read other statistics: last-block
    stream points, base-model BatchNorm reset), scored on ``test_samples`` test images; cached
    by content, files and options. ``target_width``: see :func:`ccamerge.api.merge`.

    Returns ``{"method", "options", "accuracy", "loss", "seconds", "warnings", "model",
    "recipe"}`` where ``model`` is the merged network (shared: copy before changing it),
    ``recipe`` is ``api.merge``'s (shared: copy before adding to it) and ``seconds`` the time
    the merge took when it was computed.
    """
    options = resolve_options(method, options)
    sources = None if sources is None else [str(s) for s in sources]
    key = _key("merge", list(digests), data_key, data.name, method, options, reference, bn_reset,
               repair, bn_policy, reset_base_bn, stream_points, stats_samples, test_samples,
               sources, target_width)
    hit = memo().get(key)
    if hit is not None:
        return hit
    check_fit(models, data)
    progress = progress or _quiet
    if (statistics is None and get_method(method).statistics
            and not reads_own_statistics(reset_base_bn, stream_points)):
        statistics = shared_statistics(models, digests, data, data_key, reference=reference,
                                       stats_samples=stats_samples, progress=progress,
                                       pairs=pairs_needed([method]))
    start = time.perf_counter()
    # weights that depend on forward passes (BatchNorm reset, REPAIR) are computed in the
    # standard layout, as ``ccamerge replay`` does, so that the download replays bit for bit
    copies = fresh(models) if repair or (bn_reset and has_batchnorm(models[0])) else fast(models)
    result = api.merge(copies, data, method, reference=reference, bn_reset=bn_reset,
                       repair=repair, bn_policy=bn_policy, reset_base_bn=reset_base_bn,
                       stream_points=stream_points, stats_samples=stats_samples,
                       seed=SEED, sources=sources, statistics=statistics, progress=progress,
                       target_width=target_width, **options)
    seconds = time.perf_counter() - start
    scores = evaluate_model(result.model, api.score_source(scored(data, test_samples)))
    out = {"method": method, "options": options, "accuracy": scores["accuracy"],
           "loss": scores["loss"], "seconds": seconds, "warnings": list(result.warnings),
           "model": result.model, "recipe": result.recipe}
    if not memo().put(key, out):
        out["warnings"].append(f"this merge holds more than the dashboard's result cache "
                               f"({RESULT_CACHE_BYTES / 2**30:g} GB) and is not kept; it is "
                               "recomputed when asked for again")
    return out


def held_out_score(models: Sequence[nn.Module], digests: Sequence[str], data: Dataset,
                   data_key: str, method: str, options: dict, *, reference: int, bn_reset: bool,
                   stats_samples: int | None, statistics: Statistics | None = None,
                   bn_policy: str = BN_DEFAULT) -> dict:
    """The merge with ``method`` and ``options`` scored on training images the statistics did
    not see (:func:`held_out_images`), merged from the shared ``statistics``: the diagnosis sweep
    with one setting, so that merges are ranked without the test set. Without such images (all
    of them in the statistics), the merge is redone on 80% and scored on the other 20%.
    ``{"accuracy", "loss", "selected_on"}`` (``selected_on`` names the images); cached."""
    options = resolve_options(method, options)
    key = _key("held_out", list(digests), data_key, data.name, method, options, reference,
               bn_reset, stats_samples, bn_policy)
    hit = memo().get(key)
    if hit is None:
        out = _held_out_sweep(models, digests, data, data_key, method, [options], None,
                              reference=reference, bn_reset=bn_reset, stats_samples=stats_samples,
                              statistics=statistics, bn_policy=bn_policy)
        hit = {"accuracy": out["accuracy"][0], "loss": out["loss"][0],
               "selected_on": out["selected_on"]}
        memo().put(key, hit)
    return hit


def _held_out_sweep(models: Sequence[nn.Module], digests: Sequence[str], data: Dataset,
                    data_key: str, method: str, grid: list[dict] | None, current: dict | None, *,
                    reference: int, bn_reset: bool, stats_samples: int | None,
                    statistics: Statistics | None = None, progress: Progress | None = None,
                    bn_policy: str = BN_DEFAULT) -> dict:
    """``diagnose.sweep`` on the held-out images outside the shared statistics (no pass of its
    own), or on the library's 80/20 split when there are none."""
    check_fit(models, data)
    held = held_out_images(data, stats_samples)
    common = dict(grid=grid, reference=reference, bn_reset=bn_reset, stats_samples=stats_samples,
                  seed=SEED, current=current, progress=progress, bn_policy=bn_policy)
    if held is None:
        return sweep(fast(models), data, method, **common)
    if statistics is None:
        statistics = shared_statistics(models, digests, data, data_key, reference=reference,
                                       stats_samples=stats_samples, pairs=pairs_needed([method]),
                                       progress=progress)
    out = sweep(fast(models), data, method, validation=held, statistics=statistics, **common)
    out["selected_on"] = (f"{len(held):,} training images outside the {stats_samples:,} behind "
                          "the statistics")
    return out


def interpolation(pair: Sequence[nn.Module], digests: Sequence[str], data: Dataset, data_key: str,
                  method: str, *, steps: int, bn_reset: bool, stats_samples: int | None,
                  test_samples: int | None = None, options: dict | None = None,
                  statistics: Statistics | None = None, progress: Progress | None = None) -> dict:
    """``api.interpolate`` between ``pair`` with the method's ``options`` (defaults filled in)
    on ``statistics`` of the pair (A first; default: :func:`shared_statistics`), scored on
    ``test_samples`` test images; cached by content and options: ``{"method", "lambdas",
    "accuracy", "loss", "barrier"}``."""
    options = resolve_options(method, options or {})
    key = _key("interpolate", list(digests), data_key, method, steps, bn_reset, stats_samples,
               test_samples, options)
    hit = memo().get(key)
    if hit is not None:
        return hit
    check_fit(pair, data)
    progress = progress or _quiet
    if statistics is None and get_method(method).statistics:
        statistics = shared_statistics(pair, digests, data, data_key, reference=0,
                                       stats_samples=stats_samples, pairs="all", progress=progress)
    a, b = fast(pair)
    curve = api.interpolate(a, b, scored(data, test_samples), method, steps=steps,
                            bn_reset=bn_reset, stats_samples=stats_samples, seed=SEED,
                            statistics=statistics, progress=progress, **options)
    memo().put(key, curve)
    return curve


def _quiet(_fraction: float, _message: str) -> None:
    pass


def merged_file(model: nn.Module, info: dict, *, reference: nn.Module) -> bytes:
    """The bytes of :func:`ccamerge.io.save_merged`'s file: ``.safetensors`` (architecture and
    ``info`` in the metadata), or a TorchScript archive when the (loaded, not copied)
    ``reference`` is one."""
    suffix = ".pt" if is_archive_model(reference) else ".safetensors"
    with tempfile.TemporaryDirectory(prefix="ccamerge-") as folder:
        return save_merged(model, reference, Path(folder) / f"merged{suffix}", info).read_bytes()


@cached(lambda: memo())
def largest_target_width(digests: tuple[str, ...], data_key: str, reference: int,
                         _models: Sequence[nn.Module], _data: Dataset) -> float:
    """The largest ``target_width`` of traced models (a fraction of the reference's widths:
    :func:`ccamerge.target.largest_fraction`), once per selection, reference and dataset."""
    spec, rows = target.traced_widths(fresh(_models), reference, _data)
    return target.largest_fraction(spec, rows)


# --------------------------------------------------------------------------- archives, merge points
@cached(lambda: model_memo(), share=True)
def _load_archive(digest: str, filename: str, example_key: str, _read: Callable[[], bytes],
                  _example: torch.Tensor) -> nn.Module:
    return archives.load(_read(), filename, _example)


def load_archive(digest: str, filename: str, read: Callable[[], bytes],
                 example: torch.Tensor) -> nn.Module:
    """A trusted TorchScript archive replayed on ``example`` images ``[B, C, S, S]``, once per
    content and input shape. Shared and read-only: compute on :func:`fresh` copies."""
    return _load_archive(digest, filename, str(list(example.shape)), read, example)


@cached(lambda: memo())
def merge_points(digest: str, data_key: str, samples: int, _model: nn.Module,
                 _data: Dataset) -> dict:
    """``explain(derive_and_verify(model, first samples training images))`` (merge points,
    verification, unsupported operations, unmerged groups, notes, DOT and Mermaid diagrams)
    plus ``matches_hand_written`` (None outside the built-in families), ``hand_written_names``
    (traced point -> the hand-written spec's name for it) and ``seconds``."""
    check_fit([_model], _data)
    start = time.perf_counter()
    derived = derive_and_verify(fresh([_model])[0], api.train_inputs(_data)[:samples])
    report = explain(derived)
    report["notes"] = [*getattr(_model, "replay_notes", []), *report["notes"]]
    report["matches_hand_written"], report["hand_written_names"] = None, {}
    if api.is_builtin(_model):
        written = build_spec(_model)
        report["matches_hand_written"] = same_points(derived.spec, written)
        report["hand_written_names"] = matching_names(derived.spec, written)
    report["seconds"] = time.perf_counter() - start
    return report


# ------------------------------------------------------------------- diagnosis, explorer, teaching
def diagnosis(models: Sequence[nn.Module], digests: Sequence[str], data: Dataset, data_key: str,
              method: str, options: dict, *, reference: int, bn_reset: bool,
              stats_samples: int | None, test_samples: int | None = None,
              progress: Progress | None = None) -> dict:
    """``ccamerge.analysis.diagnose.diagnose`` report (without the sweep: :func:`diagnosis_sweep`
    adds it) on the shared statistics, scored on ``test_samples`` test images, plus
    ``seconds``; cached by content and options in the process-wide :class:`Memo`, so it survives
    page switches and is shared by sessions with the same files."""
    options = resolve_options(method, options)
    key = _key("diagnose", list(digests), data_key, method, options, reference, bn_reset,
               stats_samples, test_samples)
    hit = memo().get(key)
    if hit is not None:
        return hit
    check_fit(models, data)
    progress = progress or _quiet
    start = time.perf_counter()
    stats = shared_statistics(models, digests, data, data_key, reference=reference,
                              stats_samples=stats_samples, pairs=pairs_needed([method]),
                              progress=lambda f, m: progress(0.3 * f, m))
    report = diagnose(fast(models), scored(data, test_samples), method, reference=reference,
                      bn_reset=bn_reset, stats_samples=stats_samples, seed=SEED,
                      statistics=stats, progress=lambda f, m: progress(0.3 + 0.7 * f, m),
                      **options)
    report["seconds"] = time.perf_counter() - start
    memo().put(key, report)
    return report


def diagnosis_sweep(models: Sequence[nn.Module], digests: Sequence[str], data: Dataset,
                    data_key: str, report: dict, *, stats_samples: int | None,
                    progress: Progress | None = None) -> dict:
    """``report`` (a :func:`diagnosis`) with the hyperparameter ``sweep`` of its method around
    its options (held-out training images outside the shared statistics, no pass of its own)
    and the checklist redone with it; the diagnosis itself is not run again. Cached."""
    key = _key("sweep", list(digests), data_key, report["method"], report["options"],
               report["reference"], report["bn_reset"], stats_samples)
    result = memo().get(key)
    if result is None:
        start = time.perf_counter()
        result = _held_out_sweep(models, digests, data, data_key, report["method"], None,
                                 report["options"], reference=report["reference"],
                                 bn_reset=report["bn_reset"], stats_samples=stats_samples,
                                 progress=progress)
        result["seconds"] = time.perf_counter() - start
        memo().put(key, result)
    out = {**report, "sweep": result}
    out["findings"] = findings_for(out)
    out["healthy"] = not any(f["severity"] == "failure" for f in out["findings"])
    return out


@cached(lambda: memo(), share=True)
def _explored(digests: tuple[str, ...], data_key: str, method: str, reference: int, other: int,
              bn_reset: bool, stats_samples: int | None, _models: Sequence[nn.Module],
              _data: Dataset):
    """Model ``other`` aligned to the reference with ``method`` (default options) on the shared
    statistics, the merged model and the spec (shared and read-only)."""
    check_fit(_models, _data)
    stats = None
    if get_method(method).statistics:
        stats = shared_statistics(_models, digests, _data, data_key, reference=reference,
                                  stats_samples=stats_samples, pairs=pairs_needed([method]))
    return explorer.aligned_and_merged(fresh(_models), _data, method, reference=reference,
                                       other=other, bn_reset=bn_reset, seed=SEED,
                                       stats_samples=stats_samples, statistics=stats)


@cached(lambda: memo())
def unit_set(digests: tuple[str, ...], data_key: str, method: str, reference: int, other: int,
             point: str, samples: int, bn_reset: bool, stats_samples: int | None,
             _models: Sequence[nn.Module], _data: Dataset) -> explorer.UnitSet:
    """Profiles of the reference's, model ``other``'s, its aligned copy's and the merged model's
    units at ``point`` over ``samples`` test images."""
    moved, merged, spec = _explored(digests, data_key, method, reference, other, bn_reset,
                                    stats_samples, _models, _data)
    x, _ = explorer.sample_inputs(_data, samples, SEED)
    ref, mod, moved, merged = fresh([_models[reference], _models[other], moved, merged])
    return explorer.unit_set(ref, mod, moved, merged, spec, x, point)


@cached(lambda: memo())
def unit_embedding(digests: tuple[str, ...], data_key: str, method: str, reference: int,
                   other: int, point: str, samples: int, bn_reset: bool,
                   stats_samples: int | None, embedding: str, _models: Sequence[nn.Module],
                   _data: Dataset):
    """``[4n, 2]`` coordinates of :func:`unit_set`'s units (``embedding``: pca or umap)."""
    units = unit_set(digests, data_key, method, reference, other, point, samples, bn_reset,
                     stats_samples, _models, _data)
    return explorer.embed_units(units.profiles, embedding, seed=SEED)


@cached(lambda: memo())
def input_embeddings(digests: tuple[str, ...], data_key: str, method: str, reference: int,
                     other: int, point: str, samples: int, bn_reset: bool,
                     stats_samples: int | None, embedding: str, _models: Sequence[nn.Module],
                     _data: Dataset) -> dict[str, explorer.InputEmbedding]:
    """Test images embedded by each group's representation at ``point`` (group -> embedding)."""
    moved, merged, spec = _explored(digests, data_key, method, reference, other, bn_reset,
                                    stats_samples, _models, _data)
    x, y = explorer.sample_inputs(_data, samples, SEED)
    nets = fresh([_models[reference], _models[other], moved, merged])
    return {group: explorer.embed_inputs(explorer.point_features(net, spec, x, point,
                                                                 pool="flatten"),
                                         y, embedding, seed=SEED)
            for group, net in zip(explorer.GROUPS, nets, strict=True)}


@cached(lambda: memo())
def swap_demo(digest: str, data_key: str, stats_samples: int | None, test_samples: int | None,
              _model: nn.Module, _data: Dataset) -> dict:
    """``ccamerge.analysis.teach.swap_demo`` on one model, matched on ``stats_samples``
    training images and scored on ``test_samples`` test images."""
    check_fit([_model], _data)
    sampled = scored(_data, test_samples)
    if effective_samples(stats_samples, len(_data.train)) is not None:
        sampled = Dataset(_data.name, _data.train.take(stats_samples, SEED), sampled.test,
                          _data.num_classes, _data.mean, _data.std)
    return teach.swap_demo(fast([_model])[0], sampled, seed=SEED)


@cached(lambda: memo())
def cca_steps(digests: tuple[str, ...], data_key: str, reference: int, other: int, point: str,
              gamma: float, relative: bool, stats_samples: int | None,
              _models: Sequence[nn.Module], _data: Dataset) -> teach.CCASteps:
    """The CCA solve between the reference and model ``other`` at ``point``, step by step."""
    stats = statistics(digests, data_key, reference, stats_samples, _models, _data)
    if point not in stats.points:
        raise CcamergeError(f"no merge point {point!r}; the models have {list(stats.points)}")
    return teach.cca_steps(stats[point], reference, other, gamma=gamma, relative=relative)
