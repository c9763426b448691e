"""The Spectra and Teaching pages say what their numbers are: correlations the canonical pairs
reach (held-out), next to singular values labelled as shrunk, never the other way round."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from apptest_helpers import assert_ok, opened, texts, visit
from streamlit.testing.v1 import AppTest

from ccamerge.api import spectrum
from dashboard import state

CONDITION = re.compile(r"^(\d+(\.\d+)?|\d\.\de\d+|∞ \(singular\))$")




def traces(at: AppTest, key: str) -> list[dict]:
    chart = next(c for c in at.get("plotly_chart") if c.proto.id and key in c.proto.id)
    return json.loads(chart.proto.spec)["data"]


@pytest.fixture
def app(demo_cache):
    at = opened(180)
    return at


def selected_models(at: AppTest) -> list:
    sel = at.session_state[state.SELECTION]
    return [at.session_state[state.MODELS][i].model() for i in sel.ids]


def test_spectra_show_reached_correlations_and_label_the_shrunk_ones(app):
    visit(app, "spectra")
    notes = texts(app.caption)
    assert "shrunk singular values (ridge γ = 0.1, relative), not a correlation" in notes
    assert "is what CCA Merge gains" not in notes and "always at least as high" not in notes
    names = [t["name"] for t in traces(app, "spectrum_chart")]
    assert any(n.startswith("CCA pairs, held-out") for n in names)
    assert any(n.startswith("shrunk singular values (ridge γ = 0.1") for n in names)
    assert not any("ρ" in n or "canonical correlation" in n for n in names)
    # the headline is what the pairs reach on held-out images, recomputed through the library
    from dashboard import data

    rows = spectrum(selected_models(app), data.dataset("digits"), gamma=0.1, relative=True,
                    seed=data.SEED)
    for point in ("fc1", "fc2"):
        at_point = [r for r in rows if r["name"] == point]
        shown = next(m for m in app.metric if m.label == f"correlation reached, {point}")
        assert float(shown.value) == pytest.approx(
            np.mean([r["mean_reached_heldout"] for r in at_point]), abs=5e-4)
        shrunk = float(shown.delta.split("shrunk s.v. ")[1])
        assert shrunk < float(shown.value) - 0.1  # the ridge shrinks; the pairs reach more
    for row in rows:  # on the images they were fitted on, the pairs reach at least s_k
        assert (np.asarray(row["reached_fit"]) >= np.asarray(row["shrunk"]) - 1e-9).all()


def test_spectra_at_gamma_zero_warn_of_overfitting_and_format_condition_numbers(app):
    visit(app, "spectra")
    app.select_slider(key=state.W_SPEC_GAMMA).set_value(0.0).run()
    assert_ok(app)
    warnings = texts(app.warning)
    assert "overfits" in warnings and "chance" in warnings
    assert "Few samples per feature" in warnings  # 80% of digits' 1437 images for 128 units
    health = app.dataframe[-1].value
    for column in ("cond(S_xx)", "cond(S_yy)"):
        assert all(CONDITION.match(v) for v in health[column]), list(health[column])
    assert any("e" in v or "∞" in v for v in health["cond(S_xx)"])


def test_teaching_step_c_names_shrunk_values_and_reached_correlations(app):
    visit(app, "teach")
    steps = texts(app.markdown)
    assert "The singular values ρ are the canonical correlations" not in steps
    assert "**shrunk**, not correlations" in steps and "corr(X a_k, Y b_k)" in steps
    assert "on the held-out 20%" in steps
    names = [t["name"] for t in traces(app, "teach_rho_chart")]
    assert names[0].startswith("correlation reached by pair k (held-out")
    assert names[1].startswith("shrunk singular values (ridge γ")
