"""Merge recipes as ``ccamerge replay`` reads them: from a ``.json`` file, a merged
``.safetensors`` or a merged TorchScript archive; checked field by field before any work, and
pointed at the model files by the sha256 each one recorded.

A recipe is :attr:`ccamerge.api.MergeResult.recipe`: ``models`` (the files merged),
``model_sha256`` (their sha256) and ``model_files`` (their names) among the settings. Replay
verifies every recorded sha256 against the file it is about to load, so a model that changed
since the merge is named instead of silently merged; :func:`model_paths` lets a user point a
recipe at their own copies (a list in recipe order, or a folder searched by sha256).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from ccamerge import validate
from ccamerge.batchnorm import LEGACY_POLICY, check_policy
from ccamerge.errors import CcamergeError
from ccamerge.files import MAX_RECIPE_BYTES, read_bytes, regular_file, sha256_file
from ccamerge.io import MAX_BYTES, archive_info, read_info
from ccamerge.methods import get_method
from ccamerge.moments import PRODUCTS
from ccamerge.spec import STREAM_POINTS
from ccamerge.trace.torchscript import is_torchscript_archive

MODEL_SUFFIXES = (".safetensors", ".pt", ".pth", ".ts", ".torchscript")
MAX_FOLDER_FILES = 10_000  # files of a --models folder that are hashed
_HEX = re.compile(r"[0-9a-f]{64}")


def read_recipe(path: str) -> dict:
    """The recipe in a .json file, a merged .safetensors or a merged TorchScript archive
    (only regular files; a .json of at most :data:`~ccamerge.files.MAX_RECIPE_BYTES`), checked
    by :func:`check_recipe`."""
    regular_file(path, what="recipe")
    info = _model_info(path)
    if info is not None and "merge" not in info:
        raise CcamergeError(f"{path} is not a merged model (its metadata has no recipe)")
    recipe = info["merge"] if info is not None else _read_json(path)
    check_recipe(recipe, path)
    return recipe


def _read_json(path: str):
    text = read_bytes(path, what="recipe", max_bytes=MAX_RECIPE_BYTES)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CcamergeError(f"recipe {path} is not valid JSON ({first[:120]})") from None


def _model_info(path: str) -> dict | None:
    """The info a model file's metadata records (an archive's zip is read, its code does not
    run); None when ``path`` is no model file."""
    if str(path).endswith(".safetensors"):
        return read_info(path)["info"]
    return archive_info(path) if is_torchscript_archive(path) else None


def check_recipe(recipe, path: str) -> None:
    """Every field ``ccamerge replay`` uses, checked before any data or model is loaded."""
    if not isinstance(recipe, dict):
        raise CcamergeError(f"recipe {path} is not a JSON object")
    missing = {"method", "models", "data"} - set(recipe)
    if missing:
        raise CcamergeError(f"recipe {path} lacks {sorted(missing)}")
    try:
        _check_fields(recipe)
    except CcamergeError as exc:
        raise CcamergeError(f"recipe {path}: {exc}") from None


def _check_fields(recipe: dict) -> None:
    models, data = recipe["models"], recipe["data"]
    if not isinstance(models, list) or len(models) < 2:
        raise CcamergeError("models must list at least 2 model files")
    unnamed = [i for i, p in enumerate(models) if not isinstance(p, str) or not p]
    if unnamed or not isinstance(data, dict) or not isinstance(data.get("name"), str):
        what = f"model(s) {unnamed}" if unnamed else "its dataset"
        raise CcamergeError(f"names no file for {what}; it cannot be replayed")
    if not isinstance(data.get("data_dir"), str | None):
        raise CcamergeError(f"data_dir must be a folder name, got {data['data_dir']!r}")
    options = recipe.get("options", {})
    if not isinstance(options, dict):
        raise CcamergeError(f"options must be an object, got {options!r}")
    get_method(validate.method_name(recipe["method"])).resolve(options)
    validate.integer("reference", recipe.get("reference", 0), 0, len(models) - 1)
    if recipe.get("target_model", recipe.get("reference", 0)) != recipe.get("reference", 0):
        raise CcamergeError(f"target_model {recipe['target_model']!r} is not the reference "
                            f"{recipe.get('reference', 0)}; the merged model takes the "
                            "reference's widths")
    _check_target_width(recipe.get("target_width"))
    validate.merge_weights(recipe.get("weights"), len(models))
    validate.sampling(recipe.get("stats_samples"), recipe.get("seed", 0))
    validate.flag("bn_reset", recipe.get("bn_reset", True))
    validate.flag("repair", recipe.get("repair", False))
    validate.flag("reset_base_bn", recipe.get("reset_base_bn", False))
    check_policy(recipe.get("bn_policy", LEGACY_POLICY))
    if recipe.get("stream_points", "pooled") not in STREAM_POINTS:
        raise CcamergeError(f"stream_points must be one of {STREAM_POINTS}, got "
                            f"{recipe['stream_points']!r}")
    if recipe.get("products", "float32") not in PRODUCTS:
        raise CcamergeError(f"products must be one of {PRODUCTS}, got {recipe['products']!r}")
    recorded_sha256(recipe)
    recorded_architectures(recipe)
    data_sha256 = data.get("sha256")
    if data_sha256 is not None and not (isinstance(data_sha256, str)
                                        and _HEX.fullmatch(data_sha256)):
        raise CcamergeError(f"data.sha256 must be a sha256 hex digest, got {data_sha256!r}")


def _check_target_width(value) -> None:
    """A recorded ``target_width``: null or a positive finite number."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise CcamergeError(f"target_width must be null or a positive number, got {value!r}")


def recorded_architectures(recipe: dict) -> list[dict | None]:
    """Per model, the ``{"arch", "config"}`` a weights-only ``.pt`` was loaded with (a bare
    state dict does not say; None where the file describes itself or nothing is recorded)."""
    count = len(recipe["models"])
    described = recipe.get("model_architectures") or [None] * count
    if not isinstance(described, list) or len(described) != count or not all(
            d is None or (isinstance(d, dict) and isinstance(d.get("arch"), str)
                          and isinstance(d.get("config"), dict)) for d in described):
        raise CcamergeError(f"model_architectures must list {count} entries, each null or "
                            "{\"arch\": name, \"config\": {...}}")
    return described


def recorded_sha256(recipe: dict) -> list[str | None]:
    """The sha256 the recipe records per model (None where it records none)."""
    count = len(recipe["models"])
    digests = recipe.get("model_sha256") or [None] * count
    if not isinstance(digests, list) or len(digests) != count or not all(
            d is None or (isinstance(d, str) and _HEX.fullmatch(d)) for d in digests):
        raise CcamergeError(f"model_sha256 must list {count} sha256 hex digests (or null)")
    return digests


def _label(recipe: dict, index: int) -> str:
    """``model 1 (mlp_s1.safetensors)``: a model of the recipe, by index and original name."""
    names = recipe.get("model_files") or []
    name = names[index] if index < len(names) and isinstance(names[index], str) else None
    name = name or Path(recipe["models"][index]).name
    return f"model {index} ({name})"


def model_paths(recipe: dict, given: list[str] | None, path: str) -> list[str]:
    """The files to replay ``recipe`` on: ``given`` files (in recipe order), the files in the
    folder ``given[0]`` whose sha256 the recipe records, or (``given`` None) the recipe's own
    ``models``."""
    count = len(recipe["models"])
    if not given:
        return list(recipe["models"])
    if len(given) == 1 and os.path.isdir(given[0]):
        return _find_by_sha256(recipe, given[0], path)
    if len(given) != count:
        raise CcamergeError(f"--models got {len(given)} files but recipe {path} merges {count} "
                            "models; give them in the recipe's order, or one folder")
    return list(given)


def _find_by_sha256(recipe: dict, folder: str, path: str) -> list[str]:
    """The file in ``folder`` (not its subfolders) with each model's recorded sha256."""
    digests = recorded_sha256(recipe)
    if None in digests:
        index = digests.index(None)
        raise CcamergeError(f"recipe {path} records no sha256 for {_label(recipe, index)}, so "
                            f"--models {folder} cannot be searched; give the files in order")
    found = _hash_folder(folder, set(digests))
    for index, digest in enumerate(digests):
        if digest not in found:
            raise CcamergeError(f"no file in {folder} has the sha256 of {_label(recipe, index)} "
                                f"({digest[:12]}...); put a copy of it there")
    return [found[d] for d in digests]


def _hash_folder(folder: str, wanted: set[str]) -> dict[str, str]:
    """``{sha256: path}`` of the model files directly in ``folder`` (regular, within the size
    limit), stopping once every ``wanted`` digest is found."""
    found: dict[str, str] = {}
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(MODEL_SUFFIXES))
    for name in names[:MAX_FOLDER_FILES]:
        candidate = os.path.join(folder, name)
        try:
            regular_file(candidate, max_bytes=MAX_BYTES)
        except CcamergeError:
            continue
        found.setdefault(sha256_file(candidate), candidate)
        if wanted <= set(found):
            break
    return found


def verify_data(recipe: dict, path: str) -> None:
    """Check the dataset file the recipe names against the sha256 it records (a recipe from
    the dashboard records one for an uploaded ``.npz``); folders and built-in names pass."""
    data = recipe["data"]
    digest, name = data.get("sha256"), data["name"]
    if digest is None or not os.path.isfile(name):
        return
    regular_file(name, what="dataset file")
    if sha256_file(name) != digest:
        raise CcamergeError(f"{name} is not the dataset recipe {path} merged on "
                            f"({data.get('file') or name}): its sha256 differs; put the original "
                            "file there")


def verify(recipe: dict, paths: list[str], path: str) -> list[str]:
    """Check each file against the sha256 the recipe records for it (regular files only);
    returns a warning per model the recipe records no sha256 for."""
    warnings = []
    for index, (file, digest) in enumerate(zip(paths, recorded_sha256(recipe), strict=True)):
        regular_file(file, what="model file", max_bytes=MAX_BYTES)
        if digest is None:
            warnings.append(f"recipe {path} records no sha256 for {_label(recipe, index)}; "
                            f"{file} was not verified")
        elif sha256_file(file) != digest:
            raise CcamergeError(f"{file} is not the file recipe {path} merged as "
                                f"{_label(recipe, index)}: its sha256 differs (it changed since "
                                "the merge); pass the original with --models")
    return warnings
