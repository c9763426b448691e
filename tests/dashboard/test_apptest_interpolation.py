"""Interpolation draws CCA's two halves apart and takes method options; a setting the
diagnosis recommends is applied to the Merge and Interpolation pages in one click."""

from __future__ import annotations

import json

import pytest
from apptest_helpers import assert_ok, opened, texts, visit
from streamlit.testing.v1 import AppTest

from ccamerge.api import interpolate
from dashboard import state


@pytest.fixture
def app(demo_cache):
    at = opened(240)
    mlps = [i for i, e in at.session_state[state.MODELS].items()
            if e.filename.startswith("mlp_w1_same")]
    at.multiselect(key=state.W_MODELS).set_value(mlps[:2]).run()
    assert_ok(at)
    return at


def traces(at: AppTest) -> list[dict]:
    chart = next(c for c in at.get("plotly_chart") if "interpolation_chart" in c.proto.id)
    return json.loads(chart.proto.spec)["data"]


def test_cca_is_drawn_as_two_labelled_halves_and_takes_its_options(app):
    visit(app, "interpolation")
    app.multiselect(key=state.W_INTERP_METHODS).set_value(["permute", "cca"]).run()
    app.slider(key=state.W_INTERP_STEPS).set_value(5).run()
    assert_ok(app)
    shown = {t["name"]: t["x"] for t in traces(app) if t["xaxis"] == "x2"}
    assert shown == {"permute": [0.0, 0.25, 0.5, 0.75, 1.0], "cca, aligned to A": [0.0, 0.25, 0.5],
                     "cca, aligned to B": [0.75, 1.0]}
    assert "two halves" in texts(app.caption)
    before = float(next(m.value for m in app.metric if m.label == "barrier: cca"))
    app.number_input(key=state.option_key("interp", "cca", "gamma")).set_value(1000.0).run()
    assert_ok(app)
    after = float(next(m.value for m in app.metric if m.label == "barrier: cca"))
    assert after != pytest.approx(before)
    sel = app.session_state[state.SELECTION]
    models = [app.session_state[state.MODELS][i].model() for i in sel.ids]
    from dashboard import data

    curve = interpolate(*data.fresh(models), data.dataset("digits"), "cca", steps=5,
                        bn_reset=False, gamma=1000.0, relative=True)
    assert after == pytest.approx(curve["barrier"], abs=5e-4)
    assert "for cca add `--gamma 1000.0 --relative`" in texts(app.caption)


def test_the_sweeps_best_setting_is_applied_to_merge_and_interpolation(app):
    visit(app, "diagnose")
    app.checkbox(key=state.W_DIAG_SWEEP).check().run()
    assert_ok(app)
    button = app.button(key=f"{state.W_DIAG_APPLY}_sweep")
    assert button.label.startswith("Apply cca gamma = ")
    gamma = float(button.label.split("gamma = ")[1].split(",")[0])
    button.click().run()
    assert_ok(app)
    assert "Applied: cca gamma = " in texts(app.success)
    for page, prefix in (("merge", "merge"), ("interpolation", "interp")):
        visit(app, page)
        assert app.number_input(key=state.option_key(prefix, "cca", "gamma")).value == gamma
        assert app.checkbox(key=state.option_key(prefix, "cca", "relative")).value is True
        assert "applied from the sweep (held-out" in texts(app.info)
    app.number_input(key=state.option_key("interp", "cca", "gamma")).set_value(0.5).run()
    assert_ok(app)
    assert "applied from" not in texts(app.info)  # changed by hand: no longer the applied one
