"""The models and datasets one session has loaded, and the checks an upload goes through.

Functions here take and return plain values (dicts of entries, bytes, paths) so tests call them
directly; the pages keep the dicts in ``st.session_state``. A failed upload raises
:class:`CcamergeError` before anything is added, so what was loaded stays as it was.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ccamerge import api
from ccamerge.data.fit import check_traced_family, shapes_differ
from ccamerge.errors import CcamergeError
from ccamerge.io import load_model_bytes, model_summary, save_model
from ccamerge.methods.registry import mixed_width_methods
from ccamerge.models import count_parameters, widths_differ, widths_label
from ccamerge.models import describe as describe_model
from ccamerge.trace.family import widths_label as family_label
from dashboard import archives, data, image_zip

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

    @property
    def label(self) -> str:
        """What messages call this model: an upload by the file name the user gave it (with
        its display name when two uploads share that file name), a demo model by its name."""
        if self.kind != "upload":
            return self.name
        return self.filename if Path(self.filename).stem == self.name else \
            f"{self.name} ({self.filename})"

    @property
    def portable_path(self) -> str:
        """The file a recipe names for this model: the name the user gave an upload (their own
        copy, in the folder ``ccamerge replay`` runs in), a demo model's cached file."""
        return self.filename if self.kind == "upload" else self.path

    @property
    def architecture(self) -> dict | None:
        """``{"arch", "config"}`` a weights-only ``.pt`` upload was loaded with (a bare state
        dict does not say; a recipe records it so replay reads the user's ``.pt``), else None."""
        if not self.arch or self.is_archive:
            return None
        return {"arch": self.arch, "config": json.loads(self.config)}

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
    """An uploaded dataset in this session's private folder: an ``.npz`` file (``kind``
    "npz") or an image folder extracted from a ``.zip`` (``kind`` "images"). ``name`` is the
    file name the user gave it, ``digest`` the sha256 of the uploaded bytes, ``path`` what
    ``load_dataset`` reads, ``recipe_name`` what a recipe names (the ``.npz`` itself, or the
    folder ``unzip`` makes) and ``prepare`` the command that makes it from the upload
    (empty for an ``.npz``)."""

    key: str
    name: str
    path: str
    digest: str = ""
    kind: str = "npz"
    recipe_name: str = ""
    prepare: str = ""


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
    files = list(Path(session_dir).iterdir())  # one per upload (a file, or an image folder)
    used = sum(p.stat().st_size for p in Path(session_dir).rglob("*") if p.is_file())
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
        raise CcamergeError(f"{filename} is {size / 2**20:.1f} MB, over the "
                            f"{max_bytes / 2**20:.0f} MB upload limit of this dashboard; merge "
                            "large models with the ccamerge CLI")


def add_model_upload(models: dict[str, ModelEntry], filename: str,
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
    Whether it fits the selection is :func:`fit_problem`'s question: every readable model is
    loaded, fitting or not.
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
            return _add_archive(models, filename, content, digest, archive,
                                trust_code=trust_code, example=example), True
        archive.unlink(missing_ok=True)
        if filename.lower().endswith((".ts", ".torchscript")):
            raise CcamergeError(f"{filename} is not a TorchScript archive (torch.jit.save)")
    is_torch = not filename.lower().endswith(".safetensors")
    if is_torch:  # converted once, not cached: the entry loads the converted file
        model = load_model_bytes(content, filename, arch=arch, config=config, max_bytes=max_bytes)
    else:
        data.load_model(digest, filename, lambda: content)
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


def _add_archive(models: dict[str, ModelEntry], filename: str, content: bytes, digest: str,
                 path: Path, *, trust_code: bool, example: torch.Tensor | None) -> ModelEntry:
    """Replay a trusted archive (the file at ``path``) and add it; removes the file on failure."""
    try:
        if not trust_code:
            raise CcamergeError(archives.untrusted_message(filename))
        if example is None:
            raise CcamergeError(f"{filename} is a TorchScript archive, which is replayed on images "
                                "of the selected dataset; pick a dataset in the sidebar first")
        data.load_archive(digest, filename, lambda: content, example)
    except CcamergeError:
        path.unlink(missing_ok=True)
        raise
    entry = ModelEntry(digest[:16], digest, _unique_name(models, Path(filename).stem), filename,
                       "upload", str(path), archives.ARCH, "", "", example)
    models[entry.id] = entry
    return entry


def fit_problem(models: dict[str, ModelEntry], selected: list[str], model_id: str) -> str | None:
    """Why model ``model_id`` would break the ``selected`` models (a different architecture or
    size, named by the differing config fields), or None when it fits them or none is
    selected."""
    others = [i for i in selected if i != model_id]
    if not others:
        return None
    try:
        check_entries([models[others[0]], models[model_id]], mixed_widths=False)
    except CcamergeError as exc:
        return str(exc)
    return None


def fitting_group(models: dict[str, ModelEntry], ids: list[str]) -> list[str]:
    """The largest group of ``ids`` that merge together (each checked against the group's
    first model; the earliest group on a tie), in the order given."""
    groups: list[list[str]] = []
    for model_id in ids:
        home = next((g for g in groups if fit_problem(models, [g[0]], model_id) is None), None)
        if home is None:
            groups.append([model_id])
        else:
            home.append(model_id)
    return max(groups, key=len, default=[])


def check_entries(entries: list[ModelEntry], *, mixed_widths: bool = True) -> None:
    """:func:`check_same` on loaded entries, each named by its :attr:`ModelEntry.label`."""
    check_same([e.model() for e in entries], example_of(entries), [e.label for e in entries],
               mixed_widths=mixed_widths)


def check_same(networks: list[nn.Module], x: torch.Tensor | None,
               names: list[str] | None = None, *, mixed_widths: bool = True) -> None:
    """Raise a readable CcamergeError unless ``networks`` merge together: one built-in family and
    config, or one family whose widths differ (:func:`mixed_widths_problem` says where that
    holds; the message names the differing config fields once, with ``names`` for the
    models), or (for archives) every state-dict shape equal and model 0 running on ``x``
    ``[B, ...]``. ``mixed_widths=False``: widths must agree too (what an upload needs to be
    selected on its own: the other pages take one width)."""
    names = names or [f"model {k}" for k in range(len(networks))]
    if all(api.is_builtin(n) for n in networks):
        widths_only = widths_differ(networks)
        if widths_only and mixed_widths:  # the Merge page's mixed-width methods take them
            return
        hint = ("select it by hand to merge different widths with cca, gcca or ot" if widths_only
                else "only models of one architecture and size merge")
        for name, network in zip(names[1:], networks[1:], strict=True):
            difference = config_difference(networks[0], network)
            if difference:
                raise CcamergeError(f"{name} does not match {names[0]} ({difference}); {hint}")
    elif len(networks) >= 2:
        if x is None:
            raise CcamergeError("cannot compare models outside the built-in families without "
                                "example images")
        _check_traced(networks, x, names, mixed_widths)


def _check_traced(networks: list[nn.Module], x: torch.Tensor, names: list[str],
                  mixed_widths: bool) -> None:
    """:func:`check_same` for models outside the built-in families: equal shapes, or one
    architecture at other hidden widths (:func:`ccamerge.data.fit.check_traced_family`, run
    once per set of models), which only ``mixed_widths`` takes; then model 0 runs on ``x``."""
    if shapes_differ(networks):
        label = _family_label(networks, x, names)
        if not mixed_widths:
            raise CcamergeError(f"{names[-1]} does not match {names[0]} (hidden widths "
                                f"{label}); select it by hand to merge different widths with "
                                "cca, gcca or ot")
    api.check_compatible(networks, x, 0)


MAX_FAMILIES = 64  # traced selections whose family check is remembered
_FAMILIES: dict[tuple, tuple[list[weakref.ref], str]] = {}


def _family_label(networks: list[nn.Module], x: torch.Tensor, names: list[str]) -> str:
    """:func:`ccamerge.data.fit.check_traced_family` on ``networks`` (the sidebar asks on every
    rerun: a passed check is remembered while the same loaded networks live) and the widths
    label of its specs."""
    key = (tuple(id(n) for n in networks), tuple(names), tuple(x.shape))
    hit = _FAMILIES.get(key)
    if hit is None or any(ref() is not n for ref, n in zip(hit[0], networks, strict=True)):
        specs = check_traced_family(networks, x, None, names)
        hit = _FAMILIES[key] = ([weakref.ref(n) for n in networks], family_label(specs))
        while len(_FAMILIES) > MAX_FAMILIES:
            _FAMILIES.pop(next(iter(_FAMILIES)))
    return hit[1]


def config_difference(first: nn.Module, other: nn.Module) -> str:
    """``width 2.0 vs 1.0, hidden [64, 64] vs [128, 128]`` (``other``'s value first), or
    ``architecture vgg vs mlp``; empty when both are built the same."""
    if other.arch != first.arch:
        return f"architecture {other.arch} vs {first.arch}"
    a, b = describe_model(first)["config"], describe_model(other)["config"]
    return ", ".join(f"{k} {b.get(k)} vs {a.get(k)}" for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k))


def shape_difference(first: nn.Module, other: nn.Module) -> str:
    """The first state-dict entry whose shape differs: ``fc.weight [32, 64] vs [16, 64]``."""
    a = {k: list(v.shape) for k, v in first.state_dict().items()}
    b = {k: list(v.shape) for k, v in other.state_dict().items()}
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"{key} {b.get(key)} vs {a.get(key)}"
    return ""


def example_of(entries: list[ModelEntry]) -> torch.Tensor | None:
    """The images the first archive among ``entries`` was replayed on (None without archives)."""
    return next((e.example for e in entries if e.example is not None), None)


def describe(model: nn.Module) -> str:
    """``mlp``, ``vgg`` ... for the built-in families, ``torchscript ClassName`` for archives."""
    return model.arch if api.is_builtin(model) else archives.describe(model)


def add_dataset_upload(datasets: dict[str, DatasetEntry], filename: str, content: bytes,
                       session_dir: Path, *,
                       max_bytes: int = data.MAX_UPLOAD_BYTES) -> DatasetEntry:
    """Check and add an uploaded dataset: an ``.npz`` (``x_train, y_train, x_test, y_test``;
    inputs ``[N, F]``, ``[N, H, W]`` or ``[N, C, H, W]``, read without pickle) or a ``.zip`` of
    an image folder (extracted by :func:`dashboard.image_zip.extract_images`). It is kept in
    ``session_dir``; on any problem nothing is kept and the error names ``filename``."""
    check_size(filename, len(content), max_bytes)
    if not filename.lower().endswith((".npz", ".zip")):
        raise CcamergeError(f"{filename} is neither an .npz nor a .zip; a dataset upload is an "
                            ".npz with x_train, y_train, x_test, y_test, or a zip of an image "
                            "folder (root/<class>/*.png)")
    digest = sha256(content)
    kind = "images" if image_zip.is_zip(filename) else "npz"
    key = f"{'zip' if kind == 'images' else 'npz'}:{digest[:16]}"
    if key in datasets:
        return datasets[key]
    if kind == "images":
        entry = _add_image_zip(filename, content, digest, key, Path(session_dir))
    else:
        check_budget(filename, len(content), session_dir)
        path = Path(session_dir) / f"{digest[:16]}.npz"
        path.write_bytes(content)
        entry = DatasetEntry(key, filename, str(path), digest, "npz", filename)
    try:
        data.dataset(entry.path)
    except CcamergeError as exc:
        _remove(Path(session_dir) / Path(entry.path).relative_to(session_dir).parts[0])
        raise CcamergeError(str(exc).replace(entry.path, filename)) from exc
    datasets[key] = entry
    return entry


def _add_image_zip(filename: str, content: bytes, digest: str, key: str,
                   session_dir: Path) -> DatasetEntry:
    """Extract an uploaded zip into ``session_dir/<digest>/`` (within the session budget); its
    recipe names the folder ``unzip`` makes in the folder ``ccamerge replay`` runs in."""
    check_budget(filename, image_zip.unpacked_size(content, filename), session_dir)
    folder = session_dir / digest[:16]
    root = image_zip.extract_images(content, filename, folder)
    stem = Path(filename).stem
    if root == folder:
        name, prepare = stem, f"unzip {shlex.quote(filename)} -d {shlex.quote(stem)}"
    else:
        name, prepare = root.name, f"unzip {shlex.quote(filename)}"
    return DatasetEntry(key, filename, str(root), digest, "images", name, prepare)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def dataset_path(key: str, datasets: dict[str, DatasetEntry]) -> str:
    """What ``load_dataset`` takes for a dataset key: a name, the .npz or the image folder."""
    if key.startswith(("npz:", "zip:")):
        if key not in datasets:
            raise CcamergeError("the uploaded dataset is no longer loaded; upload it again")
        return datasets[key].path
    return key


def dataset_problem(entries: list[ModelEntry], key: str, datasets: dict[str, DatasetEntry],
                    data_label: str | None = None) -> str | None:
    """Why dataset ``key`` (called ``data_label``, default its name) does not fit the models of
    ``entries`` (their inputs or classes), or None when it fits them (or there are none)."""
    if not entries:
        return None
    try:
        check_dataset(entries, key, datasets, data_label)
    except CcamergeError as exc:
        return str(exc)
    return None


def check_dataset(entries: list[ModelEntry], key: str, datasets: dict[str, DatasetEntry],
                  data_label: str | None = None):
    """The dataset ``key`` loaded, after checking it fits every model of ``entries``; raises one
    line naming the model and the dataset by the names the user knows."""
    dataset = data.dataset(dataset_path(key, datasets))
    data.check_fit([e.model() for e in entries], dataset, names=[e.label for e in entries],
                   data_label=data_label or f"dataset {dataset_label(key, datasets)}")
    return dataset


def fitting_dataset(entries: list[ModelEntry], current: str, datasets: dict[str, DatasetEntry],
                    candidates: list[str]) -> str:
    """``current`` when it fits ``entries``, else the first of ``candidates`` that does (else
    ``current``)."""
    for key in [current, *[c for c in candidates if c != current]]:
        if dataset_problem(entries, key, datasets) is None:
            return key
    return current


def dataset_file(key: str, datasets: dict[str, DatasetEntry]) -> str:
    """What a command's ``--data`` names: a built-in name, an uploaded ``.npz`` by its file
    name, an uploaded zip by the folder ``unzip`` makes."""
    return datasets[key].recipe_name if key in datasets else key


def dataset_label(key: str, datasets: dict[str, DatasetEntry]) -> str:
    return datasets[key].name if key in datasets else key


def table_rows(models: dict[str, ModelEntry], selected: list[str],
               scores: dict[str, dict | None]) -> list[dict]:
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
    index, the dataset with its cache key and the name a recipe or a command gives it (the
    built-in name, or the file name the user uploaded), and the uploaded dataset's entry."""

    entries: list[ModelEntry]
    models: list[nn.Module]
    digests: tuple[str, ...]
    reference: int
    data: object
    data_key: str
    data_name: str
    data_entry: DatasetEntry | None = None

    def pick(self, indices: list[int]) -> tuple[list[nn.Module], tuple[str, ...]]:
        return [self.models[i] for i in indices], tuple(self.digests[i] for i in indices)

    @property
    def files(self) -> list[str]:
        """The model files a command names (:attr:`ModelEntry.portable_path`), in order."""
        return [e.portable_path for e in self.entries]


def mixed_widths_problem(networks: list[nn.Module]) -> str | None:
    """Why built-in ``networks`` of one family but different widths need the Merge page (its
    methods that merge them), None when their widths agree."""
    if all(api.is_builtin(n) for n in networks):
        if not widths_differ(networks):
            return None
        label = widths_label(networks)
    elif len(networks) < 2 or not shapes_differ(networks):
        return None
    else:
        label = f"hidden widths: {shape_difference(networks[0], networks[1]) or 'shapes'}"
    return (f"the selected models differ in width ({label}); only the Merge "
            f"page merges them, with {', '.join(mixed_width_methods())}; pick models of one width "
            "in the sidebar for this page")


def inputs(ids: tuple[str, ...], reference: int, data_key: str, models: dict[str, ModelEntry],
           datasets: dict[str, DatasetEntry], *, minimum: int = 2,
           mixed_widths: bool = False) -> Inputs:
    """Resolve a selection; raises a readable CcamergeError when it cannot be computed on. A
    mismatch between the models is explained in the sidebar, so it is only pointed at here.
    ``mixed_widths``: the page takes models whose widths differ (the Merge page)."""
    if len(ids) < minimum:
        raise CcamergeError(f"select at least {minimum} models in the sidebar "
                            f"(selected: {len(ids)})")
    entries = [models[i] for i in ids]
    try:
        check_entries(entries)
    except CcamergeError as exc:
        raise CcamergeError("the selected models do not merge together (the sidebar says why); "
                            "change the selection in the sidebar") from exc
    problem = None if mixed_widths else mixed_widths_problem([e.model() for e in entries])
    if problem:
        raise CcamergeError(problem)
    dataset = check_dataset(entries, data_key, datasets)
    entry = datasets.get(data_key)
    return Inputs(entries, [e.model() for e in entries], tuple(e.digest for e in entries),
                  reference, dataset, data_key, entry.recipe_name if entry else data_key, entry)
