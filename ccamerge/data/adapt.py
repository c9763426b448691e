"""``as_source``: whatever a user passes as data, as a
:class:`~ccamerge.data.sources.DataSource`."""

from __future__ import annotations

import numpy as np
import torch

from ccamerge.data.sources import DataSource, TensorSource
from ccamerge.data.stream import StreamSource, loader_length
from ccamerge.errors import CcamergeError


def as_source(data, *, num_classes: int | None = None) -> DataSource:
    """A source for ``data``: a DataSource (as it is); a tensor or array of inputs ``[N, ...]``;
    a pair ``(x [N, ...], y [N])``; a ``DataLoader`` or any re-iterable of ``(x, y)`` batches
    (or of bare input batches); or a function returning a fresh iterator of them.

    A one-shot iterator (a generator) is refused: merging reads the data several times.
    ``num_classes`` is recorded where the source does not know it (labels are checked against
    it as they stream).
    """
    source = _adapt(data)
    if num_classes is not None and source.num_classes is None:
        source = source.with_num_classes(num_classes)
    return source


def _adapt(data) -> DataSource:
    if isinstance(data, DataSource):
        return data
    if all(hasattr(data, a) for a in ("train", "test", "num_classes")):
        raise CcamergeError("a Dataset has a training and a test part; pass data.train or "
                            "data.test")
    if isinstance(data, torch.Tensor | np.ndarray):
        return TensorSource(torch.as_tensor(data))
    if _is_pair(data):
        x, y = (torch.as_tensor(v) for v in data)
        return TensorSource(x, y)
    if callable(data) and not hasattr(data, "__iter__"):
        return StreamSource(data, what="the batch function")
    if not hasattr(data, "__iter__") or isinstance(data, str | bytes | dict):
        raise CcamergeError(f"cannot read data from a {type(data).__name__}; pass a Dataset, a "
                            "tensor [N, ...], a DataLoader or an iterable of (x, y) batches")
    if iter(data) is data:
        raise CcamergeError("the data is a one-shot iterator (e.g. a generator), but merging "
                            "reads it several times; pass a list of batches, a DataLoader or a "
                            "function that returns a fresh iterator")
    what = "the data loader" if isinstance(data, torch.utils.data.DataLoader) else "the batches"
    return StreamSource(lambda: iter(data), what=what, length=loader_length(data))


def _is_pair(data) -> bool:
    """``(x, y)`` of arrays with one label per input (not a list of two batches)."""
    if not isinstance(data, tuple) or len(data) != 2:
        return False
    x, y = data
    arrays = all(isinstance(v, torch.Tensor | np.ndarray) for v in data)
    return arrays and np.ndim(y) == 1 and len(x) == len(y) and np.ndim(x) >= 2
