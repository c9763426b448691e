"""The :class:`Dataset` users pass around: a training and a test source, the number of classes
and the normalisation that was applied."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ccamerge.data.adapt import as_source
from ccamerge.data.sources import DataSource, TensorSource
from ccamerge.errors import CcamergeError


@dataclass(frozen=True, eq=False, init=False)
class Dataset:
    """A classification dataset, normalised and ready to feed a model.

    ``train`` and ``test`` stream ``(x, y)`` batches (see :mod:`ccamerge.data.sources`): samples
    ``[F]`` (feature vectors) or ``[C, H, W]`` (images) float32, labels int64 in
    ``0..num_classes-1``. ``mean``/``std`` (one float per channel, or per feature) are what was
    subtracted / divided after scaling the raw values to [0, 1].

    ``Dataset(name, train, test)`` takes any source ``as_source`` accepts (a DataLoader too);
    ``num_classes`` is read from the labels when not given. For data held in memory the old
    tensor fields still work: ``Dataset(name, x_train=..., y_train=..., x_test=..., y_test=...)``,
    ``dataclasses.replace(data, x_test=..., y_test=...)`` and ``data.x_train``.
    """

    name: str
    train: DataSource
    test: DataSource
    num_classes: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __init__(self, name: str, train=None, test=None, num_classes: int | None = None,
                 mean: tuple[float, ...] = (), std: tuple[float, ...] = (), *,
                 x_train=None, y_train=None, x_test=None, y_test=None):
        train = _part(name, "train", train, x_train, y_train)
        test = _part(name, "test", test, x_test, y_test)
        if train.sample_shape != test.sample_shape:
            raise CcamergeError(f"{name}: training samples are {list(train.sample_shape)} but "
                                f"test samples are {list(test.sample_shape)}; they must match")
        if num_classes is None:
            num_classes = int(max(train.labels().max(), test.labels().max())) + 1
        for key, value in (("name", name), ("num_classes", int(num_classes)),
                           ("mean", tuple(mean)), ("std", tuple(std)),
                           ("train", _declare(train, num_classes)),
                           ("test", _declare(test, num_classes))):
            object.__setattr__(self, key, value)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape: ``(F,)`` for feature vectors, ``(C, H, W)`` for images."""
        return tuple(self.train.sample_shape)

    @property
    def is_images(self) -> bool:
        """True for images ``[C, H, W]``, False for feature vectors ``[F]``."""
        return len(self.input_shape) == 3

    @property
    def in_channels(self) -> int | None:
        """Image channels C (None for feature vectors)."""
        return self.input_shape[0] if self.is_images else None

    @property
    def image_size(self) -> int | None:
        """Side S of square images (None for feature vectors and non-square images)."""
        shape = self.input_shape
        return shape[1] if self.is_images and shape[1] == shape[2] else None

    @property
    def x_train(self) -> torch.Tensor:
        """Training inputs ``[N, ...]``: the tensor itself for data in memory, else read whole
        (small data only; the library streams ``train``)."""
        return self.train.inputs()

    @property
    def y_train(self) -> torch.Tensor:
        return self.train.labels()

    @property
    def x_test(self) -> torch.Tensor:
        """Test inputs ``[N, ...]``, like :attr:`x_train`."""
        return self.test.inputs()

    @property
    def y_test(self) -> torch.Tensor:
        return self.test.labels()

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={self.train!r}, test={self.test!r}, "
                f"num_classes={self.num_classes}, input_shape={list(self.input_shape)})")

    def describe(self) -> dict:
        """JSON-able summary for file metadata: name, sizes, classes, and ``image_shape``
        ``[C, H, W]`` (images) or ``input_shape`` ``[F]`` (feature vectors)."""
        key = "image_shape" if self.is_images else "input_shape"
        return {"name": self.name, "train_size": int(len(self.train)),
                "test_size": int(len(self.test)), "num_classes": int(self.num_classes),
                key: list(self.input_shape)}


def _part(name: str, split: str, source, x, y) -> DataSource:
    """The ``split`` source from a source, or from tensors (``x``/``y`` replace the source's)."""
    if x is None and y is None:
        if source is None:
            raise CcamergeError(f"{name}: a Dataset needs a {split} part")
        return as_source(source)
    if x is None or y is None:
        if not isinstance(source, TensorSource):
            raise CcamergeError(f"{name}: give both x_{split} and y_{split}")
        x = source.x if x is None else x
        y = source.y if y is None else y
    return TensorSource(torch.as_tensor(x), torch.as_tensor(y))


def _declare(source: DataSource, num_classes: int) -> DataSource:
    return source if source.num_classes == num_classes else source.with_num_classes(num_classes)


def moment_axes(ndim: int) -> tuple[int, ...]:
    """Axes averaged for the per-channel (images ``[N, C, H, W]``) or per-feature (``[N, F]``)
    normalisation: every axis but 1."""
    return (0,) + tuple(range(2, ndim))


def make_dataset(name, x_train, y_train, x_test, y_test, *, check: bool = False) -> Dataset:
    """Standardise arrays in memory (``[N, C, H, W]`` per channel, ``[N, F]`` per feature) with
    the training statistics and wrap them as tensors."""
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    if check:
        check_classes(name, y_train, y_test, num_classes)
    axes = moment_axes(x_train.ndim)
    mean = x_train.mean(axis=axes, dtype=np.float64)  # [C] or [F]
    std = x_train.std(axis=axes, dtype=np.float64)  # [C] or [F]
    std = np.where(std > 1e-8, std, 1.0)
    view = (-1,) + (1,) * (x_train.ndim - 2)

    def norm(x):
        return torch.from_numpy(((x - mean.reshape(view)) / std.reshape(view)).astype(np.float32))

    return Dataset(name, x_train=norm(x_train), y_train=torch.from_numpy(y_train.astype(np.int64)),
                   x_test=norm(x_test), y_test=torch.from_numpy(y_test.astype(np.int64)),
                   num_classes=num_classes, mean=tuple(map(float, mean)),
                   std=tuple(map(float, std)))


def check_classes(name, y_train, y_test, num_classes) -> None:
    """Labels ``0..K-1`` with at least 2 classes, every one of them present in ``y_train``."""
    present = np.unique(y_train)
    if len(present) < 2:
        raise CcamergeError(f"{name}: y_train has {len(present)} class(es); need at least 2")
    absent = sorted(set(range(num_classes)) - set(present.tolist()))
    if absent:
        raise CcamergeError(f"{name}: labels must be 0..K-1 with every class in y_train, but "
                            f"classes {absent[:10]} never occur there (K={num_classes})")
