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

Uploads: at most :data:`MAX_UPLOAD_BYTES` per file and, per session, :data:`SESSION_UPLOAD_BYTES`
in :data:`SESSION_UPLOAD_FILES` files (see :mod:`dashboard.registry`).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
import torch
from torch import nn

from ccamerge import api
from ccamerge.analysis import compare, explorer, spectra, teach
from ccamerge.analysis.diagnose import diagnose, sweep
from ccamerge.analysis.features import (
    AlignedUnits,
    FeatureMatching,
    aligned_units,
    feature_matching,
)
from ccamerge.data import Dataset, load_dataset
from ccamerge.errors import CcamergeError
from ccamerge.evaluate import evaluate_ensemble, evaluate_model, with_bn_reset
from ccamerge.files import check_output_path
from ccamerge.io import is_archive_model, load_model_bytes, save_merged
from ccamerge.methods import get_method
from ccamerge.models import build_model, check_input_fit
from ccamerge.spec import build_spec, matching_names, same_points
from ccamerge.stats import Statistics, collect_statistics
from ccamerge.trace.derive import derive_and_verify
from ccamerge.trace.explain import explain
from ccamerge.train import default_config, train_zoo, zoo_filename
from ccamerge.transform import has_batchnorm
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
    return [demo_dir() / zoo_filename(g.arch, g.width, g.split, s) for g in DEMO_ZOO for s in g.seeds]


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
                    progress((done + fraction * len(group.seeds)) / total, f"{group.arch}: {message}")
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


@cached(lambda: memo())
def statistics(digests: tuple[str, ...], data_key: str, reference: int, stats_samples: int | None,
               _models: Sequence[nn.Module], _data: Dataset) -> Statistics:
    """Activation statistics of every merge point: each model's moments and its cross-covariance
    with the reference (one pass over the training images)."""
    models = fresh(_models)
    check_fit(models, _data)
    x = api.train_inputs(_data)
    api.check_compatible(models, x, reference)
    return collect_statistics(models, api.resolve_spec(models, x),
                              api.subsample(x, stats_samples, SEED), reference=reference)


@cached(lambda: memo())
def spectrum(digests: tuple[str, ...], data_key: str, reference: int, gamma: float, relative: bool,
             stats_samples: int | None, _models: Sequence[nn.Module], _data: Dataset) -> list[dict]:
    """``api.spectrum`` rows (per merge point and non-reference model) on cached statistics."""
    stats = statistics(digests, data_key, reference, stats_samples, _models, _data)
    return api.spectrum(fresh(_models), _data, reference=reference, gamma=gamma, relative=relative,
                        stats_samples=stats_samples, seed=SEED, statistics=stats)


@cached(lambda: memo())
def split_statistics(digests: tuple[str, ...], data_key: str, reference: int,
                     _models: Sequence[nn.Module],
                     _data: Dataset) -> tuple[Statistics, Statistics | None]:
    """Statistics on a random 80% of the training images and, in a separate pass, on the
    held-out 20% (``ccamerge.analysis.spectra.split_statistics``; None when too few)."""
    models = fresh(_models)
    check_fit(models, _data)
    x = api.train_inputs(_data)
    api.check_compatible(models, x, reference)
    return spectra.split_statistics(models, api.resolve_spec(models, x), x, reference=reference,
                                    holdout=spectra.HOLDOUT, seed=SEED)


@cached(lambda: memo())
def held_out_spectrum(digests: tuple[str, ...], data_key: str, reference: int, gamma: float,
                      relative: bool, _models: Sequence[nn.Module], _data: Dataset) -> list[dict]:
    """``ccamerge.analysis.spectra.spectrum_rows``: CCA fitted on 80% of the training images,
    the correlations its pairs reach there and on the held-out 20%, beside the shrunk
    singular values and the matched unit pairs."""
    fit, held = split_statistics(digests, data_key, reference, _models, _data)
    return spectra.spectrum_rows(fit, held, gamma=gamma, relative=relative)


@cached(lambda: memo())
def held_out_alignment(digests: tuple[str, ...], data_key: str, reference: int, other: int,
                       point: str, gamma: float, relative: bool, _models: Sequence[nn.Module],
                       _data: Dataset) -> AlignedUnits:
    """How closely CCA's map and the Hungarian match (fitted on 80% of the training images)
    reproduce the reference's units at ``point`` on the held-out 20%."""
    fit, held = split_statistics(digests, data_key, reference, _models, _data)
    if point not in fit.points:
        raise CcamergeError(f"no merge point {point!r}; the models have {list(fit.points)}")
    return aligned_units(fit[point], None if held is None else held[point], reference, other,
                         gamma=gamma, relative=relative)


@cached(lambda: memo())
def partial_merges(digests: tuple[str, ...], data_key: str, method: str, options: dict,
                   bn_reset: bool, _pair: Sequence[nn.Module], _data: Dataset) -> dict:
    """``ccamerge.analysis.compare.partial_merges`` of the reference (first) and one model."""
    check_fit(_pair, _data)
    return compare.partial_merges(fresh(_pair), _data, method, bn_reset=bn_reset, seed=SEED,
                                  **resolve_options(method, options))


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
                _models: Sequence[nn.Module], _data: Dataset) -> dict:
    """``{"models": [{"accuracy", "loss"}], "ensemble": {...}}`` on the test set; BatchNorm
    statistics recomputed on the training images when ``bn_reset`` (as merged models get)."""
    models = fresh(_models)
    check_fit(models, _data)
    if bn_reset:
        models = [with_bn_reset(m, _data.x_train) for m in models]
    return {"models": [evaluate_model(m, _data.x_test, _data.y_test) for m in models],
            "ensemble": evaluate_ensemble(models, _data.x_test, _data.y_test)}


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


def merge(models: Sequence[nn.Module], digests: Sequence[str], data: Dataset, data_key: str,
          method: str, options: dict, *, reference: int, bn_reset: bool, repair: bool = False,
          bn_policy: str = "paper", reset_base_bn: bool = False, stream_points: str = "pooled",
          stats_samples: int | None, sources: Sequence[str] | None = None,
          progress: Progress | None = None) -> dict:
    """Merge ``models`` (content ``digests``, files ``sources``) with ``method``; cached by
    content, files and options.

    Returns ``{"method", "options", "accuracy", "loss", "seconds", "warnings", "model",
    "recipe"}`` where ``model`` is the merged network (shared: copy before changing it),
    ``recipe`` is ``api.merge``'s (shared: copy before adding to it) and ``seconds`` the time
    the merge took when it was computed.
    """
    options = resolve_options(method, options)
    sources = None if sources is None else [str(s) for s in sources]
    key = _key("merge", list(digests), data_key, data.name, method, options, reference, bn_reset,
               repair, bn_policy, reset_base_bn, stream_points, stats_samples, sources)
    hit = memo().get(key)
    if hit is not None:
        return hit
    check_fit(models, data)
    start = time.perf_counter()
    result = api.merge(fresh(models), data, method, reference=reference, bn_reset=bn_reset,
                       repair=repair, bn_policy=bn_policy, reset_base_bn=reset_base_bn,
                       stream_points=stream_points, stats_samples=stats_samples,
                       seed=SEED, sources=sources, progress=progress or _quiet, **options)
    seconds = time.perf_counter() - start
    scores = evaluate_model(result.model, data.x_test, data.y_test)
    out = {"method": method, "options": options, "accuracy": scores["accuracy"],
           "loss": scores["loss"], "seconds": seconds, "warnings": list(result.warnings),
           "model": result.model, "recipe": result.recipe}
    if not memo().put(key, out):
        out["warnings"].append(f"this merge holds more than the dashboard's result cache "
                               f"({RESULT_CACHE_BYTES / 2**30:g} GB) and is not kept; it is "
                               "recomputed when asked for again")
    return out


@st.cache_data(max_entries=128, show_spinner=False)
def held_out_score(digests: tuple[str, ...], data_key: str, method: str, options: dict,
                   reference: int, bn_reset: bool, stats_samples: int | None,
                   _models: Sequence[nn.Module], _data: Dataset) -> dict:
    """The merge with ``method`` and ``options`` scored on a held-out 20% of the training
    images, merged (statistics, BatchNorm reset) from the other 80%: the diagnosis sweep with
    one setting, so that merges are ranked without the test set. ``{"accuracy", "loss",
    "selected_on"}`` (``selected_on`` names the images)."""
    check_fit(_models, _data)
    out = sweep(fresh(_models), _data, method, grid=[resolve_options(method, options)],
                reference=reference, bn_reset=bn_reset, stats_samples=stats_samples, seed=SEED)
    return {"accuracy": out["accuracy"][0], "loss": out["loss"][0],
            "selected_on": out["selected_on"]}


def interpolation(pair: Sequence[nn.Module], digests: Sequence[str], data: Dataset, data_key: str,
                  method: str, *, steps: int, bn_reset: bool, stats_samples: int | None,
                  options: dict | None = None, progress: Progress | None = None) -> dict:
    """``api.interpolate`` between ``pair`` with the method's ``options`` (defaults filled in),
    cached by content and options: ``{"method", "lambdas", "accuracy", "loss", "barrier"}``."""
    options = resolve_options(method, options or {})
    key = _key("interpolate", list(digests), data_key, method, steps, bn_reset, stats_samples,
               options)
    hit = memo().get(key)
    if hit is not None:
        return hit
    check_fit(pair, data)
    a, b = fresh(pair)
    curve = api.interpolate(a, b, data, method, steps=steps, bn_reset=bn_reset,
                            stats_samples=stats_samples, seed=SEED, progress=progress or _quiet,
                            **options)
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


# ----------------------------------------------------------------------------- archives, merge points
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


# ----------------------------------------------------------------------------- diagnosis, explorer, teaching
def diagnosis(models: Sequence[nn.Module], digests: Sequence[str], data: Dataset, data_key: str,
              method: str, options: dict, *, reference: int, bn_reset: bool,
              stats_samples: int | None, with_sweep: bool,
              progress: Progress | None = None) -> dict:
    """``ccamerge.analysis.diagnose.diagnose`` report plus ``seconds``; cached by content and options in
    the process-wide :class:`Memo` (it reports progress while it runs), so it survives page
    switches and is shared by sessions with the same files."""
    options = resolve_options(method, options)
    key = _key("diagnose", list(digests), data_key, method, options, reference, bn_reset,
               stats_samples, with_sweep)
    hit = memo().get(key)
    if hit is not None:
        return hit
    check_fit(models, data)
    start = time.perf_counter()
    report = diagnose(fresh(models), data, method, reference=reference, bn_reset=bn_reset,
                      stats_samples=stats_samples, seed=SEED, with_sweep=with_sweep,
                      progress=progress or _quiet, **options)
    report["seconds"] = time.perf_counter() - start
    memo().put(key, report)
    return report


@cached(lambda: memo(), share=True)
def _explored(digests: tuple[str, ...], data_key: str, method: str, reference: int, other: int,
              bn_reset: bool, _models: Sequence[nn.Module], _data: Dataset):
    """Model ``other`` aligned to the reference with ``method`` (default options), the merged
    model and the spec (shared and read-only)."""
    check_fit(_models, _data)
    return explorer.aligned_and_merged(fresh(_models), _data, method, reference=reference,
                                       other=other, bn_reset=bn_reset, seed=SEED)


@cached(lambda: memo())
def unit_set(digests: tuple[str, ...], data_key: str, method: str, reference: int, other: int,
             point: str, samples: int, bn_reset: bool, _models: Sequence[nn.Module],
             _data: Dataset) -> explorer.UnitSet:
    """Profiles of the reference's, model ``other``'s, its aligned copy's and the merged model's
    units at ``point`` over ``samples`` test images."""
    moved, merged, spec = _explored(digests, data_key, method, reference, other, bn_reset,
                                    _models, _data)
    x, _ = explorer.sample_inputs(_data, samples, SEED)
    ref, mod, moved, merged = fresh([_models[reference], _models[other], moved, merged])
    return explorer.unit_set(ref, mod, moved, merged, spec, x, point)


@cached(lambda: memo())
def unit_embedding(digests: tuple[str, ...], data_key: str, method: str, reference: int,
                   other: int, point: str, samples: int, bn_reset: bool, embedding: str,
                   _models: Sequence[nn.Module], _data: Dataset):
    """``[4n, 2]`` coordinates of :func:`unit_set`'s units (``embedding``: pca or umap)."""
    units = unit_set(digests, data_key, method, reference, other, point, samples, bn_reset,
                     _models, _data)
    return explorer.embed_units(units.profiles, embedding, seed=SEED)


@cached(lambda: memo())
def input_embeddings(digests: tuple[str, ...], data_key: str, method: str, reference: int,
                     other: int, point: str, samples: int, bn_reset: bool, embedding: str,
                     _models: Sequence[nn.Module],
                     _data: Dataset) -> dict[str, explorer.InputEmbedding]:
    """Test images embedded by each group's representation at ``point`` (group -> embedding)."""
    moved, merged, spec = _explored(digests, data_key, method, reference, other, bn_reset,
                                    _models, _data)
    x, y = explorer.sample_inputs(_data, samples, SEED)
    nets = fresh([_models[reference], _models[other], moved, merged])
    return {group: explorer.embed_inputs(explorer.point_features(net, spec, x, point, pool="flatten"),
                                         y, embedding, seed=SEED)
            for group, net in zip(explorer.GROUPS, nets, strict=True)}


@cached(lambda: memo())
def swap_demo(digest: str, data_key: str, _model: nn.Module, _data: Dataset) -> dict:
    """``ccamerge.analysis.teach.swap_demo`` on one model."""
    check_fit([_model], _data)
    return teach.swap_demo(fresh([_model])[0], _data, seed=SEED)


@cached(lambda: memo())
def cca_steps(digests: tuple[str, ...], data_key: str, reference: int, other: int, point: str,
              gamma: float, relative: bool, _models: Sequence[nn.Module],
              _data: Dataset) -> teach.CCASteps:
    """The CCA solve between the reference and model ``other`` at ``point``, step by step."""
    stats = statistics(digests, data_key, reference, None, _models, _data)
    if point not in stats.points:
        raise CcamergeError(f"no merge point {point!r}; the models have {list(stats.points)}")
    return teach.cca_steps(stats[point], reference, other, gamma=gamma, relative=relative)
