"""Image folders: ``root/train/<class>/*`` and ``root/test/<class>/*``, or ``root/<class>/*``
split into training and test images by a fixed seed (``TEST_FRACTION`` of every class).

Images are read with Pillow, converted to one channel count (1 grey, 3 RGB, 4 RGBA) and one size,
scaled to [0, 1] and standardised per channel with the training images' statistics (one pass at
load time). Without a declared ``image_shape`` every image must have the same size, and the
channel count is 1 when all images are grey, else 3. Classes are the folder names, sorted.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ccamerge.data.arrays import Normaliser, channel_moments, scaled
from ccamerge.data.dataset import Dataset
from ccamerge.data.sources import Batch, IndexedSource
from ccamerge.errors import CcamergeError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MODES = {1: "L", 3: "RGB", 4: "RGBA"}
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
TEST_FRACTION = 0.2
SPLIT_SEED = 0
READ_CHUNK = 256  # images decoded at a time for the normalisation pass

Files = tuple[list[str], np.ndarray]  # paths and their labels [N]


def list_images(root: Path) -> tuple[list[str], Files, Files]:
    """``(classes, (train paths, labels), (test paths, labels))`` of an image folder."""
    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir() != test_dir.is_dir():
        have, lack = ("train", "test") if train_dir.is_dir() else ("test", "train")
        raise CcamergeError(f"{root} has a {have}/ folder but no {lack}/ folder; give both "
                            f"({root}/train/<class>/ and {root}/test/<class>/) or put the class "
                            f"folders directly in {root}")
    if train_dir.is_dir():
        classes = class_folders(train_dir)
        train = _labelled_files(train_dir, classes, classes)
        test = _labelled_files(test_dir, class_folders(test_dir, minimum=1), classes)
        return classes, train, test
    classes = class_folders(root)
    return (classes, *_seeded_split(_labelled_files(root, classes, classes)))


def class_folders(folder: Path, *, minimum: int = 2) -> list[str]:
    """Sorted names of the visible sub-folders of ``folder``; fewer than ``minimum`` (none at
    all) is an error."""
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise CcamergeError(f"{folder} has no class folders; an image dataset needs one folder "
                            f"per class: {folder}/<class>/*.png (or train/<class>/ and "
                            "test/<class>/)")
    if len(names) < minimum:
        raise CcamergeError(f"{folder} has one class folder ({names[0]}); need at least "
                            f"{minimum} classes")
    return names


def _labelled_files(folder: Path, names: list[str], classes: list[str]) -> Files:
    paths, labels = [], []
    for name in names:
        if name not in classes:
            raise CcamergeError(f"{folder / name} is a class without training images; every "
                                f"test class needs a training folder (classes: {classes})")
        files = _images_in(folder / name)
        paths += files
        labels += [classes.index(name)] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def _images_in(folder: Path) -> list[str]:
    """Every visible file under ``folder`` (sorted); anything that is not an image is an error."""
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    for path in files:
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise CcamergeError(f"{path} is not an image file (expected "
                                f"{', '.join(IMAGE_EXTENSIONS)}); remove it from the dataset "
                                "folder")
    if not files:
        raise CcamergeError(f"class folder {folder} holds no images")
    return [str(p) for p in files]


def _seeded_split(files: Files) -> tuple[Files, Files]:
    """Hold out ``TEST_FRACTION`` of every class (rounded) with ``SPLIT_SEED``."""
    paths, labels = files
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.zeros(len(paths), dtype=bool)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        test[members[:int(round(TEST_FRACTION * len(members)))]] = True
    if not test.any() or test.all():
        raise CcamergeError(f"{len(paths)} images are too few to hold out {TEST_FRACTION:.0%} "
                            "for testing; add images or give train/ and test/ folders")
    pick = lambda mask: ([paths[i] for i in np.flatnonzero(mask)], labels[mask])  # noqa: E731
    return pick(~test), pick(test)


def _open(path: str):
    from PIL import Image

    try:
        return Image.open(path)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for foreign files
        raise CcamergeError(f"cannot read image {path} ({exc}); remove or replace the "
                            "file") from exc


def common_shape(paths: list[str], declared: tuple[int, int, int] | None) -> tuple[int, int, int]:
    """``(C, H, W)``: ``declared``, else from the images' headers (one size for all;
    1 channel when every image is grey, else 3). Every file's header is read."""
    sizes, grey = {}, True
    for path in paths:
        with _open(path) as image:
            sizes.setdefault(image.size, path)
            grey = grey and image.mode in GREY_MODES
    if declared is not None:
        return declared
    if len(sizes) > 1:
        (w1, h1), first = next(iter(sizes.items()))
        (w2, h2), other = list(sizes.items())[1]
        raise CcamergeError(f"images differ in size ({first} is {h1}x{w1}, {other} is {h2}x{w2}, "
                            f"{len(sizes)} sizes in all); resize them to one size or declare one: "
                            "load_dataset(folder, image_shape=(C, H, W))")
    (w, h), _ = next(iter(sizes.items()))
    return (1 if grey else 3), h, w


def check_image_shape(shape) -> tuple[int, int, int]:
    """A declared ``(C, H, W)`` with C in 1, 3, 4 (grey, RGB, RGBA) and positive H, W."""
    shape = tuple(int(d) for d in shape)
    if len(shape) != 3 or shape[0] not in MODES or min(shape) < 1:
        raise CcamergeError(f"image_shape must be (C, H, W) with C in {sorted(MODES)} and H, W "
                            f">= 1, got {list(shape)}")
    return shape


def read_image(path: str, shape: tuple[int, int, int]) -> np.ndarray:
    """One image as uint8 ``[C, H, W]``, converted and resized (bilinear) to ``shape``."""
    channels, height, width = shape
    with _open(path) as image:
        try:
            image = image.convert(MODES[channels])
            if image.size != (width, height):
                image = image.resize((width, height), resample=2)  # PIL.Image.BILINEAR
            pixels = np.asarray(image, dtype=np.uint8)
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt image data
            raise CcamergeError(f"cannot read image {path} ({exc}); remove or replace the "
                                "file") from exc
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


class ImageFileSource(IndexedSource):
    """Image files decoded per batch: ``paths`` ``[N]`` with ``labels`` ``[N]``, every image
    as ``shape`` ``(C, H, W)``, normalised by ``normaliser`` (None: raw uint8 values)."""

    def __init__(self, paths: list[str], labels: np.ndarray, shape: tuple[int, int, int],
                 normaliser: Normaliser | None, *, num_classes: int | None = None):
        self.paths, self.y, self.shape = paths, labels, shape
        self.normaliser, self.num_classes = normaliser, num_classes

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.shape

    def __len__(self) -> int:
        return len(self.paths)

    def raw(self, index: slice | np.ndarray) -> np.ndarray:
        """uint8 ``[B, C, H, W]`` of the images at ``index``."""
        rows = range(len(self.paths))[index] if isinstance(index, slice) else index
        return np.stack([read_image(self.paths[i], self.shape) for i in rows])

    def read(self, index: slice | np.ndarray) -> Batch:
        raw = self.raw(index)
        x = raw.astype(np.float32) if self.normaliser is None else self.normaliser(raw)
        return torch.from_numpy(x), torch.from_numpy(self.y[index])

    def labels(self) -> torch.Tensor:
        return torch.from_numpy(self.y)

    def scaled_chunks(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self), READ_CHUNK):
            yield scaled(self.raw(slice(start, start + READ_CHUNK)), 0.0, 255.0)


def image_folder_dataset(name: str, root: Path, image_shape=None) -> Dataset:
    """The dataset in image folder ``root`` (see the module docstring)."""
    if image_shape is not None:
        image_shape = check_image_shape(image_shape)
    classes, (train_paths, y_train), (test_paths, y_test) = list_images(root)
    shape = common_shape(train_paths + test_paths, image_shape)
    raw = ImageFileSource(train_paths, y_train, shape, None)
    mean, std = channel_moments(raw.scaled_chunks())
    std = np.where(std > 1e-8, std, 1.0)
    norm = Normaliser(0.0, 255.0, mean, std)
    train = ImageFileSource(train_paths, y_train, shape, norm)
    test = ImageFileSource(test_paths, y_test, shape, norm)
    return Dataset(name, train, test, len(classes), tuple(map(float, mean)),
                   tuple(map(float, std)))
