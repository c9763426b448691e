"""Feature matching explains how a spread-out CCA map can merge like a permutation."""

from __future__ import annotations

import json

import pytest
from apptest_helpers import assert_ok, opened
from streamlit.testing.v1 import AppTest

from ccamerge.api import merge
from ccamerge.evaluate import evaluate_model
from dashboard import state


@pytest.fixture
def app(demo_cache):
    at = opened(180)
    at.switch_page("../pages/features.py").run()
    assert_ok(at)
    return at


def chart(at: AppTest, key: str) -> list[dict]:
    found = next(c for c in at.get("plotly_chart") if key in c.proto.id)
    return json.loads(found.proto.spec)["data"]


def test_the_spread_map_is_reconciled_with_the_permutation(app):
    shown = {m.label: m.value for m in app.metric}
    cca = float(shown["CCA's mix vs reference unit (held-out)"])
    perm = float(shown["matched unit vs reference unit (held-out)"])
    mix = float(shown["CCA's mix vs matched unit (held-out)"])
    assert cca > perm + 0.1 and 0 < mix < 1  # the demo MLPs: about 0.88 against 0.60
    units = round(float(shown["mean participation ratio"]))
    conclusion = next(m.value for m in app.markdown if "Each CCA feature mixes" in m.value)
    assert f"mixes about {units} units" in conclusion
    assert f"**{cca:.2f}**" in conclusion and f"**{perm:.2f}**" in conclusion
    curves = {t["name"]: t["y"] for t in chart(app, "partial_merges_chart")}
    assert set(curves) == {"cca", "permute"} and len(curves["cca"]) == 3  # reference, fc1, fc2
    assert f"{curves['cca'][-1]:.1f}% with CCA" in conclusion


def test_the_partial_merges_end_at_the_pair_merge(app):
    sel = app.session_state[state.SELECTION]
    entries = app.session_state[state.MODELS]
    pair = [entries[sel.ids[sel.reference]].model(), entries[sel.others[0]].model()]
    from dashboard import data

    digits = data.dataset("digits")
    curves = {t["name"]: t["y"] for t in chart(app, "partial_merges_chart")}
    for method, options in (("cca", {"gamma": 0.1, "relative": True}), ("permute", {})):
        merged = merge(data.fresh(pair), digits, method, bn_reset=False, **options).model
        expected = evaluate_model(merged, digits.x_test, digits.y_test)["accuracy"]
        assert curves[method][-1] == pytest.approx(expected)
    alone = evaluate_model(data.fresh(pair)[0], digits.x_test, digits.y_test)["accuracy"]
    assert curves["cca"][0] == pytest.approx(alone) == pytest.approx(curves["permute"][0])
