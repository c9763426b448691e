"""The Spectra page's figures, tables and sentences, on rows the library computes from
constructed statistics."""

from __future__ import annotations

import numpy as np
import pytest

from ccamerge.analysis.spectra import spectrum_row
from ccamerge.stats import PointStatistics
from dashboard import charts_spectra as cs


def point_of(x: np.ndarray, y: np.ndarray, name: str) -> PointStatistics:
    c = np.cov(np.hstack([x, y]), rowvar=False)
    n = x.shape[1]
    return PointStatistics(name, n, len(x), [x.mean(0), y.mean(0)],
                           {(0, 0): c[:n, :n], (1, 1): c[n:, n:], (0, 1): c[:n, n:]})


def draw(rng, count: int, mix: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """X ``[count, n]`` with correlated units and Y = X R + noise."""
    x = rng.standard_normal((count, len(mix))) @ mix
    return x, x @ r + rng.standard_normal(x.shape) * 3.0


def rows_for(samples: int = 2000, held: bool = True, n: int = 8) -> list[dict]:
    """Rows of two merge points for model 1, fitted on ``samples`` samples, measured on 500
    other samples (``held``)."""
    rng = np.random.default_rng(0)
    out = []
    for name in ("fc1", "fc2"):
        maps = rng.standard_normal((n, n)), rng.standard_normal((n, n))
        fit = point_of(*draw(rng, samples, *maps), name)
        other = point_of(*draw(rng, 500, *maps), name) if held else None
        out.append(spectrum_row(fit, other, 0, 1, gamma=0.1, relative=True))
    return out


@pytest.mark.parametrize("value, text", [(338.8, "339"), (5349725525202639000.0, "5.3e18"),
                                         (float("inf"), "∞ (singular)"), (0.0, "∞ (singular)"),
                                         (12345.0, "1.2e4"), (3.0, "3")])
def test_condition_numbers_read_as_people_write_them(value, text):
    assert cs.format_condition(value) == text


def test_the_spectrum_figure_labels_shrunk_values_and_reached_correlations():
    rows = rows_for()
    fig = cs.spectrum_figure(rows, gamma=0.1, relative=True, model_names={1: "b"})
    names = [t.name for t in fig.data]
    assert names == ["CCA pairs, held-out: b", "matched unit pairs, held-out: b",
                     "shrunk singular values (ridge γ = 0.1, relative): b"] * 2
    assert list(fig.data[0].y) == rows[0]["reached_heldout"]
    assert [a.text for a in fig.layout.annotations] == ["fc1", "fc2"]
    alone = cs.spectrum_figure(rows_for(held=False), gamma=0.1, relative=True)
    assert alone.data[0].name.startswith("CCA pairs, fitting images")


def test_the_means_figure_shows_the_rows_means():
    rows = rows_for()
    fig = cs.means_figure(rows, gamma=1.0, relative=False)
    by_name = {bar.name: list(bar.y) for bar in fig.data}
    assert by_name["CCA pairs, held-out"] == [r["mean_reached_heldout"] for r in rows]
    assert by_name["shrunk singular values (ridge γ = 1)"] == [r["mean_shrunk"] for r in rows]
    assert set(by_name) == {"CCA pairs, held-out", "CCA pairs, fitting images",
                            "matched unit pairs, held-out", "shrunk singular values (ridge γ = 1)"}
    assert fig.layout.yaxis.range[0] == 0


def test_the_headline_states_reached_and_shrunk_numbers():
    rows = rows_for()
    text = cs.headline(rows[:1], 0.1, True)
    m = cs.point_means(rows[:1])
    assert f"**{m['reached_heldout']:.3f}** is the mean correlation" in text
    assert f"{m['shrunk']:.3f} is the mean of the shrunk singular values" in text
    best = max(rows[0]["matched_heldout"])
    count = int((np.asarray(rows[0]["reached_heldout"]) > best).sum())
    assert cs.pairs_above_matching(rows[0]) == count and f"The first {count} canonical" in text
    assert "none held out" in cs.headline(rows_for(held=False)[:1], 0.1, True)


def test_warnings_name_overfitting_few_samples_dead_units_and_bad_conditioning():
    assert cs.health_warnings(rows_for()) == []
    thin = rows_for(samples=40)  # 5 samples per feature: chance alone reaches ~0.7
    warnings = cs.health_warnings(thin)
    assert any("overfits" in w and "fc1: 5.0 samples per feature" in w for w in warnings)
    assert any(w.startswith("Few samples per feature") for w in warnings)
    broken = [dict(rows_for()[0], cond_xx=float("inf"), dead_reference=2)]
    warnings = cs.health_warnings(broken, {1: "b"})
    assert any("Dead units" in w and "fc1 (b): 2 in the reference" in w for w in warnings)
    assert any("∞ (singular)" in w and "over 1.0e8" in w for w in warnings)


def test_tables_per_point_and_model():
    rows = rows_for()
    frame = cs.correlation_frame(rows, {1: "b"})
    assert list(frame["CCA pairs, held-out"]) == [r["mean_reached_heldout"] for r in rows]
    health = cs.health_frame(rows, {1: "b"})
    assert list(health["model"]) == ["b", "b"] and health["cond(S_xx)"].map(type).eq(str).all()
