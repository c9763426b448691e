"""Image folders uploaded as .zip: what is extracted, where the dataset's root is, and every
refusal leaving nothing behind (links, paths outside the folder, too many entries, zip bombs)."""

from __future__ import annotations

import io
import stat
import zipfile

import numpy as np
import pytest
from PIL import Image

from ccamerge.data import load_dataset
from ccamerge.errors import CcamergeError
from dashboard import data, image_zip, registry


def png(seed: int, side: int = 6) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def zipped(entries: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def classes(prefix: str = "", n: int = 5) -> dict[str, bytes]:
    return {f"{prefix}{c}/{k}.png": png(10 * i + k) for i, c in enumerate(("cat", "dog"))
            for k in range(n)}


@pytest.mark.parametrize("prefix", ["", "animals/"])
def test_a_zipped_image_folder_loads_as_the_folder_would(tmp_path, prefix):
    content = zipped(classes(prefix) | {f"{prefix}README.txt": b"x", "__MACOSX/._a.png": b"x",
                                        f"{prefix}.DS_Store": b"x"})
    folder = tmp_path / "session" / "one"
    root = image_zip.extract_images(content, "animals.zip", folder)
    assert root == folder / prefix.rstrip("/")  # a zipped root/ folder is the root
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == sorted(classes())  # the images only
    reference = tmp_path / "plain"
    for name, blob in classes().items():
        (reference / name).parent.mkdir(parents=True, exist_ok=True)
        (reference / name).write_bytes(blob)
    mine, theirs = load_dataset(str(root)), load_dataset(str(reference))
    assert mine.input_shape == theirs.input_shape == (1, 6, 6) and mine.num_classes == 2
    assert np.array_equal(mine.x_train.numpy(), theirs.x_train.numpy())


@pytest.mark.parametrize(("entries", "links", "expected"), [
    ({"cat/a.png": b"x", "../evil.png": b"x"}, (), "entry outside its folder"),
    ({"/abs/evil.png": b"x"}, (), "entry outside its folder"),
    ({"cat/a.png": b"x"}, ("dog/b.png",), "holds a link"),
    ({"notes.txt": b"x"}, (), "holds no images"),
])
def test_hostile_or_empty_zips_are_refused_and_leave_nothing(tmp_path, entries, links, expected):
    folder = tmp_path / "out"
    with pytest.raises(CcamergeError, match=expected):
        image_zip.extract_images(zipped(entries, links), "up.zip", folder)
    assert not folder.exists() and not (tmp_path / "evil.png").exists()


def test_too_many_entries_and_zip_bombs_are_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(image_zip, "MAX_ENTRIES", 3)
    with pytest.raises(CcamergeError, match="holds 10 entries, over the 3"):
        image_zip.extract_images(zipped(classes()), "many.zip", tmp_path / "a")
    monkeypatch.setattr(image_zip, "MAX_ENTRIES", 100)
    monkeypatch.setattr(image_zip, "MAX_BYTES", 10_000)
    bomb = zipped({"cat/a.png": b"\0" * 20_000, "dog/b.png": b"\0"})
    with pytest.raises(CcamergeError, match="unpacks to"):
        image_zip.extract_images(bomb, "bomb.zip", tmp_path / "b")
    assert not (tmp_path / "b").exists()
    with pytest.raises(CcamergeError, match="is not a valid zip file"):
        image_zip.extract_images(b"PK not really", "fake.zip", tmp_path / "c")


def test_a_zip_lying_about_its_sizes_is_stopped_while_inflating(tmp_path, monkeypatch):
    content = bytearray(zipped({"cat/a.png": b"\0" * 50_000, "dog/b.png": b"\0"}))
    monkeypatch.setattr(image_zip, "MAX_BYTES", 10_000)
    monkeypatch.setattr(image_zip, "image_members",
                        lambda archive, name: archive.infolist())  # trusts declared sizes
    with pytest.raises(CcamergeError, match="more than"):
        image_zip.extract_images(bytes(content), "liar.zip", tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_a_dataset_zip_counts_against_the_session_budget(tmp_path, monkeypatch):
    session = tmp_path / "session"
    session.mkdir()
    monkeypatch.setattr(data, "SESSION_UPLOAD_BYTES", 100)
    with pytest.raises(CcamergeError, match="budget per session"):
        registry.add_dataset_upload({}, "pets.zip", zipped(classes()), session)
    assert list(session.iterdir()) == []
    monkeypatch.setattr(data, "SESSION_UPLOAD_BYTES", 2**30)
    datasets: dict = {}
    entry = registry.add_dataset_upload(datasets, "pets.zip", zipped(classes()), session)
    assert entry.kind == "images" and entry.recipe_name == "pets"
    assert entry.prepare == "unzip pets.zip -d pets" and entry.key.startswith("zip:")
    assert load_dataset(registry.dataset_path(entry.key, datasets)).num_classes == 2
