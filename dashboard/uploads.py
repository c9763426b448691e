"""Upload callbacks of the Models page: they run before the script (so they may select what they
add in the sidebar) and leave inline messages for the page to show.

A TorchScript archive is loaded only while "I trust this archive's code" is ticked; until then it
stays in the uploader, unprocessed, and ticking the box (whose callback is
:func:`on_model_upload` too) loads it.
"""

from __future__ import annotations

import io
import json

import streamlit as st
import torch

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


def _load_one(ss, upload, selected: list[str], trusted: bool):
    """``registry.add_model_upload`` with what the page's controls say about this file."""
    registry.check_size(upload.name, upload.size, data.MAX_UPLOAD_BYTES)
    content = upload.getvalue()
    arch, config, example = None, None, None
    if is_torchscript_archive(io.BytesIO(content)):
        example = example_images(ss)
    elif not upload.name.lower().endswith(".safetensors"):
        arch, text = _pt_description(ss)
        config = parse_config(text)
    return registry.add_model_upload(ss[state.MODELS], selected, upload.name, content,
                                     state.session_dir(), arch=arch, config=config,
                                     trust_code=trusted, example=example)


def on_model_upload() -> None:
    """Load every new file of the model uploader; select those that fit the selection. An
    archive refused for want of trust stays unprocessed, to load once the box is ticked."""
    ss = st.session_state
    processed = ss[state.PROCESSED_UPLOADS]
    selected = list(ss.get(state.W_MODELS) or [])
    trusted = bool(ss.get(state.W_TRUST_CODE))
    messages = []
    for upload in ss.get(state.W_MODEL_UPLOAD) or []:
        if upload.file_id in processed:
            continue
        try:
            entry, added = _load_one(ss, upload, selected, trusted)
        except CcamergeError as exc:
            refused = str(exc) == archives.untrusted_message(upload.name)
            messages.append(("warning" if refused else "error", str(exc)))
            if not refused:
                processed.add(upload.file_id)
            continue
        processed.add(upload.file_id)
        if entry.id not in selected:
            selected.append(entry.id)
        verb = "loaded as" if added else "was already loaded as"
        messages.append(("success", f"{upload.name} {verb} '{entry.name}' and selected"))
    ss[state.W_MODELS] = selected
    ss[state.UPLOAD_MESSAGES] = messages


def on_trust_change() -> None:
    """Ticking "I trust this archive's code" loads the archives waiting in the uploader."""
    processed = st.session_state[state.PROCESSED_UPLOADS]
    uploads = st.session_state.get(state.W_MODEL_UPLOAD) or []
    if st.session_state.get(state.W_TRUST_CODE) and any(u.file_id not in processed for u in uploads):
        on_model_upload()


def on_dataset_upload() -> None:
    """Load the uploaded ``.npz`` dataset and select it."""
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
    ss[state.W_DATASET] = entry.key
    ss[state.UPLOAD_MESSAGES] = [("success", f"dataset {upload.name} loaded and selected")]
