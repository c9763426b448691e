"""The shared model + merge-point picker on the three pages that use it (feature matching,
feature explorer, teaching mode), through AppTest on the demo: each page keeps its own widget
keys, the choice drives the page, and it survives a page switch."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dashboard import state

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")
PICKERS = {  # page: (model key, point key, model label)
    "features": (state.W_FEAT_MODEL, state.W_FEAT_POINT, "Model compared with the reference"),
    "explorer": (state.W_EXPL_MODEL, state.W_EXPL_POINT, "Model i"),
    "teach": (state.W_TEACH_MODEL, state.W_TEACH_POINT, "Model i (compared with the reference)"),
}


def visit(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"../pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def page_text(at: AppTest) -> str:
    parts = [*at.markdown, *at.caption, *at.subheader, *at.header]
    return " | ".join(str(e.value) for e in parts) + " | ".join(m.label for m in at.metric)


@pytest.fixture(scope="module")
def app(demo_cache):
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    assert not at.exception
    return at


@pytest.mark.parametrize("page", list(PICKERS))
def test_the_picker_drives_the_page_under_its_own_keys(app, page):
    model_key, point_key, label = PICKERS[page]
    visit(app, page)
    sel, models = app.session_state[state.SELECTION], app.session_state[state.MODELS]
    model, point = app.selectbox(key=model_key), app.selectbox(key=point_key)
    assert model.label == label and point.label == "Merge point"
    assert model.options == [models[i].name for i in sel.others]
    assert [o.split(" (")[0] for o in point.options] == ["fc1", "fc2"]
    assert all(o.endswith(" units)") for o in point.options)
    chosen = sel.others[-1]
    assert model.value != chosen and "at fc1" in page_text(app) and "fc2" not in page_text(app)
    model.set_value(chosen)
    point.set_value("fc2")
    visit(app, page)
    text = page_text(app)
    assert "at fc2" in text and "at fc1" not in text and models[chosen].name in text
    visit(app, "spectra")
    visit(app, page)
    assert app.selectbox(key=model_key).value == chosen
    assert app.selectbox(key=point_key).value == "fc2"
