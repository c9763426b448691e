"""Figures and tables of the dashboard, from plain arrays (no Streamlit)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest

from ccamerge.methods import METHODS
from dashboard import charts, merging


def test_every_method_has_its_own_colour():
    colours = [charts.method_color(m) for m in METHODS]
    assert len(set(colours)) == len(METHODS)


def test_matrix_pair_figure_shares_one_centred_scale():
    left = np.random.default_rng(0).uniform(-1, 1, (5, 5))
    fig = charts.matrix_pair_figure(left, np.eye(5), titles=("a", "b"), x_title="x", y_title="y")
    assert len(fig.data) == 2 and all(isinstance(t, go.Heatmap) for t in fig.data)
    assert fig.layout.coloraxis.cmid == 0 and fig.layout.coloraxis.cmax == 1.0
    huge = left.copy()
    huge[0, 0] = 1e6
    fig = charts.matrix_pair_figure(huge, np.eye(5), titles=("a", "b"), x_title="x", y_title="y")
    assert fig.layout.coloraxis.cmax < 1e6  # a few huge entries saturate


def test_window_keeps_small_matrices_and_bounds_wide_ones():
    small = np.eye(10)
    z, rows, cols = charts.window(small)
    assert z is small and rows == list(range(10))
    wide = np.random.default_rng(1).normal(size=(300, 300))
    z, rows, cols = charts.window(wide, view="aggregate")
    assert max(z.shape) <= 128 and rows[:2] == [0, 3]
    z, rows, cols = charts.window(wide, view="zoom", start=250)
    assert z.shape == (128, 128) and rows[0] == 172  # clipped so the window stays full
    np.testing.assert_array_equal(z, wide[172:300, 172:300])


def test_transform_views_turn_the_permutation_into_the_identity():
    perm = np.array([2, 0, 1])
    p = np.zeros((3, 3))
    p[perm, np.arange(3)] = 1.0
    t_view, p_view = charts.transform_views(p * 2, p, perm, matched_order=True)
    np.testing.assert_array_equal(p_view, np.eye(3))
    np.testing.assert_array_equal(t_view, 2 * np.eye(3))
    _, raw = charts.transform_views(p, p, perm, matched_order=False)
    np.testing.assert_array_equal(raw, p.T)


def test_spread_figure_and_frame_skip_nan():
    top1 = np.array([1.0, 0.5, np.nan])
    fig = charts.spread_figure(top1, np.array([1.0, 2.0, np.nan]), np.array([1, 2, 0]))
    assert len(fig.data) == 3 and len(fig.data[0].x) == 2
    frame = charts.spread_frame(top1, top1, np.array([1, 2, 0]), np.array([True, False, False]),
                                np.array([1, 0, 2]))
    assert list(frame["matched model unit"]) == [1, 0, 2]


def curve(method, peak):
    lambdas = np.linspace(0, 1, 5)
    loss = 0.1 + peak * np.sin(np.pi * lambdas)
    return {"method": method, "lambdas": lambdas.tolist(), "loss": loss.tolist(),
            "accuracy": (97 - 10 * peak * np.sin(np.pi * lambdas)).tolist(), "barrier": peak}


def test_interpolation_figure_and_barrier_table():
    curves = [curve("average", 0.5), curve("cca", 0.01)]
    fig = charts.interpolation_figure(curves)
    assert len(fig.data) == 2 + 4  # average whole; cca's two halves, loss and accuracy each
    assert {t.line.color for t in fig.data} == {charts.method_color("average"),
                                                 charts.method_color("cca")}
    names = [t.name for t in fig.data if t.showlegend]
    assert names == ["average", "cca, aligned to A", "cca, aligned to B"]
    halves = [t for t in fig.data if t.name.startswith("cca") and t.xaxis == "x2"]
    assert [list(t.x) for t in halves] == [[0.0, 0.25, 0.5], [0.75, 1.0]]
    assert fig.layout.yaxis2.range == (85, 101)  # every accuracy above 60: the axis says so
    assert fig.layout.yaxis2.title.text == "test accuracy (%), axis from 85"
    frame = charts.barrier_frame(curves)
    assert list(frame["method"]) == ["average", "cca"]
    assert frame["accuracy at λ=0.5 (%)"].iloc[0] == pytest.approx(92.0)


def test_results_table_chart_and_warnings():
    base = {"models": [{"accuracy": 97.0, "loss": 0.1}, {"accuracy": 96.0, "loss": 0.12}],
            "ensemble": {"accuracy": 97.5, "loss": 0.09}}
    merges = [{"method": "average", "accuracy": 50.0, "loss": 1.5, "seconds": 0.01,
               "warnings": ["w1"]},
              {"method": "cca", "accuracy": 96.5, "loss": 0.11, "seconds": 0.2, "warnings": ["w1"]}]
    frame = charts.results_frame(["a", "b"], base, merges)
    assert list(frame["kind"]) == ["base model", "base model", "ensemble", "merge", "merge"]
    fig = charts.results_figure(frame)
    assert list(fig.data[0].marker.color)[-1] == charts.method_color("cca")
    assert fig.layout.yaxis.range[0] == 0  # bars start at 0
    assert charts.merge_warnings(merges) == {"w1": ["average", "cca"]}


def test_accuracy_vs_n_figure():
    points = [{"method": m, "n": n, "accuracy": 90 - n} for m in ("cca", "ensemble")
              for n in (2, 3, 4)]
    fig = charts.accuracy_vs_n_figure(points)
    assert [t.name for t in fig.data] == ["cca", "ensemble"]
    assert fig.data[1].line.dash == "dash"


def test_merge_plan_and_subsets():
    assert merging.subset_indices(4, 2, 2) == [0, 2]
    assert merging.subset_indices(4, 0, 3) == [0, 1, 2]
    assert merging.subset_indices(4, 3, 4) == [0, 1, 2, 3]
    assert merging.plan(3, ["a", "b"], curve=False) == [("a", 3), ("b", 3)]
    assert merging.plan(3, ["a"], curve=True) == [("a", 3), ("a", 2)]
    assert merging.repairs("cca", True) and not merging.repairs("zipit", True)


@pytest.mark.parametrize("values, start", [([95.2, 97.0], 90), ([12.0, 97.0], 0),
                                           ([61.0, 99.0], 55), ([], 0)])
def test_accuracy_axes_start_at_0_or_say_where_they_start(values, start):
    axis = charts.accuracy_axis(values)
    assert axis["range"] == [start, 101]
    assert (f"axis from {start}" in axis["title"]) is (start > 0)


def curves_of(cca: float, permute: float, reference: float = 97.5) -> list[dict]:
    return [{"method": m, "points": ["fc1", "fc2"], "accuracy": [reference, (reference + a) / 2, a]}
            for m, a in (("cca", cca), ("permute", permute))]


@pytest.mark.parametrize("cca, permute, says", [
    (96.7, 95.8, "a permutation is already close enough"),
    (96.0, 90.0, "CCA recovers 6.0 of the 7.5 points"),
    (75.0, 91.9, "does not pay off")])
def test_the_alignment_conclusion_follows_the_numbers(cca, permute, says):
    means = {"cca": 0.88, "permute": 0.6, "mix_vs_match": 0.61}
    text = charts.alignment_conclusion(means, 22.04, curves_of(cca, permute), where="held-out")
    assert "mixes about 22 units" in text and "**0.88**" in text and "**0.60**" in text
    assert says in text and f"{cca:.1f}% with CCA and {permute:.1f}% with the permutation" in text


def test_partial_merges_and_aligned_units_figures():
    fig = charts.partial_merges_figure(curves_of(96.7, 95.8))
    assert [t.name for t in fig.data] == ["cca", "permute"]
    assert list(fig.data[0].x) == ["reference", "+ fc1", "+ fc2"]
    assert fig.layout.yaxis.range[0] == 90
    values = np.array([0.2, np.nan, 0.9, 0.5])
    fig = charts.aligned_units_figure(values, values / 2, values, where="held-out")
    assert list(fig.data[0].y) == [0.9, 0.5, 0.2]  # sorted, dead (NaN) units left out


def test_dead_unit_notes_of_every_point_and_method_become_one_warning():
    from ccamerge.api import sample_warnings
    from ccamerge.stats import PointStatistics, Statistics

    def point(name, dead):
        var = np.ones(4)
        var[:dead] = 0.0
        return PointStatistics(name, 4, 400, [np.zeros(4)] * 2,
                               {(0, 0): np.diag(var), (1, 1): np.eye(4), (0, 1): np.zeros((4, 4))})

    notes = sample_warnings(Statistics({f"conv{k}": point(f"conv{k}", k % 3 + 1)
                                        for k in range(1, 7)}, 2, 0, "reference"))
    assert len(notes) == 6  # one per merge point, as the library says it
    merges = [{"method": m, "warnings": notes + (["other"] if m == "cca" else [])}
              for m in ("permute", "ot", "cca")]
    grouped = charts.merge_warnings(merges)
    assert len(grouped) == 2 and grouped["other"] == ["cca"]
    dead, methods = next(iter(grouped.items()))
    assert dead.startswith("Dead units") and methods == ["permute", "ot", "cca"]
    assert "conv1 [2, 0]" in dead and "conv6 [1, 0]" in dead


def test_merges_are_ranked_and_labelled_by_held_out_accuracy():
    merges = [{"method": "average", "accuracy": 50.0, "loss": 1.5, "seconds": 0.1,
               "held_out_accuracy": 52.0},
              {"method": "permute", "accuracy": 96.9, "loss": 0.1, "seconds": 0.1,
               "held_out_accuracy": 97.0},
              {"method": "cca", "accuracy": 96.4, "loss": 0.1, "seconds": 0.1,
               "held_out_accuracy": 98.1},
              {"method": "ot", "accuracy": 99.0, "loss": 0.1, "seconds": 0.1,
               "held_out_accuracy": None}]
    assert [m["method"] for m in merging.ranked(merges)] == ["cca", "permute", "average", "ot"]
    assert charts.merge_label(merges[2]) == "cca (98.1% held-out, 96.4% test)"
    assert charts.merge_label(merges[3]) == "ot (99.0% test)"
    base = {"models": [{"accuracy": 97.0, "loss": 0.1}],
            "ensemble": {"accuracy": 97.5, "loss": 0.09}}
    frame = charts.results_frame(["a"], base, merges)
    held = frame["held-out accuracy (%)"]
    assert held.iloc[:2].isna().all() and list(held.iloc[2:5]) == [52.0, 97.0, 98.1]
    assert charts.results_figure(frame).layout.yaxis.range[0] == 0
