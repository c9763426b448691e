"""Sources without random access: a ``torch.utils.data.DataLoader``, any re-iterable of
``(x, y)`` batches (a list, an object whose ``__iter__`` starts over), or a function returning a
fresh iterator. Batches of any size come in; ``batches(batch_size)`` re-cuts them to the size the
consumer asks for, so results do not depend on how the loader batches. Every batch is checked
(shape, labels, finite values) as it arrives; a stream's subset keeps the chosen positions and
filters them out of the next pass, so a statistics sample is never copied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from ccamerge.data.sources import Batch, DataSource, as_index, check_batch_size, check_labels
from ccamerge.errors import CcamergeError


class StreamSource(DataSource):
    """Batches from ``open_pass()`` (called once per pass), validated and re-cut. ``what``
    names the data in messages; ``positions`` (sorted int64) keeps only those samples."""

    random_access = False

    def __init__(self, open_pass: Callable[[], Iterable], *, what: str = "the data loader",
                 num_classes: int | None = None, sample_shape: tuple[int, ...] | None = None,
                 length: int | None = None, positions: np.ndarray | None = None):
        self.open_pass, self.what, self.num_classes = open_pass, what, num_classes
        self._shape = None if sample_shape is None else tuple(sample_shape)
        self._length, self.positions = length, positions

    @property
    def sample_shape(self) -> tuple[int, ...]:
        if self._shape is None:
            for _ in self._pieces():
                break
        if self._shape is None:
            raise CcamergeError(f"{self.what} yielded no batches")
        return self._shape

    def __len__(self) -> int:
        if self.positions is not None:
            return len(self.positions)
        if self._length is None:
            self._length = sum(len(x) for x, _ in self._pieces())
        return self._length

    def size_hint(self) -> int | None:
        return len(self.positions) if self.positions is not None else self._length

    def batches(self, batch_size: int = 256, *, shuffle: bool = False, seed: int = 0,
                generator: torch.Generator | None = None) -> Iterator[Batch]:
        check_batch_size(batch_size)
        if shuffle:
            raise CcamergeError(f"{self.what} streams in its own order and cannot be shuffled "
                                "here; shuffle it yourself, e.g. DataLoader(..., shuffle=True)")
        yield from rebatch(self._selected(), batch_size)

    def subset(self, indices) -> DataSource:
        """The samples at ``indices``, in stream order (a stream cannot be reordered)."""
        chosen = np.unique(as_index(indices, len(self)))
        if self.positions is not None:
            chosen = self.positions[chosen]
        return StreamSource(self.open_pass, what=self.what, num_classes=self.num_classes,
                            sample_shape=self._shape, length=self._length, positions=chosen)

    def _selected(self) -> Iterator[Batch]:
        """The validated pieces, filtered to ``positions`` when set."""
        if self.positions is None:
            yield from self._pieces()
            return
        start = 0
        for x, y in self._pieces():
            lo, hi = np.searchsorted(self.positions, [start, start + len(x)])
            if hi > lo:
                keep = torch.from_numpy(self.positions[lo:hi] - start)
                yield x[keep], None if y is None else y[keep]
            start += len(x)

    def _pieces(self) -> Iterator[Batch]:
        """One pass: every batch as the loader gives it, checked; learns shape and length."""
        count, labelled = 0, None
        for k, item in enumerate(self.open_pass()):
            x, y = self._check(k, item)
            if labelled is None:
                labelled = y is not None
            elif labelled != (y is not None):
                raise CcamergeError(f"{self.what}: batch {k} {'has' if y is not None else 'lacks'}"
                                    " labels unlike the batches before it")
            count += len(x)
            yield x, y
        if self.positions is None:
            self._length = count

    def _check(self, k: int, item) -> Batch:
        """One batch as ``(x float [B, ...], y int64 [B] | None)``, or one clear error."""
        x, y = unpack(item, f"{self.what}: batch {k}")
        shape = tuple(x.shape[1:])
        if self._shape is None:
            self._shape = shape
        elif shape != self._shape:
            raise CcamergeError(f"{self.what}: batch {k} holds samples of shape {list(shape)} "
                                f"but earlier ones {list(self._shape)}; every sample must have "
                                "one shape")
        if not bool(torch.isfinite(x).all()):
            raise CcamergeError(f"{self.what}: batch {k} contains NaN or infinite inputs")
        if y is not None:
            y = check_labels(y, len(x), f"{self.what}: batch {k}", self.num_classes)
        return x, y


def unpack(item, where: str) -> Batch:
    """``(x, y)``, ``[x, y]`` or a bare input batch ``x`` as ``(float tensor, labels | None)``."""
    if isinstance(item, tuple | list):
        if len(item) != 2:
            raise CcamergeError(f"{where} has {len(item)} parts; expected (inputs, labels)")
        x, y = item
    else:
        x, y = item, None
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise CcamergeError(f"{where}: inputs are a {type(x).__name__}; expected a tensor "
                            "[B, F] or [B, C, H, W]")
    if x.dim() < 2:
        raise CcamergeError(f"{where}: inputs have shape {list(x.shape)}; expected a batch "
                            "[B, F] of feature vectors or [B, C, H, W] of images")
    return (x if x.is_floating_point() else x.float()), y


def rebatch(pieces: Iterable[Batch], batch_size: int) -> Iterator[Batch]:
    """Re-cut batches of any size into batches of ``batch_size`` (the last may be smaller);
    a piece that already has the right size passes through without a copy."""
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor | None] = []
    held = 0
    for x, y in pieces:
        while len(x):
            step = min(batch_size - held, len(x))
            xs.append(x[:step])
            ys.append(None if y is None else y[:step])
            held += step
            x, y = x[step:], None if y is None else y[step:]
            if held == batch_size:
                yield join(xs, ys)
                xs, ys, held = [], [], 0
    if held:
        yield join(xs, ys)


def join(xs: list[torch.Tensor], ys: list[torch.Tensor | None]) -> Batch:
    """Pieces ``[b_i, ...]`` (and labels ``[b_i]``) as one batch ``[sum b_i, ...]``."""
    if len(xs) == 1:
        return xs[0], ys[0]
    return torch.cat(xs), None if ys[0] is None else torch.cat(ys)


def loader_length(loader) -> int | None:
    """Samples per pass of a ``DataLoader`` when its sampler says so without a pass."""
    if getattr(loader, "batch_size", None) is None or getattr(loader, "drop_last", True):
        return None
    try:
        return len(loader.sampler)
    except TypeError:  # an IterableDataset's sampler has no length
        return None
