"""Data sources: the one way ccamerge reads data, as a stream of ``(x, y)`` batches.

A source holds ``len(source)`` samples of one shape ``sample_shape`` (``(F,)`` for feature
vectors, ``(C, H, W)`` for images) and yields batches ``x`` ``[B, *sample_shape]`` float32 with
labels ``y`` ``[B]`` int64 in ``0..num_classes-1`` (``y`` is None for a source of inputs alone).
Every consumer (statistics, BatchNorm reset, evaluation, training) iterates
``source.batches(batch_size)`` and holds one batch at a time.

This module has the random-access sources: :class:`TensorSource` (tensors in memory), and the
:class:`Subset` every random-access source gives for any index list without reading the other
rows (``subset``, ``take``: a statistics sample is a list of indices, not a copy of the data).
Arrays on disk, image files and loaders are in ``arrays.py``, ``folders.py`` and ``stream.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import numpy as np
import torch

from ccamerge.errors import CcamergeError

Batch = tuple[torch.Tensor, torch.Tensor | None]


class DataSource:
    """A stream of ``(x [B, ...], y [B] | None)`` batches; see the module docstring.

    Subclasses implement ``__len__``, ``sample_shape`` and ``batches``; ``random_access`` says
    whether ``batches(shuffle=True)`` and arbitrary-order subsets are possible.
    """

    num_classes: int | None = None
    random_access: bool = True

    @property
    def sample_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def size_hint(self) -> int | None:
        """The number of samples when it is known without a pass over the data, else None."""
        return len(self)

    def batches(self, batch_size: int = 256, *, shuffle: bool = False, seed: int = 0,
                generator: torch.Generator | None = None) -> Iterator[Batch]:
        """Batches ``(x [B, *sample_shape], y [B] | None)`` of ``batch_size`` samples (the last
        may be smaller). ``shuffle``: a random order drawn from ``generator`` (default: a fresh
        generator seeded with ``seed``), so one generator gives a new order per epoch."""
        raise NotImplementedError

    def subset(self, indices) -> DataSource:
        """The samples at ``indices`` (int array ``[M]``, in that order), read lazily."""
        raise NotImplementedError

    def take(self, n: int | None, seed: int = 0) -> DataSource:
        """``n`` samples chosen at random with ``seed`` (all of them when ``n`` is None or at
        least ``len(self)``); only their indices are held, never the data."""
        if n is None or n >= len(self):
            return self
        if n < 2:
            raise CcamergeError(f"need at least 2 statistics samples, got {n}")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.subset(order[:n].numpy())

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` inputs ``[min(n, len), *sample_shape]`` (to trace or probe a model)."""
        out, got = [], 0
        for xb, _ in self.batches(max(1, min(n, 256))):
            out.append(xb[:n - got])
            got += len(out[-1])
            if got >= n:
                break
        if not out:
            raise CcamergeError("the data holds no samples")
        return torch.cat(out)

    def inputs(self) -> torch.Tensor:
        """Every input ``[N, *sample_shape]`` in one tensor: for small data only (the library
        itself streams)."""
        return torch.cat([xb for xb, _ in self.batches(1024)])

    def labels(self) -> torch.Tensor:
        """Every label ``[N]`` int64 (labels are small; sources that hold them in memory answer
        without reading the inputs)."""
        ys = [yb for _, yb in self.batches(1024)]
        if any(y is None for y in ys):
            raise CcamergeError("the data has inputs only, no labels")
        return torch.cat(ys) if ys else torch.zeros(0, dtype=torch.int64)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> DataSource:
        """This source with ``fn`` applied to every input batch (it must keep the shape)."""
        return Mapped(self, fn)

    def __repr__(self) -> str:
        size = self.size_hint()
        return f"{type(self).__name__}({'?' if size is None else size} samples)"

    def with_num_classes(self, num_classes: int | None) -> DataSource:
        """A shallow copy that declares ``num_classes`` (labels are checked against it where
        they are not known in advance)."""
        twin = copy.copy(self)
        twin.num_classes = num_classes
        return twin


def permutation(n: int, seed: int, generator: torch.Generator | None) -> np.ndarray:
    """A random order of ``range(n)`` (int64 ``[n]``) from ``generator`` or a fresh seeded one."""
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen).numpy()


def as_index(indices, n: int) -> np.ndarray:
    """``indices`` as int64 ``[M]``, checked to lie in ``0..n-1``."""
    if isinstance(indices, torch.Tensor):
        indices = indices.cpu().numpy()
    index = np.asarray(indices).reshape(-1)
    if index.size and index.dtype.kind not in "iu":
        raise CcamergeError(f"indices must be integers, got dtype {index.dtype}")
    index = index.astype(np.int64)
    if index.size and (index.min() < 0 or index.max() >= n):
        raise CcamergeError(f"indices must lie in 0..{n - 1} (got {index.min()}..{index.max()})")
    return index


class IndexedSource(DataSource):
    """A random-access source: subclasses implement ``read(index)`` for a slice or an int64
    index array ``[B]`` and return that batch."""

    def read(self, index: slice | np.ndarray) -> Batch:
        raise NotImplementedError

    def batches(self, batch_size: int = 256, *, shuffle: bool = False, seed: int = 0,
                generator: torch.Generator | None = None) -> Iterator[Batch]:
        check_batch_size(batch_size)
        n = len(self)
        order = permutation(n, seed, generator) if shuffle else None
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            yield self.read(slice(start, stop) if order is None else order[start:stop])

    def subset(self, indices) -> DataSource:
        return Subset(self, as_index(indices, len(self)))


def check_batch_size(batch_size: int) -> None:
    """A batch size must be a positive integer."""
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise CcamergeError(f"batch_size must be a positive integer, got {batch_size!r}")


class Subset(IndexedSource):
    """The rows ``indices`` ``[M]`` of a random-access ``base``, read only when a batch needs
    them."""

    def __init__(self, base: IndexedSource, indices: np.ndarray):
        self.base, self.indices = base, indices
        self.num_classes = base.num_classes

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.base.sample_shape

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, index: slice | np.ndarray) -> Batch:
        return self.base.read(self.indices[index])

    def subset(self, indices) -> DataSource:
        return Subset(self.base, self.indices[as_index(indices, len(self))])

    def labels(self) -> torch.Tensor:
        return self.base.labels()[torch.from_numpy(self.indices)]


class Mapped(DataSource):
    """``base`` with ``fn`` applied to each input batch (e.g. a memory-layout change)."""

    def __init__(self, base: DataSource, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.base, self.fn = base, fn
        self.num_classes, self.random_access = base.num_classes, base.random_access

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.base.sample_shape

    def __len__(self) -> int:
        return len(self.base)

    def size_hint(self) -> int | None:
        return self.base.size_hint()

    def batches(self, batch_size: int = 256, **order) -> Iterator[Batch]:
        for xb, yb in self.base.batches(batch_size, **order):
            yield self.fn(xb), yb

    def subset(self, indices) -> DataSource:
        return Mapped(self.base.subset(indices), self.fn)

    def labels(self) -> torch.Tensor:
        return self.base.labels()


class TensorSource(IndexedSource):
    """Inputs ``x`` ``[N, ...]`` (any dtype; at least 2-D) and optional labels ``y`` ``[N]``
    held in memory; batches are views or index copies of them."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None = None, *,
                 num_classes: int | None = None):
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            shape = list(x.shape) if hasattr(x, "shape") else type(x).__name__
            raise CcamergeError(f"inputs must be a tensor [N, F] or [N, C, H, W], got {shape}")
        if y is not None:
            y = check_labels(y, len(x), "labels")
        self.x, self.y, self.num_classes = x, y, num_classes

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.x)

    def read(self, index: slice | np.ndarray) -> Batch:
        idx = index if isinstance(index, slice) else torch.from_numpy(index)
        return self.x[idx], None if self.y is None else self.y[idx]

    def inputs(self) -> torch.Tensor:
        return self.x

    def labels(self) -> torch.Tensor:
        if self.y is None:
            raise CcamergeError("the data has inputs only, no labels")
        return self.y


def check_labels(y, count: int, where: str, num_classes: int | None = None) -> torch.Tensor:
    """Labels ``y`` as int64 ``[count]``: integers, non-negative, below ``num_classes`` when
    known; one clear line naming ``where`` otherwise."""
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    if y.dim() != 1 or len(y) != count:
        raise CcamergeError(f"{where}: {list(y.shape)} labels for {count} inputs; expected one "
                            "integer label per input")
    if y.is_floating_point():
        if not bool(torch.all(y == torch.round(y))):
            raise CcamergeError(f"{where}: labels must be integers 0..K-1, got fractions")
    elif y.dtype == torch.bool or y.is_complex():
        raise CcamergeError(f"{where}: labels must be integers 0..K-1, got dtype {y.dtype}")
    y = y.to(torch.int64)
    if len(y) and int(y.min()) < 0:
        raise CcamergeError(f"{where}: label {int(y.min())} is negative; labels are 0..K-1")
    if num_classes is not None and len(y) and int(y.max()) >= num_classes:
        raise CcamergeError(f"{where}: label {int(y.max())} is out of range for {num_classes} "
                            f"classes (labels are 0..{num_classes - 1})")
    return y
