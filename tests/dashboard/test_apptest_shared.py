"""The Spectra page's shared-space section (gcca, all N models): it renders on the demo's four
models and on three, its numbers are the library's, and it says what they are."""

from __future__ import annotations

import json

import numpy as np
import pytest
from apptest_helpers import assert_ok, opened, texts, visit
from streamlit.testing.v1 import AppTest

from ccamerge import api
from dashboard import state


def traces(at: AppTest, key: str) -> list[dict]:
    chart = next(c for c in at.get("plotly_chart") if c.proto.id and key in c.proto.id)
    return json.loads(chart.proto.spec)["data"]


def selected_models(at: AppTest) -> list:
    sel = at.session_state[state.SELECTION]
    return [at.session_state[state.MODELS][i].model() for i in sel.ids]


def shared_metrics(at: AppTest) -> dict:
    return {m.label: m for m in at.metric if m.label.startswith("shared correlation")}


@pytest.fixture
def app(demo_cache):
    return opened(180)


def check_section(at: AppTest, n: int) -> None:
    assert f"Shared space (gcca, all {n} models)" in texts(at.subheader)
    shown = shared_metrics(at)
    assert set(shown) == {"shared correlation, fc1", "shared correlation, fc2"}
    assert all(m.delta.endswith(f" of {n}") for m in shown.values())
    notes = texts(at.caption)
    assert "(λ − 1)/(N − 1)" in notes and "the outlier" in notes and "--shared" in notes
    assert "correlate, averaged over model pairs and directions on held-out images" in notes
    names = [t["name"] for t in traces(at, "shared_chart")]
    assert "shared directions, held-out" in names and "shared directions, fitting images" in names
    assert sum(n.startswith("CCA pairs, held-out") for n in names) == 2 * (n - 1)
    assert len(traces(at, "consensus_chart")) == 2 * n
    assert "Follows the shared variates least" in texts(at.markdown)
    table = at.dataframe[-2].value  # the per-model table, before the health table
    assert len(table) == 2 * n and (table["variance in the shared directions"] <= 1 + 1e-9).all()


def test_shared_space_renders_on_the_demo_with_the_librarys_numbers(app):
    visit(app, "spectra")
    models = selected_models(app)
    check_section(app, len(models))
    from dashboard import data

    rows = api.shared_spectrum(models, data.dataset("digits"), gamma=0.1, relative=True,
                               seed=data.SEED)
    for row in rows:
        shown = shared_metrics(app)[f"shared correlation, {row['name']}"]
        assert float(shown.value) == pytest.approx(row["mean_rho_heldout"], abs=5e-4)
        assert float(shown.delta.split()[2]) == pytest.approx(row["mean_eigenvalues"], abs=5e-3)
        assert 1.0 <= row["mean_eigenvalues"] <= len(models)
    drawn = [t for t in traces(app, "shared_chart") if t["name"] == "shared directions, held-out"]
    for trace, row in zip(drawn, rows, strict=True):
        np.testing.assert_allclose(trace["y"], row["rho_heldout"], atol=1e-9)


def test_shared_space_with_three_models_and_a_changed_gamma(app):
    ids = list(app.session_state[state.SELECTION].ids)
    app.multiselect(key=state.W_MODELS).set_value(ids[:3]).run()
    assert_ok(app)
    visit(app, "spectra")
    check_section(app, 3)
    before = {k: float(m.delta.split()[2]) for k, m in shared_metrics(app).items()}
    app.select_slider(key=state.W_SPEC_GAMMA).set_value(0.001).run()
    assert_ok(app)
    check_section(app, 3)
    after = {k: float(m.delta.split()[2]) for k, m in shared_metrics(app).items()}
    assert all(after[k] > before[k] for k in before)  # the ridge shrinks the eigenvalues
