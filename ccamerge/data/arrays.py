"""Datasets from numpy arrays that stay on disk (``.npz`` members, ``.npy`` files, both memory
mapped where possible): validated as a whole, normalised batch by batch.

Arrays: ``x`` ``[N, F]`` (feature vectors), ``[N, H, W]`` (grey images) or ``[N, C, H, W]`` (any
height, width and channel count), labels ``y`` ``[N]`` integers ``0..K-1``. Raw values are scaled
to [0, 1] (uint8 by 255, data already in [0, 1] as it is, anything else by the training range),
then standardised per channel (per feature) with the training statistics, which one chunked pass
computes (float64, chunks merged with Chan's update, so no chunk size changes them).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ccamerge.data.dataset import Dataset, check_classes, moment_axes
from ccamerge.data.sources import Batch, IndexedSource
from ccamerge.errors import CcamergeError

KEYS = ("x_train", "y_train", "x_test", "y_test")
CHUNK_BYTES = 16 << 20  # rows per pass chunk: about this much raw data


@dataclass(frozen=True)
class Normaliser:
    """``((raw - low) / scale - mean) / std`` per channel (``[C]``) or feature (``[F]``)."""

    low: float
    scale: float
    mean: np.ndarray
    std: np.ndarray

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """Raw samples ``[B, ...]`` (any numeric dtype) -> float32 ``[B, ...]``."""
        view = (-1,) + (1,) * (raw.ndim - 2)
        x = scaled(raw, self.low, self.scale)
        return ((x - self.mean.reshape(view)) / self.std.reshape(view)).astype(np.float32)


def scaled(raw: np.ndarray, low: float, scale: float) -> np.ndarray:
    """Raw values as float32 in [0, 1]: ``(raw - low) / scale``."""
    return (raw.astype(np.float32) - low) / scale


class FileGuard:
    """Remembers files' size and modification time: a memory map over a file rewritten in
    place would crash the process (SIGBUS) instead of raising."""

    def __init__(self, paths: Iterable[str | Path]):
        self.stamps = {str(p): _stamp(p) for p in paths}

    def check(self) -> None:
        for path, stamp in self.stamps.items():
            if _stamp(path) != stamp:
                raise CcamergeError(f"{path} changed on disk after it was loaded; load the "
                                    "dataset again")


def _stamp(path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns


class ArraySource(IndexedSource):
    """Rows of ``x`` (array or memory map ``[N, ...]``) reshaped to ``sample_shape`` and
    normalised per batch; labels ``y`` ``[N]`` int64 held in memory."""

    def __init__(self, x: np.ndarray, y: np.ndarray, sample_shape: tuple[int, ...],
                 normaliser: Normaliser, *, num_classes: int | None = None,
                 guard: FileGuard | None = None):
        self.x, self.y, self._shape = x, y, tuple(sample_shape)
        self.normaliser, self.num_classes, self.guard = normaliser, num_classes, guard

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self._shape

    def __len__(self) -> int:
        return len(self.y)

    def read(self, index: slice | np.ndarray) -> Batch:
        if self.guard is not None:
            self.guard.check()
        raw = np.asarray(self.x[index]).reshape((-1,) + self._shape)
        return torch.from_numpy(self.normaliser(raw)), torch.from_numpy(self.y[index])

    def labels(self) -> torch.Tensor:
        return torch.from_numpy(self.y)


def chunks(x: np.ndarray) -> Iterator[np.ndarray]:
    """Consecutive row blocks of ``x`` of about ``CHUNK_BYTES`` each (views of a memory map)."""
    row = max(1, int(np.prod(x.shape[1:])) * x.dtype.itemsize)
    step = max(1, CHUNK_BYTES // row)
    for start in range(0, len(x), step):
        yield np.asarray(x[start:start + step])


def channel_moments(pieces: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std (float64, ``[C]``/``[F]``) over every axis but 1 of float
    samples ``[B, C, ...]`` given in pieces (Chan's parallel update, exact for any split)."""
    count, mean, m2 = 0, None, None
    for piece in pieces:
        axes = moment_axes(piece.ndim)
        values = piece.astype(np.float64)
        n = values.size // values.shape[1]
        mean_b = values.mean(axis=axes)
        view = (1, -1) + (1,) * (piece.ndim - 2)
        m2_b = np.square(values - mean_b.reshape(view)).sum(axis=axes)
        if mean is None:
            count, mean, m2 = n, mean_b, m2_b
            continue
        delta = mean_b - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + m2_b + np.square(delta) * (count * n / total)
        count = total
    if mean is None:
        raise CcamergeError("no training samples to compute the normalisation from")
    return mean, np.sqrt(m2 / count)


def as_inputs(array: np.ndarray, key: str, name: str) -> tuple[int, ...]:
    """The sample shape of ``x`` array ``key`` (``[N, H, W]`` reads as ``[N, 1, H, W]``);
    checks dtype and shape only (no data is read)."""
    if array.dtype.kind not in "biuf":
        raise CcamergeError(f"{name}: {key} has dtype {array.dtype}; expected numbers")
    if array.ndim not in (2, 3, 4):
        raise CcamergeError(f"{name}: {key} has shape {list(array.shape)}; expected [N, F] "
                            "feature vectors, [N, H, W] or [N, C, H, W] images")
    if array.size == 0:
        raise CcamergeError(f"{name}: {key} is empty (shape {list(array.shape)})")
    shape = tuple(int(d) for d in array.shape[1:])
    return (1, *shape) if array.ndim == 3 else shape


def as_labels(array: np.ndarray, key: str, name: str) -> np.ndarray:
    """Labels ``[N]`` as int64, or one clear error (shape, dtype, fractions, negatives)."""
    if array.dtype.kind not in "biuf":
        raise CcamergeError(f"{name}: {key} has dtype {array.dtype}; expected integer labels")
    if array.ndim != 1:
        raise CcamergeError(f"{name}: {key} has shape {list(array.shape)}; expected labels [N]")
    array = np.asarray(array)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or not np.all(array == np.round(array)):
            raise CcamergeError(f"{name}: {key} holds non-integer values; labels must be "
                                "integers 0..K-1")
    if array.size and array.min() < 0:
        raise CcamergeError(f"{name}: {key} holds negative labels; labels must be integers 0..K-1")
    return array.astype(np.int64)


def _noun(shape: tuple[int, ...]) -> str:
    return "samples" if len(shape) == 1 else "images"


def check_pairs(name: str, shapes: dict[str, tuple], counts: dict[str, int]) -> None:
    """Inputs and labels of each split agree in number; train and test samples in shape."""
    for split in ("train", "test"):
        if counts[f"x_{split}"] != counts[f"y_{split}"]:
            raise CcamergeError(f"{name}: x_{split} has {counts[f'x_{split}']} "
                                f"{_noun(shapes[split])} but y_{split} has "
                                f"{counts[f'y_{split}']} labels; they must match")
    if shapes["train"] != shapes["test"]:
        raise CcamergeError(f"{name}: x_train {_noun(shapes['train'])} are "
                            f"{list(shapes['train'])} but x_test {_noun(shapes['test'])} are "
                            f"{list(shapes['test'])}; they must match")
    if counts["x_train"] < 2:
        raise CcamergeError(f"{name}: x_train holds {counts['x_train']} sample; need at least 2")


def value_range(x: np.ndarray, key: str, name: str) -> tuple[float, float]:
    """(min, max) of ``x`` in one chunked pass; NaN or inf is an error."""
    low, high = np.inf, -np.inf
    for piece in chunks(x):
        if piece.dtype.kind == "f" and not np.isfinite(piece).all():
            raise CcamergeError(f"{name}: {key} contains NaN or infinite values")
        low, high = min(low, float(piece.min())), max(high, float(piece.max()))
    return low, high


def scaling(x_train: np.ndarray, x_test: np.ndarray, name: str) -> tuple[float, float]:
    """``(low, scale)`` mapping raw values to [0, 1]: uint8 by 255, data within [0, 1] as it
    is, else the training set's range (x_test is checked for NaN/inf in the same pass)."""
    if x_test.dtype.kind == "f":
        value_range(x_test, "x_test", name)
    if x_train.dtype == np.uint8:
        return 0.0, 255.0
    low, high = value_range(x_train, "x_train", name)
    if low >= 0.0 and high <= 1.0:
        low, high = 0.0, 1.0
    return low, (high - low) or 1.0


def array_dataset(name: str, arrays: dict[str, np.ndarray], guard: FileGuard | None) -> Dataset:
    """Validate ``x_train, y_train, x_test, y_test`` (inputs by shape and in one chunked pass,
    labels in memory), compute the normalisation, and stream the rest on demand."""
    shapes = {s: as_inputs(arrays[f"x_{s}"], f"x_{s}", name) for s in ("train", "test")}
    labels = {k: as_labels(arrays[k], k, name) for k in ("y_train", "y_test")}
    check_pairs(name, shapes, {k: len(arrays[k]) for k in KEYS})
    num_classes = int(max(labels["y_train"].max(), labels["y_test"].max())) + 1
    check_classes(name, labels["y_train"], labels["y_test"], num_classes)
    low, scale = scaling(arrays["x_train"], arrays["x_test"], name)
    shape = shapes["train"]
    pieces = (scaled(p.reshape((-1,) + shape), low, scale) for p in chunks(arrays["x_train"]))
    mean, std = channel_moments(pieces)
    std = np.where(std > 1e-8, std, 1.0)
    norm = Normaliser(low, scale, mean, std)
    parts = {s: ArraySource(arrays[f"x_{s}"], labels[f"y_{s}"], shape, norm, guard=guard)
             for s in ("train", "test")}
    return Dataset(name, parts["train"], parts["test"], num_classes,
                   tuple(map(float, mean)), tuple(map(float, std)))
