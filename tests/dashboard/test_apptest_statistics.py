"""One statistics pass per selection across pages, the sidebar's sample sizes in the recipe,
and results that survive switching pages (AppTest on the demo)."""

from __future__ import annotations

import json

import pytest
from apptest_helpers import assert_ok, opened, texts, visit
from streamlit.testing.v1 import AppTest

import ccamerge.analysis.diagnose as diagnose_module
from ccamerge import api
from dashboard import data, state, widgets


@pytest.fixture
def app(demo_cache):
    at = opened(120)
    ids = [i for i, e in at.session_state[state.MODELS].items()
           if e.filename.startswith("mlp_w1_same")][:2]
    at.multiselect(key=state.W_MODELS).set_value(ids).run()
    assert_ok(at)
    return at


def counter(monkeypatch, module, name: str) -> list:
    """Replace ``module.name`` by a wrapper that records each call."""
    calls, real = [], getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, spy)
    return calls


def run_merge(at: AppTest, methods: list[str]) -> None:
    visit(at, "merge")
    at.multiselect(key=state.W_MERGE_METHODS).set_value(methods).run()
    at.button(key=state.W_MERGE_RUN).click().run()
    assert_ok(at)
    assert at.session_state[state.MERGE_RESULTS]["merges"], texts(at.error)


def test_merging_with_several_methods_and_the_diagnosis_sweep_collect_statistics_once(
        app, monkeypatch):
    passes = []
    for module in (data, api, diagnose_module):  # the dashboard's pass and any library pass
        passes += [counter(monkeypatch, module, "collect_statistics")]
    app.number_input(key=widgets.W_STATS_SAMPLES).set_value(617).run()  # a size no test used
    run_merge(app, ["permute", "cca", "zipit"])
    merges = app.session_state[state.MERGE_RESULTS]["merges"]
    assert [m["method"] for m in merges] == ["permute", "cca", "zipit"]
    assert all(m["held_out_accuracy"] is not None for m in merges)  # ranked without a pass
    visit(app, "diagnose")
    app.checkbox(key=state.W_DIAG_SWEEP).check().run()
    assert_ok(app)
    assert len(list(app.get("plotly_chart"))) == 5  # the four charts and the sweep's
    assert sum(len(p) for p in passes) == 1


def test_the_statistics_images_are_a_sidebar_setting_recorded_in_the_recipe(app):
    box = app.number_input(key=widgets.W_STATS_SAMPLES)
    assert box.value == data.STATS_SAMPLES
    assert app.number_input(key=widgets.W_TEST_SAMPLES).value == data.TEST_SAMPLES
    box.set_value(500).run()
    run_merge(app, ["cca"])
    recipe = json.loads(app.session_state[state.MERGE_RESULTS]["recipes"]["cca"])
    assert recipe["stats_samples"] == 500
    assert "Statistics on 500 of" in texts(app.caption)


def test_results_survive_switching_pages(app, monkeypatch):
    app.number_input(key=widgets.W_STATS_SAMPLES).set_value(619).run()
    merges = counter(monkeypatch, api, "merge")
    diagnoses = counter(monkeypatch, data, "diagnose")
    run_merge(app, ["permute"])
    visit(app, "diagnose")
    assert app.subheader[0].value == "Checklist"
    visit(app, "spectra")
    visit(app, "merge")
    assert any(s.value.startswith("Results: 2 models") for s in app.subheader)
    assert "earlier settings" not in texts(app.info)
    visit(app, "diagnose")
    assert app.subheader[0].value == "Checklist"
    assert (len(merges), len(diagnoses)) == (1, 1)  # nothing was computed again
