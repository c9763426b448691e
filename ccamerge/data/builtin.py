"""The built-in datasets: scikit-learn's bundled digits (8x8 grey, fixed stratified split) and
Fashion-MNIST (28x28 grey) from its idx files, both held in memory."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from ccamerge.data.dataset import Dataset, make_dataset
from ccamerge.errors import CcamergeError

# Where the Debian package ``dataset-fashion-mnist`` (and common manual installs) put the files.
FASHION_MNIST_DIRS = (
    "/usr/share/datasets/fashion-mnist",
    "/usr/local/share/datasets/fashion-mnist",
    "~/.cache/ccamerge/fashion-mnist",
)
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def load_digits_dataset() -> Dataset:
    """scikit-learn's digits ``[1797, 1, 8, 8]``, split 80/20 stratified (seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.images.astype(np.float32)[:, None] / 16.0  # [1797, 1, 8, 8] in [0, 1]
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=0)
    return make_dataset("digits", x_train, y_train, x_test, y_test)


def find_fashion_dir(data_dir: str | None) -> Path | None:
    """The folder holding the four Fashion-MNIST idx files (``data_dir`` or the usual places)."""
    candidates = [data_dir] if data_dir is not None else list(FASHION_MNIST_DIRS)
    for folder in candidates:
        path = Path(folder).expanduser()
        if all(idx_file(path, stem) is not None for stem in FASHION_MNIST_FILES.values()):
            return path
    return None


def idx_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem.gz`` or ``folder/stem``, whichever exists (None if neither)."""
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def load_fashion_mnist(data_dir: str | None) -> Dataset:
    """Fashion-MNIST ``[60000 | 10000, 1, 28, 28]`` from its idx files."""
    folder = find_fashion_dir(data_dir)
    if folder is None:
        where = data_dir if data_dir is not None else ", ".join(FASHION_MNIST_DIRS)
        raise CcamergeError(
            f"Fashion-MNIST files ({', '.join(s + '.gz' for s in FASHION_MNIST_FILES.values())}) "
            f"not found in {where}; run `apt-get install -y dataset-fashion-mnist` or pass "
            "--data-dir pointing at a folder that holds them")
    arrays = {key: read_idx(idx_file(folder, stem)) for key, stem in FASHION_MNIST_FILES.items()}
    for key in ("x_train", "x_test"):
        if arrays[key].ndim != 3:
            raise CcamergeError(f"{FASHION_MNIST_FILES[key]} holds a {arrays[key].ndim}-D array; "
                                "expected images [N, H, W]")
    arrays = {k: v.astype(np.float32) / 255.0 if k.startswith("x") else v
              for k, v in arrays.items()}
    return make_dataset("fashion-mnist", arrays["x_train"][:, None], arrays["y_train"],
                         arrays["x_test"][:, None], arrays["y_test"], check=True)


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one idx file (optionally gzip-compressed), e.g. ``train-images-idx3-ubyte.gz``.

    Returns the array in its stored shape, e.g. uint8 ``[N, 28, 28]`` or ``[N]``.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise CcamergeError(f"cannot read idx file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise CcamergeError(f"{path} is not an idx file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise CcamergeError(f"{path} is not an idx file (bad dimension count {ndim})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise CcamergeError(f"{path} is truncated or corrupt: header says shape {list(shape)} "
                            f"({expected} bytes) but {len(raw) - header} bytes follow")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))
