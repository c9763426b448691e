"""``.npz`` files and folders of ``.npy`` files, opened without reading the inputs into memory.

An uncompressed ``.npz`` (``np.savez``) stores each array as a plain ``.npy`` member, which is
memory mapped in place; a compressed one (``np.savez_compressed``) must be inflated, so its
arrays are read whole, up to ``INFLATE_LIMIT`` bytes each. A folder with ``x_train.npy,
y_train.npy, x_test.npy, y_test.npy`` is memory mapped file by file. Pickled (object) arrays are
refused.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np

from ccamerge.data.arrays import KEYS, FileGuard, array_dataset
from ccamerge.data.dataset import Dataset
from ccamerge.errors import CcamergeError

INFLATE_LIMIT = 1 << 30  # bytes of one compressed array read whole; larger ones are refused
BOMB_RATIO, BOMB_FLOOR = 100, 64 << 20  # above the floor, a member may unpack to 100x its size
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0,
                   (3, 0): np.lib.format.read_array_header_2_0}  # 3.0: utf8 names, same layout


def load_npz(name: str, path: str) -> Dataset:
    """The dataset in an ``.npz`` holding ``x_train, y_train, x_test, y_test``."""
    return array_dataset(name, open_npz(name, path), FileGuard([path]))


def open_npz(name: str, path: str) -> dict[str, np.ndarray]:
    """The four arrays of ``path``: memory maps for stored members, arrays for compressed."""
    try:
        with zipfile.ZipFile(path) as archive:
            found = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
            missing = [k for k in KEYS if k not in found]
            if missing:
                raise CcamergeError(f"{name} lacks {', '.join(missing)}; an .npz dataset needs "
                                    f"arrays {', '.join(KEYS)} (found {found})")
            return {k: _member(archive, path, name, k) for k in KEYS}
    except CcamergeError:
        raise
    except Exception as exc:  # zipfile / format errors from an untrusted file
        raise CcamergeError(f"cannot read {name} as an .npz file: {exc}") from exc


def _member(archive: zipfile.ZipFile, path: str, name: str, key: str) -> np.ndarray:
    info = archive.getinfo(f"{key}.npy")
    with archive.open(info) as member:
        shape, fortran, dtype = _read_header(member, name, key)
        offset = member.tell()
    if info.compress_type != zipfile.ZIP_STORED:
        return _inflate(archive, info, name, key)
    expected = int(np.prod(shape)) * dtype.itemsize
    if info.file_size - offset != expected:
        raise CcamergeError(f"{name}: {key} is truncated or corrupt (header says shape "
                            f"{list(shape)}, {expected} bytes, but {info.file_size - offset} "
                            "follow)")
    if expected == 0:
        return np.empty(shape, dtype)
    start = _data_start(path, info) + offset
    return np.memmap(path, dtype=dtype, mode="r", offset=start, shape=shape,
                     order="F" if fortran else "C")


def _read_header(member, name: str, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype from an ``.npy`` header; object dtypes are refused."""
    version = np.lib.format.read_magic(member)
    if version not in _HEADER_READERS:
        raise CcamergeError(f"{name}: {key} has .npy format version {version}, unsupported")
    shape, fortran, dtype = _HEADER_READERS[version](member)
    if dtype.hasobject:
        raise CcamergeError(f"{name}: {key} is not a plain numeric array (it holds Python "
                            "objects, which would need pickle; save numbers only)")
    return tuple(shape), fortran, dtype


def _inflate(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, key: str) -> np.ndarray:
    """A compressed member read whole (below ``INFLATE_LIMIT`` bytes unpacked)."""
    if info.file_size > INFLATE_LIMIT:
        raise CcamergeError(f"{name}: {key} is compressed and {info.file_size / 2**20:.0f} MB "
                            f"unpacked (limit {INFLATE_LIMIT / 2**20:.0f} MB); save it with "
                            "np.savez (uncompressed, streamed from disk) or as a folder of .npy "
                            "files")
    if info.file_size > BOMB_FLOOR and info.file_size > BOMB_RATIO * max(info.compress_size, 1):
        raise CcamergeError(f"{name}: {key} would unpack from {info.compress_size:,} to "
                            f"{info.file_size:,} bytes (over {BOMB_RATIO}x, a zip bomb?); save "
                            "real data with np.savez or as a folder of .npy files")
    with archive.open(info) as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def _data_start(path: str, info: zipfile.ZipInfo) -> int:
    """Byte offset in ``path`` where the member's data begins (after its local header)."""
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local = handle.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise CcamergeError(f"{path}: bad zip entry for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def is_npy_folder(folder: Path) -> bool:
    """A folder holding at least one of ``x_train.npy ... y_test.npy``."""
    return any((folder / f"{k}.npy").is_file() for k in KEYS)


def npy_paths(folder: Path) -> list[Path]:
    """The four files of an ``.npy`` dataset folder, in ``KEYS`` order."""
    return [folder / f"{k}.npy" for k in KEYS]


def load_npy_folder(name: str, folder: Path) -> Dataset:
    """The dataset in ``folder``/``x_train.npy``, ``y_train.npy``, ``x_test.npy``,
    ``y_test.npy`` (memory mapped)."""
    missing = [p.name for p in npy_paths(folder) if not p.is_file()]
    if missing:
        raise CcamergeError(f"{name} lacks {', '.join(missing)}; an .npy dataset folder needs "
                            f"{', '.join(p.name for p in npy_paths(folder))}")
    arrays = {k: _open_npy(folder / f"{k}.npy", name, k) for k in KEYS}
    return array_dataset(name, arrays, FileGuard(npy_paths(folder)))


def _open_npy(path: Path, name: str, key: str) -> np.ndarray:
    try:
        with open(path, "rb") as handle:
            shape, _fortran, dtype = _read_header(handle, name, key)
        if int(np.prod(shape)) == 0:
            return np.empty(shape, dtype)
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except CcamergeError:
        raise
    except Exception as exc:  # a truncated or foreign file
        raise CcamergeError(f"cannot read {path} as an .npy array: {exc}") from exc
