"""The models and datasets one session has loaded, and the checks an upload goes through.

Functions here take and return plain values (dicts of entries, bytes, paths) so tests call them
directly; the pages keep the dicts in ``st.session_state``. A failed upload raises
:class:`CcamergeError` before anything is added, so what was loaded stays as it was.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ccamerge.errors import CcamergeError
from ccamerge.io import model_summary, save_model
from ccamerge.models import same_architecture
from dashboard import data

MODEL_SUFFIXES = (".safetensors", ".pt", ".pth")


@dataclass(frozen=True)
class ModelEntry:
    """One loaded model. ``path`` is a ``.safetensors`` file with these weights (the demo cache or
    this session's private folder) so that a recipe can name it; uploads also keep their bytes."""

    id: str
    digest: str
    name: str
    filename: str
    kind: str  # "demo" or "upload"
    path: str
    arch: str | None = None  # architecture description a .pt upload was loaded with
    config: str = ""  # its config as JSON
    content: bytes | None = None  # uploaded bytes, kept only in this session's state

    def read(self) -> bytes:
        return self.content if self.content is not None else Path(self.path).read_bytes()

    def model(self) -> nn.Module:
        """The loaded network (shared cache, read-only)."""
        config = json.loads(self.config) if self.config else None
        return data.load_model(self.digest, self.filename, self.read, arch=self.arch, config=config)


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


def check_size(filename: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise CcamergeError(f"{filename} is {size / 2**20:.1f} MB, over the {max_bytes / 2**20:.0f} MB "
                            "upload limit of this dashboard; merge large models with the ccamerge CLI")


def add_model_upload(models: dict[str, ModelEntry], selected: list[str], filename: str,
                     content: bytes, session_dir: Path, *, arch: str | None = None,
                     config: dict | None = None,
                     max_bytes: int = data.MAX_UPLOAD_BYTES) -> tuple[ModelEntry, bool]:
    """Check and add an uploaded model file; returns ``(entry, added)`` (``added`` False when the
    same content was already loaded).

    ``.pt``/``.pth`` files need ``arch`` and ``config`` and are read with the weights-only
    unpickler. The model must match the ``selected`` models (architecture, widths, classes). The
    file is also written, as ``.safetensors``, to ``session_dir`` so recipes can name it.
    """
    check_size(filename, len(content), max_bytes)
    if not filename.lower().endswith(MODEL_SUFFIXES):
        raise CcamergeError(f"cannot load {filename}: expected a .safetensors, .pt or .pth file")
    digest = sha256(content)
    if digest[:16] in models:
        return models[digest[:16]], False
    is_torch = not filename.lower().endswith(".safetensors")
    described = dict(arch=arch, config=config) if is_torch else {}
    model = data.load_model(digest, filename, lambda: content, **described)
    if selected:
        try:
            same_architecture([models[selected[0]].model(), model])
        except CcamergeError as exc:
            raise CcamergeError(f"{filename} does not fit the selected models: {exc}. To start a "
                                "new selection, deselect them in the sidebar and upload again.") from exc
    path = Path(session_dir) / f"{digest[:16]}.safetensors"
    if is_torch:
        save_model(model, path, info={"source": filename})
    else:
        path.write_bytes(content)
    entry = ModelEntry(digest[:16], digest, _unique_name(models, Path(filename).stem), filename,
                       "upload", str(path), arch if is_torch else None,
                       json.dumps(config, sort_keys=True) if is_torch else "", content)
    models[entry.id] = entry
    return entry, True


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
        summary = model_summary(model)
        config = summary["config"]
        measured = scores.get(entry.id)
        rows.append({"selected": entry.id in selected, "name": entry.name, "arch": summary["arch"],
                     "width": config.get("width"), "parameters": summary["parameters"],
                     "accuracy (%)": measured["accuracy"] if measured else None,
                     "saved accuracy (%)": summary["accuracy"],
                     "trained on": summary["dataset"] or "", "source": entry.kind,
                     "file": entry.filename, "sha256": entry.digest[:12]})
    return rows


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
    same_architecture(networks)
    name = dataset_path(data_key, datasets)
    dataset = data.dataset(name)
    data.check_fit(networks, dataset)
    return Inputs(entries, networks, tuple(e.digest for e in entries), reference, dataset, data_key,
                  name)
