"""The diagnosis, feature-explorer and teaching pages on the demo, through AppTest (no browser)."""

from __future__ import annotations

import pytest
from apptest_helpers import assert_ok, opened, texts, visit
from streamlit.testing.v1 import AppTest

from dashboard import state, widgets

NOTE = "What am I looking at?"




def n_charts(at: AppTest) -> int:
    return len(list(at.get("plotly_chart")))


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def ids_of(at: AppTest, prefix: str) -> list[str]:
    return [i for i, e in at.session_state[state.MODELS].items() if e.filename.startswith(prefix)]


def select(at: AppTest, ids: list[str]) -> None:
    at.multiselect(key=state.W_MODELS).set_value(ids).run()
    assert_ok(at)


@pytest.fixture
def app(demo_cache):
    at = opened(120)
    return at


def test_diagnosis_shows_the_checklist_first_and_every_chart_explained(app):
    visit(app, "diagnose")
    assert app.subheader[0].value == "Checklist"
    findings = texts(app.error) + texts(app.warning) + texts(app.info)
    assert "**Next:**" in findings and "(#diag-" in findings
    assert n_charts(app) == 4  # scores, damage, similarity, collapse (no sweep yet)
    assert texts(app.caption).count(NOTE) >= 5
    assert [s.value for s in app.subheader][1:] == [
        "Scores", "Layers ranked by damage", "Similarity per merge point", "Numerical health",
        "Collapse", "Hyperparameter sweep"]
    assert "healthy" in texts(app.info)  # four demo MLP seeds merge well with CCA
    ranking = app.dataframe[0].value
    assert list(ranking["rank"]) == [1, 2] and set(ranking["merge point"]) == {"fc1", "fc2"}
    assert "ccamerge diagnose" in texts(app.caption)


def test_diagnosis_reacts_to_the_method_and_the_sweep(app):
    select(app, ids_of(app, "mlp_w1_same")[:2])
    visit(app, "diagnose")
    app.selectbox(key=state.W_DIAG_METHOD).set_value("average").run()
    assert_ok(app)
    assert "Plain averaging without alignment" in texts(app.error)
    assert app.checkbox(key=state.W_DIAG_SWEEP).disabled
    app.selectbox(key=state.W_DIAG_METHOD).set_value("cca").run()
    app.checkbox(key=state.W_DIAG_SWEEP).check().run()
    assert_ok(app)
    assert n_charts(app) == 5
    assert "best gamma = " in texts(app.caption) and "held-out" in texts(app.caption)
    app.selectbox(key=state.W_DIAG_METHOD).set_value("zipit").run()
    assert_ok(app)
    assert n_charts(app) == 5 and "best alpha = " in texts(app.caption)


def test_diagnosis_names_a_batchnorm_reset_left_off(app):
    select(app, ids_of(app, "vgg_w1_same")[:2])
    visit(app, "diagnose")
    assert not app.toggle(key=state.W_DIAG_BN).disabled
    app.toggle(key=state.W_DIAG_BN).set_value(False).run()
    assert_ok(app)
    assert "BatchNorm statistics were not reset" in texts(app.error)
    assert "--no-bn-reset" in texts(app.caption)


def test_bad_input_shows_an_error_and_keeps_the_controls(app):
    visit(app, "diagnose")
    app.number_input(key=widgets.W_STATS_SAMPLES).set_value(1).run()
    assert_ok(app)
    assert "at least 2 statistics samples" in texts(app.error)
    assert app.selectbox(key=state.W_DIAG_METHOD).value == "cca"
    app.number_input(key=widgets.W_STATS_SAMPLES).set_value(0).run()
    assert_ok(app)
    assert app.subheader[0].value == "Checklist"


def test_explorer_embeds_units_and_inputs(app):
    visit(app, "explorer")
    assert n_charts(app) == 2
    assert texts(app.caption).count(NOTE) >= 2
    first = metrics(app)
    assert len(first) == 4 and all(-1.0 <= float(v) <= 1.0 for v in first.values())
    app.selectbox(key=state.W_EXPL_POINT).set_value("fc2").run()
    app.selectbox(key=state.W_EXPL_METHOD).set_value("permute").run()
    assert_ok(app)
    values = [float(v) for v in metrics(app).values()]
    # the profile Hungarian match is the best pairing; the method's (on training statistics) is
    # at most as good on these profiles
    assert values[2] <= values[1] + 1e-9
    assert "separability" in app.get("plotly_chart")[1].proto.spec


def test_explorer_umap_on_a_small_sample(app):
    pytest.importorskip("umap")
    visit(app, "explorer")
    app.slider(key=state.W_EXPL_SAMPLES).set_value(60).run()
    app.radio(key=state.W_EXPL_EMBEDDING).set_value("umap").run(timeout=240)
    assert_ok(app)
    assert n_charts(app) == 2 and "UMAP 1" in app.get("plotly_chart")[0].proto.spec


def test_teaching_mode_walks_through_the_four_steps_with_live_numbers(app):
    visit(app, "teach")
    assert [h.value for h in app.header] == [
        "1. Swapping hidden units changes nothing", "2. The permutation found by matching",
        "3. CCA, step by step", "4. Why averaging without alignment fails"]
    m = metrics(app)
    assert float(m["largest output change"]) < 1e-4
    assert m["accuracy, original"] == m["accuracy, swapped"]
    assert (float(m["averaged with its swapped copy"].rstrip("%"))
            < float(m["accuracy, original"].rstrip("%")))
    assert float(m["loss barrier, average"]) > float(m["loss barrier, permute"])
    assert n_charts(app) == 5 and texts(app.caption).count(NOTE) >= 5
    before = texts(app.markdown)
    app.select_slider(key=state.W_TEACH_GAMMA).set_value(0.001).run()
    app.selectbox(key=state.W_TEACH_POINT).set_value("fc2").run()
    assert_ok(app)
    assert texts(app.markdown) != before


def test_new_pages_render_on_batchnorm_convnets(app):
    select(app, ids_of(app, "vgg_w1_same"))
    for page, charts in (("diagnose", 4), ("explorer", 2), ("teach", 5)):
        visit(app, page)
        assert n_charts(app) == charts, page
        # on the diagnosis page red boxes are checklist failures, never a page error
        assert all("**Next:**" in str(e.value) for e in app.error), texts(app.error)
