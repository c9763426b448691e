"""Datasets (bundled digits, Fashion-MNIST, a user ``.npz``) and the data splits of the paper.

Every dataset comes back as a :class:`Dataset` of float32 images ``[N, C, S, S]`` standardised with
the training set's per-channel mean and std, and int64 labels ``[N]`` in ``0..K-1``.
"""

from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ccamerge.errors import CcamergeError

DATASETS = ("digits", "fashion-mnist")
SPLITS = ("same", "skewed", "dirichlet")

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
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset, normalised and ready to feed a model.

    ``x_train`` ``[N, C, S, S]`` float32, ``y_train`` ``[N]`` int64 (likewise ``x_test``/``y_test``);
    ``mean``/``std`` (one float per channel) are what was subtracted / divided after scaling the raw
    pixels to [0, 1].
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])

    def describe(self) -> dict:
        """JSON-able summary for file metadata: name, sizes, classes, image shape ``[C, S, S]``."""
        return {
            "name": self.name,
            "train_size": int(len(self.y_train)),
            "test_size": int(len(self.y_test)),
            "num_classes": int(self.num_classes),
            "image_shape": [self.in_channels, self.image_size, self.image_size],
        }


def load_dataset(name: str, *, data_dir: str | None = None) -> Dataset:
    """Load ``"digits"``, ``"fashion-mnist"`` (from ``data_dir`` or the Debian package) or a user
    ``.npz`` file holding ``x_train, y_train, x_test, y_test``. Cached in-process.

    A user file is re-read when its size or modification time changes.
    """
    if name in DATASETS:
        return _load_cached(name, None if data_dir is None else str(data_dir), None)
    path = Path(name).expanduser()
    if name.endswith(".npz") or path.exists():
        if not path.is_file():
            raise CcamergeError(f"dataset file {name} does not exist; pass a path to an .npz file")
        stat = path.stat()
        return _load_cached(name, None, (str(path.resolve()), stat.st_size, stat.st_mtime_ns))
    raise CcamergeError(f"unknown dataset {name!r}; choose one of {list(DATASETS)} or give a path "
                        "to an .npz file with x_train, y_train, x_test, y_test")


def available_datasets() -> list[str]:
    """Built-in dataset names usable on this machine (fashion-mnist only when its files exist)."""
    names = ["digits"]
    if _find_fashion_dir(None) is not None:
        names.append("fashion-mnist")
    return names


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, data_dir: str | None, file_key: tuple | None) -> Dataset:
    if name == "digits":
        return _load_digits()
    if name == "fashion-mnist":
        return _load_fashion_mnist(data_dir)
    return _load_npz(name, file_key[0])


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.images.astype(np.float32)[:, None] / 16.0  # [1797, 1, 8, 8] in [0, 1]
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=0)
    return _make_dataset("digits", x_train, y_train, x_test, y_test)


def _find_fashion_dir(data_dir: str | None) -> Path | None:
    candidates = [data_dir] if data_dir is not None else list(FASHION_MNIST_DIRS)
    for folder in candidates:
        path = Path(folder).expanduser()
        if all(_idx_file(path, stem) is not None for stem in FASHION_MNIST_FILES.values()):
            return path
    return None


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _load_fashion_mnist(data_dir: str | None) -> Dataset:
    folder = _find_fashion_dir(data_dir)
    if folder is None:
        where = data_dir if data_dir is not None else ", ".join(FASHION_MNIST_DIRS)
        raise CcamergeError(
            f"Fashion-MNIST files ({', '.join(s + '.gz' for s in FASHION_MNIST_FILES.values())}) "
            f"not found in {where}; run `apt-get install -y dataset-fashion-mnist` or pass "
            "--data-dir pointing at a folder that holds them")
    arrays = {key: read_idx(_idx_file(folder, stem)) for key, stem in FASHION_MNIST_FILES.items()}
    for key in ("x_train", "x_test"):
        if arrays[key].ndim != 3:
            raise CcamergeError(f"{FASHION_MNIST_FILES[key]} holds a {arrays[key].ndim}-D array; "
                                "expected images [N, H, W]")
    arrays = {k: v.astype(np.float32) / 255.0 if k.startswith("x") else v for k, v in arrays.items()}
    return _make_dataset("fashion-mnist", arrays["x_train"][:, None], arrays["y_train"],
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
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _load_npz(name: str, path: str) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in NPZ_KEYS if k not in archive.files]
            if missing:
                raise CcamergeError(f"{name} lacks {', '.join(missing)}; an .npz dataset needs "
                                    f"arrays {', '.join(NPZ_KEYS)} (found {archive.files})")
            arrays = {k: _read_npz_array(archive, k, name) for k in NPZ_KEYS}
    except CcamergeError:
        raise
    except Exception as exc:  # zipfile / format errors from an untrusted file
        raise CcamergeError(f"cannot read {name} as an .npz file: {exc}") from exc
    x_train, x_test = (_as_images(arrays[k], k, name) for k in ("x_train", "x_test"))
    y_train, y_test = (_as_labels(arrays[k], k, name) for k in ("y_train", "y_test"))
    _check_pairs(name, x_train, y_train, x_test, y_test)
    low, high = float(x_train.min()), float(x_train.max())
    if arrays["x_train"].dtype == np.uint8:
        low, high = 0.0, 255.0
    elif low >= 0.0 and high <= 1.0:
        low, high = 0.0, 1.0
    scale = (high - low) or 1.0
    return _make_dataset(name, (x_train - low) / scale, y_train, (x_test - low) / scale, y_test,
                         check=True)


def _read_npz_array(archive, key: str, name: str) -> np.ndarray:
    try:
        array = archive[key]
    except ValueError as exc:  # object arrays need pickle, which is refused
        raise CcamergeError(f"{name}: {key} is not a plain numeric array ({exc})") from exc
    if array.dtype.kind not in "biuf":
        raise CcamergeError(f"{name}: {key} has dtype {array.dtype}; expected numbers")
    return array


def _as_images(array: np.ndarray, key: str, name: str) -> np.ndarray:
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise CcamergeError(f"{name}: {key} has shape {list(array.shape)}; expected [N, H, W] "
                            "or [N, C, H, W]")
    if array.shape[2] != array.shape[3]:
        raise CcamergeError(f"{name}: {key} images are {array.shape[2]}x{array.shape[3]}; "
                            "only square images are supported")
    if array.shape[0] == 0 or array.shape[2] == 0:
        raise CcamergeError(f"{name}: {key} is empty (shape {list(array.shape)})")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise CcamergeError(f"{name}: {key} contains NaN or infinite values")
    return array


def _as_labels(array: np.ndarray, key: str, name: str) -> np.ndarray:
    if array.ndim != 1:
        raise CcamergeError(f"{name}: {key} has shape {list(array.shape)}; expected labels [N]")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or not np.all(array == np.round(array)):
            raise CcamergeError(f"{name}: {key} holds non-integer values; labels must be "
                                "integers 0..K-1")
    if array.size and array.min() < 0:
        raise CcamergeError(f"{name}: {key} holds negative labels; labels must be integers 0..K-1")
    return array.astype(np.int64)


def _check_pairs(name, x_train, y_train, x_test, y_test) -> None:
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y):
            raise CcamergeError(f"{name}: x_{split} has {len(x)} images but y_{split} has "
                                f"{len(y)} labels; they must match")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise CcamergeError(f"{name}: x_train images are {list(x_train.shape[1:])} but x_test "
                            f"images are {list(x_test.shape[1:])}; they must match")


def _make_dataset(name, x_train, y_train, x_test, y_test, *, check: bool = False) -> Dataset:
    """Standardise per channel with the training statistics and wrap as tensors."""
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    if check:
        _check_classes(name, y_train, y_test, num_classes)
    mean = x_train.mean(axis=(0, 2, 3), dtype=np.float64)  # [C]
    std = x_train.std(axis=(0, 2, 3), dtype=np.float64)  # [C]
    std = np.where(std > 1e-8, std, 1.0)

    def norm(x):
        return torch.from_numpy(((x - mean[:, None, None]) / std[:, None, None]).astype(np.float32))

    return Dataset(name=name, x_train=norm(x_train), y_train=torch.from_numpy(y_train.astype(np.int64)),
                   x_test=norm(x_test), y_test=torch.from_numpy(y_test.astype(np.int64)),
                   num_classes=num_classes, mean=tuple(map(float, mean)), std=tuple(map(float, std)))


def _check_classes(name, y_train, y_test, num_classes) -> None:
    present = np.unique(y_train)
    if len(present) < 2:
        raise CcamergeError(f"{name}: y_train has {len(present)} class(es); need at least 2")
    absent = sorted(set(range(num_classes)) - set(present.tolist()))
    if absent:
        raise CcamergeError(f"{name}: labels must be 0..K-1 with every class in y_train, but "
                            f"classes {absent[:10]} never occur there (K={num_classes})")


def split_indices(y: np.ndarray | torch.Tensor, kind: str, *, parts: int, part: int,
                  seed: int = 0) -> np.ndarray:
    """Sorted int64 indices ``[M]`` into the training labels ``y`` ``[N]`` for one part of a split.

    ``"same"``: every index. ``"skewed"`` (``parts=2``): part 0 gets 80% of each class in the first
    half of the classes and 20% of each other class; part 1 the rest. ``"dirichlet"``: each class is
    divided over ``parts`` with proportions drawn from Dirichlet(0.5). Parts are disjoint, cover
    every index, are never empty, and depend only on ``y``, ``parts`` and ``seed``.
    """
    labels = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y).reshape(-1)
    if kind not in SPLITS:
        raise CcamergeError(f"unknown split {kind!r}; choose one of {list(SPLITS)}")
    if not (isinstance(parts, int | np.integer) and parts >= 1 and 0 <= part < parts):
        raise CcamergeError(f"split needs parts >= 1 and 0 <= part < parts (got parts={parts}, "
                            f"part={part})")
    if kind == "same":
        return np.arange(len(labels), dtype=np.int64)
    assignment = (_skewed_assignment(labels, parts, seed) if kind == "skewed"
                  else _dirichlet_assignment(labels, parts, seed))
    return np.flatnonzero(assignment == part).astype(np.int64)


def _skewed_assignment(labels: np.ndarray, parts: int, seed: int) -> np.ndarray:
    """Part (0 or 1) of every sample ``[N]`` for the paper's 80/20 class-skewed halves."""
    if parts != 2:
        raise CcamergeError(f"the skewed split has exactly 2 parts (got parts={parts}); use "
                            "'dirichlet' for more models")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    first_half = set(classes[: (len(classes) + 1) // 2].tolist())
    assignment = np.ones(len(labels), dtype=np.int64)
    for cls in classes:
        members = rng.permutation(np.flatnonzero(labels == cls))
        share = 0.8 if cls in first_half else 0.2
        assignment[members[: int(round(share * len(members)))]] = 0
    return assignment


def _dirichlet_assignment(labels: np.ndarray, parts: int, seed: int) -> np.ndarray:
    """Part of every sample ``[N]``: each class split over parts by Dirichlet(0.5) proportions."""
    if len(labels) < parts:
        raise CcamergeError(f"cannot divide {len(labels)} samples into {parts} non-empty parts")
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        proportions = rng.dirichlet(np.full(parts, 0.5))
        cuts = np.round(np.cumsum(proportions)[:-1] * len(members)).astype(int)
        for index, chunk in enumerate(np.split(members, cuts)):
            assignment[chunk] = index
    counts = np.bincount(assignment, minlength=parts)
    for empty in np.flatnonzero(counts == 0):  # move one sample from the largest part
        donor = int(np.argmax(counts))
        assignment[np.flatnonzero(assignment == donor)[0]] = empty
        counts[donor] -= 1
        counts[empty] += 1
    return assignment


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random disjoint ``(train_idx, val_idx)`` (sorted int64) over ``range(n)``, with
    ``round(fraction * n)`` (at least 1) validation indices, for selecting hyperparameters."""
    if not 0.0 < fraction < 1.0:
        raise CcamergeError(f"holdout fraction must be between 0 and 1 (got {fraction})")
    n_val = max(1, int(round(fraction * n)))
    if n_val >= n:
        raise CcamergeError(f"cannot hold out {fraction:.0%} of {n} samples and keep some to train")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]).astype(np.int64), np.sort(order[:n_val]).astype(np.int64)

