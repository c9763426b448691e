"""Image folders: layouts, the seeded split, declared shapes, normalisation, and bad folders."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ccamerge.data import load_dataset
from ccamerge.data.folders import SPLIT_SEED, TEST_FRACTION
from ccamerge.errors import CcamergeError


def _write(folder: Path, images: np.ndarray, labels: np.ndarray, *, start: int = 0) -> list[Path]:
    """Each uint8 image ``[H, W]`` or ``[H, W, 3]`` as ``folder/c<label>/<i>.png``."""
    paths = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True), start=start):
        path = folder / f"c{label}" / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def _grey(n: int, h: int = 5, w: int = 7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w)).astype(np.uint8)


def test_train_and_test_folders(tmp_path):
    train, test = _grey(30), _grey(9, seed=1)
    _write(tmp_path / "train", train, np.arange(30) % 3)
    _write(tmp_path / "test", test, np.arange(9) % 3)
    ds = load_dataset(str(tmp_path))
    assert ds.describe() == {"name": str(tmp_path), "train_size": 30, "test_size": 9,
                             "num_classes": 3, "image_shape": [1, 5, 7]}
    # files are read class by class in name order: class 0 holds images 0, 3, 6, ...
    order = np.concatenate([np.arange(k, 30, 3) for k in range(3)])
    raw = train[order].astype(np.float32) / 255.0
    assert ds.mean == pytest.approx((float(raw.mean(dtype=np.float64)),), rel=1e-12)
    assert ds.std == pytest.approx((float(raw.std(dtype=np.float64)),), rel=1e-12)
    assert np.allclose(ds.x_train.numpy()[:, 0], (raw - ds.mean[0]) / ds.std[0], atol=1e-6)
    assert ds.y_train.tolist() == [0] * 10 + [1] * 10 + [2] * 10


def test_class_folders_split_by_a_fixed_seed(tmp_path):
    _write(tmp_path, _grey(50), np.arange(50) % 5)
    ds = load_dataset(str(tmp_path))
    assert len(ds.train) == 40 and len(ds.test) == 10 and ds.num_classes == 5
    assert np.bincount(ds.y_test.numpy()).tolist() == [2] * 5  # TEST_FRACTION of every class
    again = load_dataset(str(tmp_path))
    assert again is ds  # cached until a file changes
    assert TEST_FRACTION == 0.2 and SPLIT_SEED == 0


def test_declared_shape_converts_channels_and_size(tmp_path):
    rng = np.random.default_rng(2)
    colour = rng.integers(0, 256, (6, 4, 6, 3)).astype(np.uint8)
    _write(tmp_path, colour, np.arange(6) % 2)
    _write(tmp_path, _grey(6, 9, 9), np.arange(6) % 2, start=6)  # another size, grey
    ds = load_dataset(str(tmp_path), image_shape=(3, 4, 6))
    assert ds.input_shape == (3, 4, 6) and len(ds.mean) == 3
    grey = load_dataset(str(tmp_path), image_shape=[1, 8, 8])
    assert grey.x_train.shape[1:] == (1, 8, 8)
    raw = np.concatenate([b for b, _ in _raw_batches(ds.train)])
    assert raw.shape[1:] == (3, 4, 6)


def _raw_batches(source):
    for start in range(0, len(source), 4):
        yield source.raw(slice(start, start + 4)), None


def test_colour_images_without_a_declared_shape(tmp_path):
    colour = np.random.default_rng(3).integers(0, 256, (10, 4, 6, 3)).astype(np.uint8)
    _write(tmp_path, colour, np.arange(10) % 2)
    ds = load_dataset(str(tmp_path))
    assert ds.input_shape == (3, 4, 6) and ds.in_channels == 3
    first = ds.train.raw(slice(0, 1))[0]  # class 0's first file is image 0
    assert np.array_equal(first, colour[0].transpose(2, 0, 1))


def _mixed_sizes(root: Path) -> None:
    _write(root, _grey(4), np.arange(4) % 2)
    _write(root, _grey(4, 6, 6), np.arange(4) % 2, start=4)


def _not_an_image(root: Path) -> None:
    _write(root, _grey(4), np.arange(4) % 2)
    (root / "c0" / "notes.txt").write_text("hello")


def _corrupt(root: Path) -> None:
    _write(root, _grey(4), np.arange(4) % 2)
    (root / "c1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")


def _flat(root: Path) -> None:
    Image.fromarray(_grey(1)[0]).save(root / "a.png")


def _one_class(root: Path) -> None:
    _write(root, _grey(4), np.zeros(4, dtype=int))


def _train_only(root: Path) -> None:
    _write(root / "train", _grey(4), np.arange(4) % 2)


def _empty_class(root: Path) -> None:
    _write(root, _grey(4), np.arange(4) % 2)
    (root / "c2").mkdir()


def _unknown_test_class(root: Path) -> None:
    _write(root / "train", _grey(4), np.arange(4) % 2)
    _write(root / "test", _grey(2), np.array([0, 5]))


def _too_few(root: Path) -> None:
    _write(root, _grey(2), np.array([0, 1]))


@pytest.mark.parametrize("make, message", [
    (_flat, "has no class folders; an image dataset needs one folder per class"),
    (_mixed_sizes, "images differ in size .* is 5x7, .* is 6x6.*image_shape"),
    (_not_an_image, "notes.txt is not an image file"),
    (_corrupt, "cannot read image .*broken.png"),
    (_one_class, "one class folder \\(c0\\); need at least 2"),
    (_train_only, "has a train/ folder but no test/ folder"),
    (_empty_class, "class folder .*c2 holds no images"),
    (_unknown_test_class, "c5 is a class without training images"),
    (_too_few, "too few to hold out"),
])
def test_bad_image_folders(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(CcamergeError, match=message):
        load_dataset(str(tmp_path))


def test_bad_declared_shapes(tmp_path):
    _write(tmp_path, _grey(4), np.arange(4) % 2)
    with pytest.raises(CcamergeError, match="C in \\[1, 3, 4\\]"):
        load_dataset(str(tmp_path), image_shape=(2, 5, 7))
    with pytest.raises(CcamergeError, match="image_shape applies to image folders"):
        load_dataset("digits", image_shape=(1, 8, 8))


def test_hidden_files_are_ignored(tmp_path):
    _write(tmp_path, _grey(10), np.arange(10) % 2)
    (tmp_path / "c0" / ".DS_Store").write_bytes(b"junk")
    assert len(load_dataset(str(tmp_path)).y_train) == 8
    assert torch.is_tensor(load_dataset(str(tmp_path)).x_test)
