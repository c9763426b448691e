"""Upload callbacks of the Models page: they run before the script (so they may select what they
add in the sidebar) and leave inline messages for the page to show."""

from __future__ import annotations

import json

import streamlit as st

from ccamerge.errors import CcamergeError
from ccamerge.models import ARCHITECTURES
from ccamerge.train import default_config
from dashboard import data, registry, state


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


def on_model_upload() -> None:
    """Load every new file of the model uploader; select those that fit the selection."""
    ss = st.session_state
    models, processed = ss[state.MODELS], ss[state.PROCESSED_UPLOADS]
    selected = list(ss.get(state.W_MODELS) or [])
    messages = []
    for upload in ss.get(state.W_MODEL_UPLOAD) or []:
        if upload.file_id in processed:
            continue
        processed.add(upload.file_id)
        try:
            registry.check_size(upload.name, upload.size, data.MAX_UPLOAD_BYTES)
            arch, config = None, None
            if not upload.name.lower().endswith(".safetensors"):
                arch, text = _pt_description(ss)
                config = parse_config(text)
            entry, added = registry.add_model_upload(models, selected, upload.name, upload.getvalue(),
                                                     state.session_dir(), arch=arch, config=config)
        except CcamergeError as exc:
            messages.append(("error", str(exc)))
            continue
        if entry.id not in selected:
            selected.append(entry.id)
        verb = "loaded as" if added else "was already loaded as"
        messages.append(("success", f"{upload.name} {verb} '{entry.name}' and selected"))
    ss[state.W_MODELS] = selected
    ss[state.UPLOAD_MESSAGES] = messages


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
