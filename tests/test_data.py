import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ccamerge import data
from ccamerge.data import (
    Dataset,
    available_datasets,
    holdout_split,
    load_dataset,
    read_idx,
    split_indices,
)
from ccamerge.errors import CcamergeError


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def test_digits_shapes_and_normalisation(digits):
    assert digits.x_train.shape == (1437, 1, 8, 8) and digits.x_test.shape == (360, 1, 8, 8)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert digits.num_classes == 10 and digits.in_channels == 1 and digits.image_size == 8
    assert abs(float(digits.x_train.mean())) < 1e-4
    assert abs(float(digits.x_train.std()) - 1.0) < 1e-3
    assert sorted(digits.y_test.unique().tolist()) == list(range(10))
    description = digits.describe()
    assert json.loads(json.dumps(description)) == {
        "name": "digits", "train_size": 1437, "test_size": 360, "num_classes": 10,
        "image_shape": [1, 8, 8]}


def test_digits_split_is_fixed_and_stratified(digits):
    data._load_cached.cache_clear()
    again = load_dataset("digits")
    assert again is not digits
    assert torch.equal(again.x_train, digits.x_train) and torch.equal(again.y_test, digits.y_test)
    counts = np.bincount(digits.y_test.numpy())
    assert counts.min() >= 35 and counts.max() <= 37
    assert load_dataset("digits") is again  # cached in-process


def test_unknown_dataset_lists_choices():
    with pytest.raises(CcamergeError, match="digits.*fashion-mnist"):
        load_dataset("cifar-1000")
    assert "digits" in available_datasets()


# -- user .npz files ---------------------------------------------------------------------------

def _arrays(n_train=40, n_test=20, size=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, size, size)).astype(np.uint8),
        "y_train": np.arange(n_train) % classes,
        "x_test": rng.integers(0, 256, (n_test, size, size)).astype(np.uint8),
        "y_test": np.arange(n_test) % classes,
    }


def _save(tmp_path: Path, name="d.npz", **arrays) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def test_npz_gray_and_channels(tmp_path):
    ds = load_dataset(_save(tmp_path, **_arrays()))
    assert ds.x_train.shape == (40, 1, 6, 6) and ds.num_classes == 3
    assert abs(float(ds.x_train.mean())) < 1e-5
    rgb = _arrays()
    rgb["x_train"] = np.random.default_rng(1).normal(5, 3, (40, 3, 6, 6))
    rgb["x_test"] = np.random.default_rng(2).normal(5, 3, (20, 3, 6, 6))
    ds = load_dataset(_save(tmp_path, "rgb.npz", **rgb))
    assert ds.in_channels == 3 and ds.image_size == 6
    per_channel = ds.x_train.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(per_channel.std(1), torch.ones(3), atol=1e-2)


def test_npz_cache_follows_file_changes(tmp_path):
    path = _save(tmp_path, **_arrays())
    first = load_dataset(path)
    assert load_dataset(path) is first
    _save(tmp_path, **_arrays(n_train=30))
    assert len(load_dataset(path).y_train) == 30


def _bad(case: str) -> dict:
    arrays = _arrays()
    if case == "missing":
        del arrays["y_test"]
    elif case == "2d":
        arrays["x_train"] = arrays["x_train"].reshape(40, 36)
    elif case == "5d":
        arrays["x_train"] = np.zeros((40, 1, 1, 6, 6))
    elif case == "nan":
        arrays["x_train"] = arrays["x_train"].astype(float)
        arrays["x_train"][0, 0, 0] = np.nan
    elif case == "strings":
        arrays["y_train"] = np.array(["a"] * 40)
    elif case == "fractional":
        arrays["y_train"] = arrays["y_train"] + 0.5
    elif case == "negative":
        arrays["y_train"] = arrays["y_train"] - 1
    elif case == "count":
        arrays["y_train"] = arrays["y_train"][:-1]
    elif case == "shapes":
        arrays["x_test"] = np.zeros((20, 5, 5))
    elif case == "one_class":
        arrays["y_train"] = np.zeros(40, dtype=int)
        arrays["y_test"] = np.zeros(20, dtype=int)
    elif case == "gap":
        arrays["y_train"] = np.where(arrays["y_train"] == 1, 2, arrays["y_train"])
    elif case == "label_shape":
        arrays["y_train"] = arrays["y_train"].reshape(40, 1)
    return arrays


@pytest.mark.parametrize("case, message", [
    ("missing", "lacks y_test"),
    ("2d", "x_train samples are \\[36\\] but x_test images are \\[1, 6, 6\\]"),
    ("5d", "x_train has shape \\[40, 1, 1, 6, 6\\]; expected \\[N, F\\]"),
    ("nan", "x_train contains NaN"),
    ("strings", "y_train has dtype"),
    ("fractional", "y_train holds non-integer"),
    ("negative", "y_train holds negative"),
    ("count", "x_train has 40 images but y_train has 39"),
    ("shapes", "x_train images are .* but x_test"),
    ("one_class", "at least 2"),
    ("gap", "classes \\[1\\] never occur"),
    ("label_shape", "y_train has shape"),
])
def test_npz_validation(tmp_path, case, message):
    with pytest.raises(CcamergeError, match=message):
        load_dataset(_save(tmp_path, f"{case}.npz", **_bad(case)))


def test_npz_object_array_and_garbage_refused(tmp_path):
    arrays = _arrays()
    arrays["y_train"] = np.array([object()] * 40, dtype=object)
    path = tmp_path / "obj.npz"
    np.savez(path, **arrays)  # needs pickle to read back, which load_dataset refuses
    with pytest.raises(CcamergeError, match="y_train"):
        load_dataset(str(path))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(CcamergeError, match="cannot read"):
        load_dataset(str(garbage))
    with pytest.raises(CcamergeError, match="does not exist"):
        load_dataset(str(tmp_path / "absent.npz"))


# -- Fashion-MNIST idx files ---------------------------------------------------------------------

def _write_idx(path: Path, array: np.ndarray, *, magic: bytes | None = None, cut: int = 0) -> None:
    header = magic or bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(payload[:len(payload) - cut])


def _tiny_fashion(folder: Path) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 4, 4)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_fashion_mnist_from_data_dir(tmp_path):
    _tiny_fashion(tmp_path)
    ds = load_dataset("fashion-mnist", data_dir=str(tmp_path))
    assert ds.x_train.shape == (30, 1, 4, 4) and ds.x_test.shape == (10, 1, 4, 4)
    assert ds.num_classes == 10 and ds.name == "fashion-mnist"
    assert ds.y_train[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_idx_errors(tmp_path):
    bad_magic = tmp_path / "magic.gz"
    _write_idx(bad_magic, np.zeros((2, 2, 2)), magic=bytes([1, 2, 3, 3]))
    with pytest.raises(CcamergeError, match="bad magic"):
        read_idx(bad_magic)
    truncated = tmp_path / "cut.gz"
    _write_idx(truncated, np.zeros((2, 2, 2)), cut=3)
    with pytest.raises(CcamergeError, match="truncated"):
        read_idx(truncated)
    with pytest.raises(CcamergeError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path / "nowhere"))


@pytest.mark.skipif(data._find_fashion_dir(None) is None,
                    reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_debian_package():
    ds = load_dataset("fashion-mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10 and "fashion-mnist" in available_datasets()


# -- splits ---------------------------------------------------------------------------------------

def test_same_split_is_everything(digits):
    assert np.array_equal(split_indices(digits.y_train, "same", parts=1, part=0), np.arange(1437))


def test_skewed_split(digits):
    y = digits.y_train.numpy()
    part0 = split_indices(y, "skewed", parts=2, part=0)
    part1 = split_indices(digits.y_train, "skewed", parts=2, part=1)
    assert part0.dtype == np.int64 and np.all(np.diff(part0) > 0)
    assert not set(part0) & set(part1)
    assert np.array_equal(np.sort(np.concatenate([part0, part1])), np.arange(len(y)))
    share = np.bincount(y[part0], minlength=10) / np.bincount(y, minlength=10)  # [10]
    assert np.allclose(share[:5], 0.8, atol=0.01) and np.allclose(share[5:], 0.2, atol=0.01)
    with pytest.raises(CcamergeError, match="exactly 2 parts"):
        split_indices(y, "skewed", parts=3, part=0)


def test_dirichlet_split(digits):
    y = digits.y_train.numpy()
    parts = [split_indices(y, "dirichlet", parts=4, part=k, seed=3) for k in range(4)]
    assert all(len(p) > 0 for p in parts)
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(len(y))) and len(joined) == len(y)
    again = split_indices(y, "dirichlet", parts=4, part=2, seed=3)
    assert np.array_equal(again, parts[2])
    assert not np.array_equal(split_indices(y, "dirichlet", parts=4, part=2, seed=4), parts[2])
    tiny = np.array([0, 0, 0, 1, 1])  # many parts on few samples: still non-empty
    assert all(len(split_indices(tiny, "dirichlet", parts=5, part=k)) == 1 for k in range(5))


def test_split_errors():
    y = np.arange(10) % 2
    with pytest.raises(CcamergeError, match="unknown split.*same"):
        split_indices(y, "random", parts=2, part=0)
    with pytest.raises(CcamergeError, match="part"):
        split_indices(y, "dirichlet", parts=2, part=2)


def test_holdout_split():
    train, val = holdout_split(100, 0.2, seed=1)
    assert len(val) == 20 and len(train) == 80 and not set(train) & set(val)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(100))
    assert np.array_equal(holdout_split(100, 0.2, seed=1)[1], val)
    with pytest.raises(CcamergeError):
        holdout_split(100, 1.5, seed=0)


# -- feature vectors, any image shape, lazy reading ------------------------------------------------

def test_npz_feature_vectors_are_standardised_per_feature(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.normal(3, 2, (60, 48)), "y_train": np.arange(60) % 6,
              "x_test": rng.normal(3, 2, (30, 48)), "y_test": np.arange(30) % 6}
    ds = load_dataset(_save(tmp_path, "tab.npz", **arrays))
    assert ds.input_shape == (48,) and ds.in_channels is None and ds.image_size is None
    assert ds.describe() == {"name": str(tmp_path / "tab.npz"), "train_size": 60, "test_size": 30,
                             "num_classes": 6, "input_shape": [48]}
    assert len(ds.mean) == 48 and ds.x_train.shape == (60, 48)
    low, high = arrays["x_train"].min(), arrays["x_train"].max()
    scaled = (arrays["x_train"].astype(np.float32) - low) / (high - low)
    expected = (scaled - scaled.mean(0)) / scaled.std(0)  # numpy's own per-feature statistics
    assert np.allclose(ds.x_train.numpy(), expected, atol=1e-5)
    assert np.allclose(ds.mean, scaled.mean(0, dtype=np.float64), rtol=1e-12)


def test_npz_non_square_images_are_streamed_from_a_memory_map(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {"x_train": rng.integers(0, 256, (40, 3, 6, 8)).astype(np.uint8),
              "y_train": np.arange(40) % 4,
              "x_test": rng.integers(0, 256, (12, 3, 6, 8)).astype(np.uint8),
              "y_test": np.arange(12) % 4}
    ds = load_dataset(_save(tmp_path, "img.npz", **arrays))
    assert ds.input_shape == (3, 6, 8) and ds.in_channels == 3 and ds.image_size is None
    assert isinstance(ds.train.x, np.memmap)  # nothing read into memory at load time
    per_channel = ds.x_train.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-5)
    raw = arrays["x_test"].astype(np.float32) / 255.0
    mean, std = np.asarray(ds.mean)[:, None, None], np.asarray(ds.std)[:, None, None]
    assert np.allclose(ds.x_test.numpy(), (raw - mean) / std, atol=1e-5)


def test_compressed_npz_is_read_whole_below_the_limit(tmp_path, monkeypatch):
    from ccamerge.data import npz

    path = tmp_path / "c.npz"
    np.savez_compressed(path, **_arrays())
    plain = load_dataset(_save(tmp_path, "p.npz", **_arrays()))
    packed = load_dataset(str(path))
    assert not isinstance(packed.train.x, np.memmap)
    assert torch.equal(packed.x_train, plain.x_train) and packed.mean == plain.mean
    monkeypatch.setattr(npz, "INFLATE_LIMIT", 100)
    data._load_cached.cache_clear()
    with pytest.raises(CcamergeError, match="x_train is compressed .* np.savez"):
        load_dataset(str(path))


def test_rewritten_npz_is_refused_instead_of_crashing(tmp_path):
    path = _save(tmp_path, **_arrays())
    ds = load_dataset(path)
    _save(tmp_path, **_arrays(n_train=30))  # rewritten in place under the memory map
    with pytest.raises(CcamergeError, match="changed on disk"):
        ds.x_train  # noqa: B018


def test_npy_folder_matches_the_same_arrays_in_an_npz(tmp_path):
    arrays = _arrays(size=5)
    folder = tmp_path / "arrays"
    folder.mkdir()
    for key, value in arrays.items():
        np.save(folder / f"{key}.npy", value)
    ds, same = load_dataset(str(folder)), load_dataset(_save(tmp_path, **arrays))
    assert isinstance(ds.train.x, np.memmap) and ds.describe()["train_size"] == 40
    assert torch.equal(ds.x_train, same.x_train) and torch.equal(ds.y_test, same.y_test)
    (folder / "y_test.npy").unlink()
    with pytest.raises(CcamergeError, match="lacks y_test.npy"):
        load_dataset(str(folder))
    np.save(folder / "y_test.npy", np.array([object()] * 20, dtype=object))
    with pytest.raises(CcamergeError, match="y_test is not a plain numeric array"):
        load_dataset(str(folder))
