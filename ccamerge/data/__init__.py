"""Data: datasets, the sources that stream their ``(x, y)`` batches, and the paper's splits.

``load_dataset(name_or_path)`` takes a built-in name (``digits``, ``fashion-mnist``), an ``.npz``
file, a folder of ``.npy`` files or an image folder, and returns a :class:`Dataset` whose
``train`` and ``test`` parts are :class:`DataSource` streams. In the Python API any tensor,
``DataLoader`` or iterable of ``(x, y)`` batches is a source too (:func:`as_source`).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from ccamerge.data.adapt import as_source
from ccamerge.data.arrays import ArraySource
from ccamerge.data.builtin import (
    FASHION_MNIST_DIRS,
    FASHION_MNIST_FILES,
    find_fashion_dir,
    load_digits_dataset,
    load_fashion_mnist,
    read_idx,
)
from ccamerge.data.dataset import Dataset, make_dataset
from ccamerge.data.folders import IMAGE_EXTENSIONS, ImageFileSource, image_folder_dataset
from ccamerge.data.npz import is_npy_folder, load_npy_folder, load_npz, npy_paths
from ccamerge.data.sources import DataSource, Subset, TensorSource
from ccamerge.data.splits import SPLITS, holdout_split, split_indices
from ccamerge.data.stream import StreamSource
from ccamerge.errors import CcamergeError
from ccamerge.files import regular_file

DATASETS = ("digits", "fashion-mnist")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_find_fashion_dir = find_fashion_dir  # the name tests and older callers use

__all__ = ["DATASETS", "FASHION_MNIST_DIRS", "FASHION_MNIST_FILES", "IMAGE_EXTENSIONS", "NPZ_KEYS",
           "SPLITS", "ArraySource", "DataSource", "Dataset", "ImageFileSource", "StreamSource",
           "Subset", "TensorSource", "as_source", "available_datasets", "holdout_split",
           "load_dataset", "make_dataset", "read_idx", "split_indices"]


def load_dataset(name, *, data_dir: str | None = None, image_shape=None) -> Dataset:
    """Load a dataset by name or path, cached in-process (a file or folder is re-read when its
    contents' sizes or modification times change):

    * ``"digits"``, ``"fashion-mnist"`` (from ``data_dir`` or the Debian package);
    * an ``.npz`` with ``x_train, y_train, x_test, y_test`` (inputs ``[N, F]``, ``[N, H, W]`` or
      ``[N, C, H, W]``), or a folder with those four as ``.npy`` files (memory mapped);
    * an image folder (``root/<class>/*.png`` or ``root/train/...`` + ``root/test/...``);
      ``image_shape=(C, H, W)`` converts every image to that channel count and size.
    """
    name = str(name)
    if image_shape is not None:
        image_shape = tuple(int(d) for d in image_shape)
    if name in DATASETS:
        if image_shape is not None:
            raise CcamergeError(f"image_shape applies to image folders, not to {name}")
        return _load_cached(name, None if data_dir is None else str(data_dir), None)
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_cached(name, None, _folder_key(path, image_shape))
    if name.endswith(".npz") or path.exists():
        if not path.exists() and not path.is_symlink():
            raise CcamergeError(f"dataset file {name} does not exist; pass a path to an .npz "
                                "file, a folder of .npy files or an image folder")
        regular_file(path, what="dataset file")  # a FIFO or a device is never opened
        if image_shape is not None:
            raise CcamergeError("image_shape applies to image folders; an .npz keeps its shape")
        return _load_cached(name, None, ("npz", str(path.resolve()), _stamp(path)))
    raise CcamergeError(f"unknown dataset {name!r}; choose one of {list(DATASETS)} or give a path "
                        "to an .npz file with x_train, y_train, x_test, y_test, a folder of such "
                        ".npy files or an image folder (root/<class>/*.png)")


def available_datasets() -> list[str]:
    """Built-in dataset names usable on this machine (fashion-mnist only when its files exist)."""
    names = ["digits"]
    if find_fashion_dir(None) is not None:
        names.append("fashion-mnist")
    return names


def _stamp(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns


def _folder_key(path: Path, image_shape) -> tuple:
    """Cache key of a folder: its kind, path and a digest of every file's size and mtime."""
    if is_npy_folder(path):
        if image_shape is not None:
            raise CcamergeError("image_shape applies to image folders; .npy arrays keep their "
                                "shape")
        files = [p for p in npy_paths(path) if p.is_file()]
        return ("npy", str(path.resolve()), tuple(_stamp(p) for p in files), len(files))
    digest = hashlib.sha1()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path)}:{_stamp(file)}\n".encode())
    return ("images", str(path.resolve()), digest.hexdigest(), image_shape)


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, data_dir: str | None, file_key: tuple | None) -> Dataset:
    if name == "digits":
        return load_digits_dataset()
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    kind, where = file_key[0], file_key[1]
    if kind == "npz":
        return load_npz(name, where)
    if kind == "npy":
        return load_npy_folder(name, Path(where))
    return image_folder_dataset(name, Path(where), file_key[3])
