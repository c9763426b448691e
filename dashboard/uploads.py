"""Upload callbacks of the Models page: they run before the script (so they may select what they
add in the sidebar) and leave inline messages for the page to show.

Every readable upload is loaded; it is selected only when it fits the selection (a model: the
selected models' architecture and size; a dataset: their inputs and classes), so an upload never
leaves every page broken. "Start a new selection from these uploads" switches to the models
uploaded since the last new selection.

A TorchScript archive is loaded only while "I trust this archive's code" is ticked; until then it
stays in the uploader, unprocessed, and ticking the box (whose callback is
:func:`on_model_upload` too) loads it.
"""

from __future__ import annotations

import io
import json

import streamlit as st
import torch

from ccamerge.data import available_datasets
from ccamerge.errors import CcamergeError
from ccamerge.models import ARCHITECTURES
from ccamerge.trace.torchscript import is_torchscript_archive
from ccamerge.train import default_config
from dashboard import archives, data, registry, state

EXAMPLE_IMAGES = 8  # training images an archive is replayed on (as the CLI does)


def config_key(arch: str) -> str:
    return f"{state.W_PT_CONFIG}_{arch}"


def default_pt_config(arch: str, dataset_key: str) -> str:
    """JSON config proposed for a ``.pt`` of ``arch`` (sized to the selected dataset)."""
    try:
        dataset = data.dataset(registry.dataset_path(dataset_key, st.session_state[state.DATASETS]))
    except CcamergeError:
        dataset = data.dataset("digits")
    return json.dumps(default_config(arch, dataset))


def parse_config(text: str) -> dict:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CcamergeError(f"the architecture config is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise CcamergeError("the architecture config must be a JSON object, e.g. {\"width\": 1.0}")
    return config


def _pt_description(ss) -> tuple[str, str]:
    arch = ss.get(state.W_PT_ARCH) or next(iter(ARCHITECTURES))
    text = ss.get(config_key(arch)) or default_pt_config(arch, ss.get(state.W_DATASET, "digits"))
    return arch, text


def example_images(ss) -> torch.Tensor | None:
    """The first training images of the selected dataset (what an archive is replayed on)."""
    try:
        path = registry.dataset_path(ss.get(state.W_DATASET) or "digits", ss[state.DATASETS])
        return data.dataset(path).x_train[:EXAMPLE_IMAGES]
    except CcamergeError:
        return None


def _load_one(ss, upload, trusted: bool):
    """``registry.add_model_upload`` with what the page's controls say about this file."""
    registry.check_size(upload.name, upload.size, data.MAX_UPLOAD_BYTES)
    content = upload.getvalue()
    arch, config, example = None, None, None
    if is_torchscript_archive(io.BytesIO(content)):
        example = example_images(ss)
    elif not upload.name.lower().endswith(".safetensors"):
        arch, text = _pt_description(ss)
        config = parse_config(text)
    return registry.add_model_upload(ss[state.MODELS], upload.name, content, state.session_dir(),
                                     arch=arch, config=config, trust_code=trusted,
                                     example=example)


def on_model_upload() -> None:
    """Load every new file of the model uploader. Each one that fits the selection (the models
    selected and those of this upload selected before it) is selected; one that does not is
    loaded but left unselected, with one line saying why. An archive refused for want of trust
    stays unprocessed, to load once the box is ticked. The models are remembered (until the next
    new selection) for :func:`on_new_selection`."""
    ss = st.session_state
    processed = ss[state.PROCESSED_UPLOADS]
    selected = list(ss.get(state.W_MODELS) or [])
    trusted = bool(ss.get(state.W_TRUST_CODE))
    messages = []
    recent = ss.setdefault(state.RECENT_UPLOADS, [])
    for upload in ss.get(state.W_MODEL_UPLOAD) or []:
        if upload.file_id in processed:
            continue
        try:
            entry, added = _load_one(ss, upload, trusted)
        except CcamergeError as exc:
            refused = str(exc) == archives.untrusted_message(upload.name)
            messages.append(("warning" if refused else "error", str(exc)))
            if not refused:
                processed.add(upload.file_id)
            continue
        processed.add(upload.file_id)
        recent[:] = [*[i for i in recent if i != entry.id], entry.id]
        messages.append(_place(ss, selected, entry, added, upload.name))
    ss[state.W_MODELS] = selected
    _keep_a_fitting_dataset(ss, selected, messages)
    ss[state.UPLOAD_MESSAGES] = messages


def _place(ss, selected: list[str], entry, added: bool, filename: str) -> tuple[str, str]:
    """Select ``entry`` (in place) when it fits ``selected``; the message for this file."""
    verb = "loaded as" if added else "was already loaded as"
    if entry.id in selected:
        return "success", f"{filename} {verb} '{entry.name}' (selected)"
    problem = registry.fit_problem(ss[state.MODELS], selected, entry.id)
    if problem is None:
        selected.append(entry.id)
        return "success", f"{filename} {verb} '{entry.name}' and selected"
    return "warning", (f"{filename} {verb} '{entry.name}' but not selected: {problem}. Press "
                       f"\"{NEW_SELECTION_LABEL}\" to work with it.")


NEW_SELECTION_LABEL = "Start a new selection from these uploads"


def recent_uploads(ss) -> list[str]:
    """Ids of the models uploaded since the last new selection, in upload order."""
    return [i for i in ss.get(state.RECENT_UPLOADS, []) if i in ss[state.MODELS]]


def on_new_selection() -> None:
    """Select the models uploaded since the last new selection that merge together (the
    largest such group), deselect the rest, make the first of them the reference, and pick a
    dataset that fits them when the selected one does not."""
    ss = st.session_state
    models = ss[state.MODELS]
    batch = recent_uploads(ss)
    ss[state.RECENT_UPLOADS] = []
    chosen = registry.fitting_group(models, batch)
    if not chosen:
        return
    ss[state.W_MODELS] = chosen
    ss[state.W_REFERENCE] = chosen[0]
    names = ", ".join(models[i].label for i in chosen)
    messages = [("success", f"new selection: {names}")]
    left_out = [models[i].label for i in batch if i not in chosen]
    if left_out:
        messages.append(("warning", f"not selected, they do not merge with "
                                    f"{models[chosen[0]].label}: {', '.join(left_out)}"))
    _keep_a_fitting_dataset(ss, chosen, messages)
    ss[state.UPLOAD_MESSAGES] = messages


def dataset_keys(ss) -> list[str]:
    """Every dataset the sidebar offers: the built-in ones on this machine, then the uploads."""
    return available_datasets() + list(ss[state.DATASETS])


def _keep_a_fitting_dataset(ss, selected: list[str], messages: list) -> None:
    """When the selected dataset does not fit the ``selected`` models, select the first one
    that does (saying so); keep it when none does (the pages then say why)."""
    models, datasets = ss[state.MODELS], ss[state.DATASETS]
    entries = [models[i] for i in selected]
    current = ss.get(state.W_DATASET) or "digits"
    key = registry.fitting_dataset(entries, current, datasets, dataset_keys(ss))
    if key != current:
        ss[state.W_DATASET] = key
        messages.append(("success", f"dataset {registry.dataset_label(key, datasets)} selected: "
                                    f"{registry.dataset_label(current, datasets)} does not fit "
                                    "these models"))


def on_trust_change() -> None:
    """Ticking "I trust this archive's code" loads the archives waiting in the uploader."""
    processed = st.session_state[state.PROCESSED_UPLOADS]
    uploads = st.session_state.get(state.W_MODEL_UPLOAD) or []
    if st.session_state.get(state.W_TRUST_CODE) and any(u.file_id not in processed
                                                        for u in uploads):
        on_model_upload()


def on_dataset_upload() -> None:
    """Load the uploaded dataset (``.npz`` or a ``.zip`` image folder); select it only when it
    fits the selected models, else say why it was left unselected."""
    ss = st.session_state
    upload = ss.get(state.W_DATA_UPLOAD)
    if upload is None:
        return
    try:
        entry = registry.add_dataset_upload(ss[state.DATASETS], upload.name, upload.getvalue(),
                                            state.session_dir())
    except CcamergeError as exc:
        ss[state.UPLOAD_MESSAGES] = [("error", str(exc))]
        return
    models = ss[state.MODELS]
    entries = [models[i] for i in ss.get(state.W_MODELS) or [] if i in models]
    problem = registry.dataset_problem(entries, entry.key, ss[state.DATASETS], data_label="it")
    if problem is None:
        ss[state.W_DATASET] = entry.key
        ss[state.UPLOAD_MESSAGES] = [("success", f"dataset {upload.name} loaded and selected")]
    else:
        ss[state.UPLOAD_MESSAGES] = [("warning", f"dataset {upload.name} loaded but not "
                                                 f"selected: {problem}")]
