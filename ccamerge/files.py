"""Safe file access for paths a user (or a stranger's recipe) names.

- Only regular files are read: :func:`regular_file` checks with ``os.stat`` (symbolic links
  followed) before anything opens the path, so a FIFO never blocks and ``/dev/zero`` is never read,
  and applies a size cap where a format has one.
- Outputs never replace an input: :func:`check_not_input` compares the resolved paths and the
  inodes (``st_dev``, ``st_ino``), so a symbolic or hard link to an input is caught too.
- Outputs are written atomically (:func:`write_atomically`): a temporary file in the same folder,
  flushed to disk, then renamed over the target; on any error (Ctrl-C included) the temporary file
  is removed and the target is left as it was. OS errors name the user's path, never the
  temporary file.
- Zip containers (``.pt``, TorchScript archives, ``.npz``) declare the size of every member;
  :func:`check_zip_sizes` refuses one whose members would unpack to more than allowed.

Every refusal is a :class:`~ccamerge.errors.CcamergeError` with one line that names the path.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

from ccamerge.errors import CcamergeError

MAX_RECIPE_BYTES = 16 * 2**20  # a recipe (.json) or a metadata file inside an archive
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def regular_file(path: str | os.PathLike, *, what: str = "file",
                 max_bytes: int | None = None) -> os.stat_result:
    """``os.stat(path)`` (links followed) after checking that ``path`` is an existing regular file
    of at most ``max_bytes`` bytes; raises :class:`CcamergeError` naming ``what`` and ``path``."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        broken = os.path.islink(path)
        raise CcamergeError(f"{what} {path} " + ("is a symbolic link to a missing file" if broken
                                                 else "does not exist")) from None
    except OSError as exc:
        raise CcamergeError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a regular file")
        raise CcamergeError(f"{what} {path} is {kind}, not a regular file; pass a file")
    if max_bytes is not None and info.st_size > max_bytes:
        raise CcamergeError(f"{what} {path} is {info.st_size:,} bytes, over the "
                            f"{max_bytes:,}-byte limit")
    return info


def read_bytes(path: str | os.PathLike, *, what: str = "file", max_bytes: int) -> bytes:
    """The content of the regular file ``path`` (at most ``max_bytes``), read once."""
    regular_file(path, what=what, max_bytes=max_bytes)
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise CcamergeError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:  # it grew after the check
        raise CcamergeError(f"{what} {path} is over the {max_bytes:,}-byte limit")
    return data


def sha256_file(path: str | os.PathLike, chunk: int = 2**20) -> str:
    """Hex sha256 of a file's bytes, read in chunks of ``chunk`` bytes."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(chunk), b""):
                digest.update(block)
    except OSError as exc:
        raise CcamergeError(f"cannot read {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name one file: equal resolved paths, or (both existing) the same
    device and inode (a hard link or a symbolic link to it)."""
    try:
        if Path(a).resolve() == Path(b).resolve():
            return True
        first, second = os.stat(a), os.stat(b)
    except (OSError, RuntimeError):  # missing, or a loop of symbolic links
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def check_not_input(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], *,
                    flag: str = "--out") -> None:
    """Refuse an output path that names one of ``inputs`` (None entries are skipped)."""
    for source in inputs:
        if source is not None and same_file(out, source):
            same = "" if str(source) == str(out) else f" (the same file as {source})"
            raise CcamergeError(f"{flag} {out} is an input of this command{same}; ccamerge never "
                                "overwrites its inputs: choose another output path")


def check_writable_target(path: str | os.PathLike, *, flag: str = "--out") -> None:
    """Refuse an output path that is an existing folder or other non-regular file."""
    try:
        info = os.stat(path)
    except OSError:
        return
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a regular file")
        raise CcamergeError(f"{flag} {path} is {kind}; give the path of a file to write")


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` to a temporary file next to ``path``, flush it to disk, then rename it to
    ``path`` (readers never see a half-written file; on any error ``path`` is left as it was and
    the temporary file is removed). Parent folders are created. Returns ``Path(path)``."""
    path = Path(path)
    check_writable_target(path, flag="output")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        write(tmp)
        _finish(tmp, path)
        os.replace(tmp, path)
    except OSError as exc:
        raise CcamergeError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return path


def _finish(tmp: str, path: Path) -> None:
    """Give ``tmp`` the permissions a new file gets (``mkstemp`` makes it private) or those of
    the file it replaces, and flush it to disk."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    os.chmod(tmp, mode)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())


def check_zip_sizes(source, name: str, *, max_bytes: int, max_deflated: int = 0) -> None:
    """Refuse a zip (path or binary file) whose members declare more than ``max_bytes`` unpacked
    bytes in all, or whose compressed members declare more than ``max_deflated`` (PyTorch stores
    tensors uncompressed and compresses only small code files), before anything is unpacked: a
    zip bomb never reaches the unpacker. Not a zip: nothing to check (the loader says why)."""
    try:
        with zipfile.ZipFile(source) as archive:
            members = archive.infolist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return
    finally:
        if hasattr(source, "seek"):
            source.seek(0)
    total = sum(m.file_size for m in members)
    deflated = sum(m.file_size for m in members if m.compress_type != zipfile.ZIP_STORED)
    if total > max_bytes or deflated > max_deflated:
        what = (f"{total:,} bytes, over the {max_bytes:,}-byte limit" if total > max_bytes else
                f"{deflated:,} bytes of compressed members, over the {max_deflated:,} bytes "
                "PyTorch ever writes")
        raise CcamergeError(f"{name} would unpack to {what}; it was refused before unpacking")


def check_output_path(path: str | os.PathLike, *, folder: bool = False,
                      flag: str = "--out") -> None:
    """Before any work: ``path`` can be written, as a file (``folder`` False: not an existing
    folder) or as a folder (not an existing file), under a writable folder (created if missing)."""
    if os.path.lexists(path):
        is_dir = os.path.isdir(path)
        if folder and not is_dir:
            raise CcamergeError(f"{flag} {path} exists and is not a folder; give a folder for "
                                "the model files")
        if not folder:
            check_writable_target(path, flag=flag)
    parent = Path(path).absolute().parent if not folder else Path(path).absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CcamergeError(f"cannot write {flag} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CcamergeError(f"cannot write {flag} {path}: permission denied in {parent}")
