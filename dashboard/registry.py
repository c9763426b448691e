"""The models and datasets one session has loaded, and the checks an upload goes through.

Functions here take and return plain values (dicts of entries, bytes, paths) so tests call them
directly; the pages keep the dicts in ``st.session_state``. A failed upload raises
:class:`CcamergeError` before anything is added, so what was loaded stays as it was.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ccamerge import api
from ccamerge.errors import CcamergeError
from ccamerge.io import load_model_bytes, model_summary, save_model
from ccamerge.models import count_parameters, same_architecture
from dashboard import archives, data

MODEL_SUFFIXES = (".safetensors", ".pt", ".pth", ".ts", ".torchscript")


@dataclass(frozen=True)
class ModelEntry:
    """One loaded model. ``path`` is a file with these weights (the demo cache or this session's
    private folder): a ``.safetensors`` a recipe can name (a ``.pt`` upload converted), or a
    TorchScript archive. An upload is held once, as that file; ``file_digest`` is its sha256
    when it differs from ``digest`` (the sha256 of the uploaded bytes, e.g. of a ``.pt``)."""

    id: str
    digest: str
    name: str
    filename: str
    kind: str  # "demo" or "upload"
    path: str
    arch: str | None = None  # architecture description a .pt upload was loaded with
    config: str = ""  # its config as JSON
    file_digest: str = ""
    # the images a TorchScript archive (arch "torchscript") is replayed on [B, C, S, S]
    example: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def is_archive(self) -> bool:
        return self.arch == archives.ARCH

    def read(self) -> bytes:
        """The bytes of :attr:`path` (read from disk each time a cache misses)."""
        return Path(self.path).read_bytes()

    def model(self) -> nn.Module:
        """The loaded network (shared cache, read-only)."""
        if self.is_archive:
            return data.load_archive(self.digest, self.filename, self.read, self.example)
        name = self.filename
        if not name.lower().endswith(".safetensors"):  # a .pt upload, converted
            name = f"{Path(name).stem}.safetensors"
        return data.load_model(self.file_digest or self.digest, name, self.read)


@dataclass(frozen=True)
class DatasetEntry:
    """An uploaded ``.npz`` dataset, stored as a file in this session's private folder."""

    key: str
    name: str
    path: str


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def demo_name(row: dict) -> str:
    """Display name of a demo model, e.g. ``mlp seed 1`` or ``mlp skewed half 0``."""
    split = row["split_kind"]
    if split == "same":
        return f"{row['label']} seed {row['seed']}"
    return f"{row['label']} {split} half {row['split'].get('part', 0)}"


def add_demo(models: dict[str, ModelEntry], rows: list[dict]) -> list[str]:
    """Add the demo zoo's files (rows from ``data.ensure_demo``); returns their ids in order."""
    ids = []
    for row in rows:
        content = Path(row["path"]).read_bytes()
        digest = sha256(content)
        entry = ModelEntry(digest[:16], digest, demo_name(row), Path(row["path"]).name, "demo",
                           row["path"])
        models.setdefault(entry.id, entry)
        ids.append(entry.id)
    return ids


def default_selection(models: dict[str, ModelEntry], ids: list[str]) -> list[str]:
    """The demo's starting selection: every model of the first architecture trained on the
    full training set (several seeds of one architecture)."""
    first = models[ids[0]]
    chosen = [i for i in ids if models[i].filename.split("_")[0] == first.filename.split("_")[0]
              and "_same_" in models[i].filename]
    return chosen or ids[:2]


def _unique_name(models: dict[str, ModelEntry], name: str) -> str:
    taken = {e.name for e in models.values()}
    candidate, k = name, 2
    while candidate in taken:
        candidate, k = f"{name} ({k})", k + 1
    return candidate


def check_budget(filename: str, size: int, session_dir: Path) -> None:
    """Refuse an upload of ``size`` bytes that would bring this session's files (those in
    ``session_dir``, one per upload) over :data:`dashboard.data.SESSION_UPLOAD_BYTES` or
    :data:`~dashboard.data.SESSION_UPLOAD_FILES`; what was loaded stays."""
    max_bytes, max_files = data.SESSION_UPLOAD_BYTES, data.SESSION_UPLOAD_FILES
    files = [p for p in Path(session_dir).iterdir() if p.is_file()]
    used = sum(p.stat().st_size for p in files)
    if len(files) >= max_files:
        raise CcamergeError(f"{filename} was not loaded: this session already holds {len(files)} "
                            f"uploads, the most one session keeps; the models loaded so far stay. "
                            "Reload the page for a new session, or use the ccamerge CLI")
    if used + size > max_bytes:
        raise CcamergeError(f"{filename} was not loaded: with its {size / 2**20:.1f} MB this "
                            f"session's uploads would reach {(used + size) / 2**20:.1f} MB, over "
                            f"the {max_bytes / 2**20:.0f} MB budget per session; the models "
                            "loaded so far stay. Reload the page for a new session, or use the "
                            "ccamerge CLI")


def check_size(filename: str, size: int, max_bytes: int) -> None:
    """Refuse one uploaded file over ``max_bytes``."""
    if size > max_bytes:
        raise CcamergeError(f"{filename} is {size / 2**20:.1f} MB, over the {max_bytes / 2**20:.0f} MB "
                            "upload limit of this dashboard; merge large models with the ccamerge CLI")


def add_model_upload(models: dict[str, ModelEntry], selected: list[str], filename: str,
                     content: bytes, session_dir: Path, *, arch: str | None = None,
                     config: dict | None = None, trust_code: bool = False,
                     example: torch.Tensor | None = None,
                     max_bytes: int = data.MAX_UPLOAD_BYTES) -> tuple[ModelEntry, bool]:
    """Check and add an uploaded model file; returns ``(entry, added)`` (``added`` False when the
    same content was already loaded).

    A TorchScript archive (``torch.jit.save``, any of :data:`MODEL_SUFFIXES` but
    ``.safetensors``) is loaded only with ``trust_code`` (its code runs when the model runs) and
    replayed on ``example`` images ``[B, C, S, S]``; it stays a file in ``session_dir``. Other
    ``.pt``/``.pth`` files need ``arch`` and ``config`` and are read with the weights-only
    unpickler, then written, as ``.safetensors``, to ``session_dir`` so recipes can name them.
    The model must match the ``selected`` models (architecture, widths, classes; for archives,
    every state-dict shape).
    """
    check_size(filename, len(content), max_bytes)
    if not filename.lower().endswith(MODEL_SUFFIXES):
        raise CcamergeError(f"cannot load {filename}: expected a .safetensors file, a weights-only "
                            ".pt/.pth or a TorchScript archive (.pt, .pth, .ts, .torchscript)")
    digest = sha256(content)
    if digest[:16] in models:
        return models[digest[:16]], False
    check_budget(filename, len(content), session_dir)
    if not filename.lower().endswith(".safetensors"):
        archive = Path(session_dir) / f"{digest[:16]}.pt"
        if archives.write_and_sniff(content, archive):
            return _add_archive(models, selected, filename, content, digest, archive,
                                trust_code=trust_code, example=example), True
        archive.unlink(missing_ok=True)
        if filename.lower().endswith((".ts", ".torchscript")):
            raise CcamergeError(f"{filename} is not a TorchScript archive (torch.jit.save)")
    is_torch = not filename.lower().endswith(".safetensors")
    if is_torch:  # converted once, not cached: the entry loads the converted file
        model = load_model_bytes(content, filename, arch=arch, config=config, max_bytes=max_bytes)
    else:
        model = data.load_model(digest, filename, lambda: content)
    _check_fits_selection(models, selected, filename, model)
    path = Path(session_dir) / f"{digest[:16]}.safetensors"
    if is_torch:
        save_model(model, path, info={"source": filename})
    else:
        path.write_bytes(content)
    entry = ModelEntry(digest[:16], digest, _unique_name(models, Path(filename).stem), filename,
                       "upload", str(path), arch if is_torch else None,
                       json.dumps(config, sort_keys=True) if is_torch else "",
                       sha256(path.read_bytes()) if is_torch else "")
    models[entry.id] = entry
    return entry, True


def _add_archive(models: dict[str, ModelEntry], selected: list[str], filename: str,
                 content: bytes, digest: str, path: Path, *, trust_code: bool,
                 example: torch.Tensor | None) -> ModelEntry:
    """Replay a trusted archive (the file at ``path``) and add it; removes the file on failure."""
    try:
        if not trust_code:
            raise CcamergeError(archives.untrusted_message(filename))
        if example is None:
            raise CcamergeError(f"{filename} is a TorchScript archive, which is replayed on images "
                                "of the selected dataset; pick a dataset in the sidebar first")
        model = data.load_archive(digest, filename, lambda: content, example)
        _check_fits_selection(models, selected, filename, model, example)
    except CcamergeError:
        path.unlink(missing_ok=True)
        raise
    entry = ModelEntry(digest[:16], digest, _unique_name(models, Path(filename).stem), filename,
                       "upload", str(path), archives.ARCH, "", "", example)
    models[entry.id] = entry
    return entry


def _check_fits_selection(models: dict[str, ModelEntry], selected: list[str], filename: str,
                          model: nn.Module, example: torch.Tensor | None = None) -> None:
    if not selected:
        return
    first = models[selected[0]]
    try:
        check_same([first.model(), model], example if example is not None else first.example)
    except CcamergeError as exc:
        raise CcamergeError(f"{filename} does not fit the selected models: {exc}. To start a "
                            "new selection, deselect them in the sidebar and upload again.") from exc


def check_same(networks: list[nn.Module], x: torch.Tensor | None) -> None:
    """Raise a readable CcamergeError unless ``networks`` merge together: one built-in family and
    config, or (for archives) the API's check that every state-dict shape matches and model 0
    runs on ``x`` ``[B, ...]``."""
    if all(api.is_builtin(n) for n in networks):
        same_architecture(networks)
    elif len(networks) >= 2:
        if x is None:
            raise CcamergeError("cannot compare models outside the built-in families without "
                                "example images")
        api.check_compatible(networks, x, 0)


def example_of(entries: list[ModelEntry]) -> torch.Tensor | None:
    """The images the first archive among ``entries`` was replayed on (None without archives)."""
    return next((e.example for e in entries if e.example is not None), None)


def describe(model: nn.Module) -> str:
    """``mlp``, ``vgg`` ... for the built-in families, ``torchscript ClassName`` for archives."""
    return model.arch if api.is_builtin(model) else archives.describe(model)


def add_dataset_upload(datasets: dict[str, DatasetEntry], filename: str, content: bytes,
                       session_dir: Path, *, max_bytes: int = data.MAX_UPLOAD_BYTES) -> DatasetEntry:
    """Check and add an uploaded ``.npz`` dataset (``x_train, y_train, x_test, y_test``); it is
    written to ``session_dir`` and read without pickle."""
    check_size(filename, len(content), max_bytes)
    if not filename.lower().endswith(".npz"):
        raise CcamergeError(f"{filename} is not an .npz file; a dataset upload needs arrays "
                            "x_train, y_train, x_test, y_test in an .npz")
    digest = sha256(content)
    key = f"npz:{digest[:16]}"
    if key in datasets:
        return datasets[key]
    check_budget(filename, len(content), session_dir)
    path = Path(session_dir) / f"{digest[:16]}.npz"
    path.write_bytes(content)
    try:
        data.dataset(str(path))
    except CcamergeError as exc:
        path.unlink(missing_ok=True)
        raise CcamergeError(str(exc).replace(str(path), filename)) from exc
    datasets[key] = DatasetEntry(key, filename, str(path))
    return datasets[key]


def dataset_path(key: str, datasets: dict[str, DatasetEntry]) -> str:
    """What ``load_dataset`` (and a recipe) takes for a dataset key: a name or the .npz path."""
    if key.startswith("npz:"):
        if key not in datasets:
            raise CcamergeError("the uploaded dataset is no longer loaded; upload it again")
        return datasets[key].path
    return key


def dataset_label(key: str, datasets: dict[str, DatasetEntry]) -> str:
    return datasets[key].name if key in datasets else key


def table_rows(models: dict[str, ModelEntry], selected: list[str], scores: dict[str, dict | None]) -> list[dict]:
    """One row per loaded model for the models table."""
    rows = []
    for entry in models.values():
        model = entry.model()
        summary = model_summary(model) if api.is_builtin(model) else _archive_summary(model)
        config = summary["config"]
        measured = scores.get(entry.id)
        rows.append({"selected": entry.id in selected, "name": entry.name, "arch": summary["arch"],
                     "width": config.get("width"), "parameters": summary["parameters"],
                     "accuracy (%)": measured["accuracy"] if measured else None,
                     "saved accuracy (%)": summary["accuracy"],
                     "trained on": summary["dataset"] or "", "source": entry.kind,
                     "file": entry.filename, "sha256": entry.digest[:12]})
    return rows


def _archive_summary(model: nn.Module) -> dict:
    """:func:`ccamerge.io.model_summary`'s fields for a replayed archive (a merged archive
    records its accuracy and dataset in ``ccamerge.json``)."""
    info = getattr(model, "info", None) or {}
    return {"arch": archives.describe(model), "config": {}, "parameters": count_parameters(model),
            "accuracy": info.get("test_accuracy"), "dataset": info.get("dataset")}


@dataclass(frozen=True)
class Inputs:
    """What a page computes on: the selected entries and networks, their digests, the reference
    index, and the dataset with its cache key and the name a recipe records."""

    entries: list[ModelEntry]
    models: list[nn.Module]
    digests: tuple[str, ...]
    reference: int
    data: object
    data_key: str
    data_name: str

    def pick(self, indices: list[int]) -> tuple[list[nn.Module], tuple[str, ...]]:
        return [self.models[i] for i in indices], tuple(self.digests[i] for i in indices)


def inputs(ids: tuple[str, ...], reference: int, data_key: str, models: dict[str, ModelEntry],
           datasets: dict[str, DatasetEntry], *, minimum: int = 2) -> Inputs:
    """Resolve a selection; raises a readable CcamergeError when it cannot be computed on."""
    if len(ids) < minimum:
        raise CcamergeError(f"select at least {minimum} models in the sidebar (selected: {len(ids)})")
    entries = [models[i] for i in ids]
    networks = [e.model() for e in entries]
    check_same(networks, example_of(entries))
    name = dataset_path(data_key, datasets)
    dataset = data.dataset(name)
    data.check_fit(networks, dataset)
    return Inputs(entries, networks, tuple(e.digest for e in entries), reference, dataset, data_key,
                  name)
