"""ccamerge dashboard: ``streamlit run dashboard/app.py``.

Opens on the built-in demo (a small zoo trained on ``digits`` on the first start, then cached in
``$CCAMERGE_CACHE_DIR`` or ``~/.cache/ccamerge/demo``). The sidebar (models, reference, dataset) is
drawn here, so it stays set on every page; the pages live in ``../pages``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402
import torch  # noqa: E402

from ccamerge.devices import module_device, resolve_device  # noqa: E402
from dashboard import data, registry, state, widgets  # noqa: E402

PAGES = [
    st.Page("../pages/models.py", title="Models and data", icon=":material/inventory_2:",
            default=True),
    st.Page("../pages/spectra.py", title="Spectra", icon=":material/ssid_chart:"),
    st.Page("../pages/features.py", title="Feature matching", icon=":material/grid_on:"),
    st.Page("../pages/interpolation.py", title="Interpolation", icon=":material/timeline:"),
    st.Page("../pages/merge.py", title="Merge and compare", icon=":material/merge:"),
    st.Page("../pages/diagnose.py", title="Why did it fail?", icon=":material/troubleshoot:"),
    st.Page("../pages/explorer.py", title="Feature explorer", icon=":material/scatter_plot:"),
    st.Page("../pages/teach.py", title="Teaching mode", icon=":material/school:"),
    st.Page("../pages/spec.py", title="Merge points", icon=":material/account_tree:"),
]


def load_demo() -> None:
    """Add the demo zoo to this session once (training it first if it is not on disk yet)."""
    if st.session_state.get(state.DEMO_LOADED):
        return
    if data.demo_ready():
        rows = data.ensure_demo()
    else:
        with st.status("Training the demo models on digits (first start only, about 20 s)...",
                       expanded=True) as status:
            bar = st.progress(0.0, text="starting")
            rows = data.ensure_demo(lambda f, msg: bar.progress(min(1.0, f), text=msg))
            status.update(label=f"Demo ready: {len(rows)} models in {data.demo_dir()}",
                          state="complete", expanded=False)
    models = st.session_state[state.MODELS]
    ids = registry.add_demo(models, rows)
    st.session_state[state.W_MODELS] = registry.default_selection(models, ids)
    st.session_state[state.DEMO_LOADED] = True


def device_line(models: dict, ids) -> str:
    """Where this session's forward passes run: the device of the selected models (the API
    computes where model 0 is), and, when ``auto`` would pick a GPU elsewhere, that one."""
    place = compute_device([models[i].model() for i in ids if i in models][:1])
    line = f"Computing on **{place}**"
    auto = resolve_device("auto")
    if auto != place:
        line += f" (`auto` would pick {auto}; the dashboard keeps its models on the {place.type})"
    return line


def compute_device(models: list) -> torch.device:
    """The device of the first model (the CPU without models)."""
    return module_device(models[0]) if models else torch.device("cpu")


st.set_page_config(page_title="ccamerge", page_icon=":material/merge:", layout="wide")
state.init()
navigation = st.navigation(PAGES)
with widgets.continue_on_error():
    load_demo()
selection = widgets.sidebar()
widgets.sample_controls()
with st.sidebar, widgets.continue_on_error():
    st.caption(device_line(st.session_state[state.MODELS], selection.ids))
navigation.run()
