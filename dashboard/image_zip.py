"""Image folders uploaded as a ``.zip`` (``root/<class>/*.png`` or ``root/train/...`` +
``root/test/...``), extracted safely into this session's folder for
:func:`ccamerge.data.load_dataset`'s image-folder source to read. No ``st.*`` here.

Only image files (:data:`ccamerge.data.IMAGE_EXTENSIONS`) are written; every entry's name is
checked before anything is extracted (no absolute paths, no ``..``, no links, no more than
:data:`MAX_ENTRIES` entries, at most :data:`MAX_BYTES` uncompressed, counted while inflating, so
a zip lying about its sizes is stopped too). A refused zip leaves nothing behind.
"""

from __future__ import annotations

import io
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

from ccamerge.data import IMAGE_EXTENSIONS
from ccamerge.errors import CcamergeError

MAX_ENTRIES = 20_000
MAX_BYTES = 512 * 2**20  # uncompressed
SKIPPED = ("__MACOSX",)  # folders archivers add that hold no images
_CHUNK = 2**20


def is_zip(filename: str) -> bool:
    return filename.lower().endswith(".zip")


def image_members(archive: zipfile.ZipFile, filename: str) -> list[zipfile.ZipInfo]:
    """The image entries of ``archive`` after checking every entry's name, kind and size."""
    infos = archive.infolist()
    if len(infos) > MAX_ENTRIES:
        raise CcamergeError(f"{filename} holds {len(infos)} entries, over the {MAX_ENTRIES} an "
                            "image folder upload may hold; load large folders with the ccamerge "
                            "CLI")
    images, total = [], 0
    for info in infos:
        parts = PurePosixPath(info.filename.replace("\\", "/")).parts
        if info.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise CcamergeError(f"{filename} has an entry outside its folder ({info.filename!r}); "
                                "zip the image folder itself")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise CcamergeError(f"{filename} holds a link ({info.filename!r}); zip the images "
                                "themselves")
        if info.is_dir() or any(p.startswith(".") or p in SKIPPED for p in parts):
            continue
        if info.filename.lower().endswith(IMAGE_EXTENSIONS):
            images.append(info)
            total += info.file_size
    if total > MAX_BYTES:
        raise CcamergeError(f"{filename} unpacks to {total / 2**20:.0f} MB, over the "
                            f"{MAX_BYTES / 2**20:.0f} MB an image folder upload may take")
    if not images:
        raise CcamergeError(f"{filename} holds no images ({', '.join(IMAGE_EXTENSIONS[:3])}...); "
                            "an image dataset is a zip of root/<class>/*.png")
    return images


def unpacked_size(content: bytes, filename: str) -> int:
    """Bytes the images of the zip ``content`` take once extracted (as its entries declare)."""
    with _open(content, filename) as archive:
        return sum(i.file_size for i in image_members(archive, filename))


def extract_images(content: bytes, filename: str, folder: Path) -> Path:
    """Extract the images of the zip ``content`` into the new folder ``folder`` and return the
    dataset's root: ``folder``, or its single top-level sub-folder when the zip holds one
    folder (``flowers/<class>/...``). On any problem ``folder`` is removed and a CcamergeError
    names ``filename``."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    try:
        with _open(content, filename) as archive:
            written = 0
            for info in image_members(archive, filename):
                written = _extract_one(archive, info, folder, written, filename)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return dataset_root(folder)


def dataset_root(folder: Path) -> Path:
    """``folder``, or its one sub-folder when that is all it holds (a zipped ``root/``)."""
    children = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(children) == 1 and children[0].is_dir() and not any(
            p.is_dir() for p in [folder / "train", folder / "test"]):
        inner = children[0]
        if any(p.is_dir() for p in inner.iterdir()):
            return inner
    return folder


def _open(content: bytes, filename: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(content))
    except (zipfile.BadZipFile, OSError) as exc:
        raise CcamergeError(f"{filename} is not a valid zip file ({exc})") from None


def _extract_one(archive: zipfile.ZipFile, info: zipfile.ZipInfo, folder: Path, written: int,
                 filename: str) -> int:
    """Inflate one entry into ``folder`` (at most :data:`MAX_BYTES` in all); returns the bytes
    written so far."""
    target = folder.joinpath(*PurePosixPath(info.filename.replace("\\", "/")).parts)
    if not target.resolve().is_relative_to(folder.resolve()):
        raise CcamergeError(f"{filename} has an entry outside its folder ({info.filename!r})")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with archive.open(info) as source, open(target, "xb") as out:
            while chunk := source.read(_CHUNK):
                written += len(chunk)
                if written > MAX_BYTES:
                    raise CcamergeError(f"{filename} unpacks to more than "
                                        f"{MAX_BYTES / 2**20:.0f} MB, the most an image folder "
                                        "upload may take")
                out.write(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as exc:
        raise CcamergeError(f"{filename}: cannot extract {info.filename} ({exc})") from None
    return written
