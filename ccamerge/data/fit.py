"""Between the data and the models: the part of the data a computation streams
(:func:`train_source`, :func:`score_source`), a random statistics sample (:func:`subsample`),
the merge points of the models (:func:`resolve_spec`) and the fit check that runs before any
work (:func:`check_compatible`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ccamerge.data.adapt import as_source
from ccamerge.data.dataset import Dataset
from ccamerge.data.sources import DataSource, TensorSource
from ccamerge.errors import CcamergeError
from ccamerge.models import (
    ARCHITECTURES,
    check_input_fit,
    same_architecture,
    widths_differ,
    widths_label,
)
from ccamerge.spec import AlignmentSpec, build_spec
from ccamerge.trace.derive import derive_and_verify
from ccamerge.trace.family import family_specs
from ccamerge.trace.family import widths_label as family_label


def train_source(data) -> DataSource:
    """The source statistics and the BatchNorm reset stream: a Dataset's training part, or data
    given directly (a tensor / array ``[N, ...]`` as float32, a DataSource, a DataLoader, an
    iterable of ``(x, y)`` batches)."""
    if isinstance(data, Dataset):
        return data.train
    if isinstance(data, np.ndarray | torch.Tensor):
        return TensorSource(torch.as_tensor(data).float())
    return as_source(data)


def score_source(data) -> DataSource:
    """A Dataset's test part (what interpolation and diagnosis score on)."""
    if not isinstance(data, Dataset):
        raise CcamergeError(f"scoring needs a Dataset with a test part, got {type(data).__name__}; "
                            "build one with Dataset(name, train=..., test=...)")
    return data.test


def train_inputs(data) -> torch.Tensor:
    """Training inputs ``[N, ...]`` as one tensor (the tensor itself for data in memory). For
    callers that need a tensor; the library streams :func:`train_source` instead."""
    return train_source(data).inputs()


def is_builtin(model: nn.Module) -> bool:
    return getattr(model, "arch", None) in ARCHITECTURES


def check_compatible(models: Sequence[nn.Module], data, reference: int,
                     method: str | None = None) -> None:
    """Before any work, fail with one clear line for < 2 models, mismatched models, a bad
    reference index, fewer than 2 samples, or data whose sample shape (feature width, channels,
    height, width) or number of classes does not fit the models. ``data``: anything
    :func:`train_source` takes. Models of one family whose widths differ (built-in ones by
    their config, traced ones by :func:`check_traced_family`) pass when ``method`` merges
    different widths (``Method.mixed_widths``; ``method=None``: statistics alone, which any
    widths have)."""
    if len(models) < 2:
        raise CcamergeError(f"merging needs at least 2 models, got {len(models)}")
    if not 0 <= reference < len(models):
        raise CcamergeError(f"reference must be in 0..{len(models) - 1}, got {reference}")
    source = train_source(data)
    size = source.size_hint()
    if size is not None and size < 2:
        raise CcamergeError(f"the data holds {size} sample(s); statistics need at least 2")
    if all(is_builtin(m) for m in models):
        check_widths(list(models), method)
        same_architecture(list(models), mixed_widths=True)
        check_input_fit(models[0], source.sample_shape, source.num_classes)
        return
    _check_runs(models[0], source)
    if shapes_differ(models):
        check_traced_family(models, source.head(64), method)


def check_traced_family(models: Sequence[nn.Module], x: torch.Tensor, method: str | None,
                        names: Sequence[str] | None = None) -> list[AlignmentSpec]:
    """Each traced model's own spec, derived on ``x`` ``[B, ...]``, when ``models`` (whose
    shapes differ) are one architecture at other hidden widths
    (:func:`ccamerge.trace.family.family_specs`, ``names`` naming the models) and ``method``
    merges different widths; one line otherwise."""
    specs = family_specs(models, x, names)
    _refuse_one_width(method, family_label(specs))
    return specs


def shapes_differ(models: Sequence[nn.Module]) -> bool:
    """Whether some state-dict entry of some model has another shape (or is missing) than in
    model 0: for models outside the built-in families, what makes their widths differ."""
    first = {k: v.shape for k, v in models[0].state_dict().items()}
    return any({k: v.shape for k, v in m.state_dict().items()} != first for m in models[1:])


def widths_vary(models: Sequence[nn.Module]) -> bool:
    """Whether ``models`` (checked to be of one family) differ in width: built-in ones by
    their configs, others by their state-dict shapes."""
    if all(is_builtin(m) for m in models):
        return widths_differ(list(models))
    return shapes_differ(models)


def check_widths(models: list[nn.Module], method: str | None) -> None:
    """One line when built-in ``models`` differ only in width and ``method`` needs one width."""
    if widths_differ(models):
        _refuse_one_width(method, widths_label(models))


def _refuse_one_width(method: str | None, label: str) -> None:
    """One line when ``method`` (None: statistics alone) needs models of one width; ``label``
    says where these differ."""
    from ccamerge.methods.registry import get_method, mixed_width_methods  # noqa: PLC0415 - cycle

    if method is None or get_method(method).mixed_widths:
        return
    capable = mixed_width_methods()
    names = ", ".join(capable[:-1]) + f" or {capable[-1]}" if len(capable) > 1 else capable[0]
    raise CcamergeError(f"{method} needs models of one width, but these differ in width "
                        f"({label}); merge them with {names}, or pick models of one width")


def _check_runs(model: nn.Module, source: DataSource) -> None:
    """A model outside the built-in families runs on two samples with one output per class."""
    try:
        with torch.no_grad():
            out = model.eval()(source.head(2))
    except Exception as exc:
        raise CcamergeError(f"model 0 cannot run on inputs of shape {list(source.sample_shape)}: "
                            f"{exc}; pick the dataset it was trained on") from exc
    classes = source.num_classes
    if classes is not None and isinstance(out, torch.Tensor) and out.dim() == 2 \
            and out.shape[1] != classes:
        raise CcamergeError(f"model 0 has {out.shape[1]} outputs but the data has {classes} "
                            "classes; pick the dataset it was trained on")


def resolve_spec(models: Sequence[nn.Module], x) -> AlignmentSpec:
    """The hand-written spec of a built-in family, else one derived by tracing and verified
    with a random permutation on the first 64 inputs of ``x`` (a tensor or a data source;
    points that fail verification are not used)."""
    if is_builtin(models[0]):
        return build_spec(models[0])
    derived = derive_and_verify(models[0], x[:64] if isinstance(x, torch.Tensor) else x.head(64))
    if not derived.spec.points:
        reasons = "; ".join(derived.unmerged[:3]) or "no Linear/Conv layer feeds another"
        raise CcamergeError(f"found no merge point that can be aligned safely ({reasons}); "
                            "run `ccamerge spec MODEL` for details")
    return derived.spec


def subsample(x, samples: int | None, seed: int):
    """``samples`` rows of ``x`` chosen at random with ``seed`` (all rows when None): rows of a
    tensor, or for a data source a lazy subset (its indices only; see ``DataSource.take``)."""
    if isinstance(x, DataSource):
        return x.take(samples, seed)
    if samples is None or samples >= len(x):
        return x
    if samples < 2:
        raise CcamergeError(f"need at least 2 statistics samples, got {samples}")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[order[:samples]]
