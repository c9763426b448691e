"""Figures, tables and text of the diagnosis, explorer and teaching pages (no Streamlit)."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import pytest

from ccamerge.analysis import explorer
from ccamerge.analysis.diagnose import diagnose
from dashboard import charts_diagnose as cd


@pytest.fixture(scope="module")
def report(mlps, digits):
    return diagnose(mlps[:2], digits, "cca", with_sweep=True)


def broken_report():
    """A BatchNorm merge that breaks at its first point (NaN from there on)."""
    point = {"width": 8, "mean_rho": 0.5, "mean_matched": 0.4, "mean_same_index": 0.0,
             "cond_reference": 10.0, "cond_models": 12.0, "dead_units": [0, 0],
             "samples_per_feature": 100.0, "variance_ratio": None, "partial_accuracy": 10.0,
             "partial_loss": math.nan, "damage_accuracy": 0.0, "damage_loss": None}
    points = [dict(point, name="conv1", damage_loss=math.inf, damage_accuracy=89.0),
              dict(point, name="conv2")]
    return {"method": "cca", "base": [{"accuracy": 99.0, "loss": 0.05}] * 2,
            "ensemble": {"accuracy": 99.2, "loss": 0.04},
            "merged": {"accuracy": 10.0, "loss": math.nan},
            "reference_only": {"accuracy": 99.0, "loss": 0.05}, "points": points,
            "ranking": ["conv1", "conv2"], "healthy": False,
            "findings": [{"id": "bn_not_reset", "severity": "failure", "title": "BN",
                          "next_step": "reset", "chart": "summary"},
                         {"id": "non_finite", "severity": "failure", "title": "NaN",
                          "next_step": "reset", "chart": "collapse"}]}


def test_every_finding_links_to_an_anchor_of_the_page(report):
    assert set(cd.CHARTS) == {"summary", "partial", "spectra", "health", "collapse", "sweep"}
    for finding in report["findings"] + broken_report()["findings"]:
        text = cd.finding_markdown(finding)
        anchor, title = cd.CHARTS[finding["chart"]]
        assert finding["title"] in text and finding["next_step"] in text
        assert f"(#{anchor})" in text and title in text


def test_checklist_groups_failures_first_and_the_verdict_counts_them(report):
    groups = cd.checklist_groups(broken_report()["findings"])
    assert list(groups) == ["failure", "warning", "info"] and len(groups["failure"]) == 2
    assert cd.verdict(broken_report()).startswith("2 failure(s)")
    assert cd.verdict(report).startswith("No failure found") == report["healthy"]


def test_score_damage_similarity_and_collapse_figures(report):
    names = ["a", "b"]
    summary = cd.summary_figure(report, names)
    assert list(summary.data[0].x) == ["a", "b", "ensemble", "merged (cca)"]
    damage = cd.damage_figure(report)
    assert isinstance(damage, go.Figure) and len(damage.data) == 3
    assert list(damage.data[0].x) == ["reference", "+ fc1", "+ fc2"]
    assert list(damage.data[2].y) == report["ranking"][::-1]  # most damaging on top
    assert len(cd.similarity_figure(report).data) == 3
    collapse = cd.collapse_figure(report)
    assert [round(v, 6) for v in collapse.data[0].y] == [round(p["variance_ratio"], 6)
                                                         for p in report["points"]]


def test_figures_survive_a_merge_that_computes_nan():
    broken = broken_report()
    damage = cd.damage_figure(broken)
    assert list(damage.data[2].text) == ["n/a", "breaks (NaN)"]
    assert damage.data[1].y[1] is None  # NaN loss is not drawn
    collapse = cd.collapse_figure(broken)
    assert list(collapse.data[0].text) == ["NaN/inf", "NaN/inf"]
    assert list(collapse.data[0].y) == [0.0, 0.0]
    frame = cd.ranking_frame(broken)
    assert list(frame["merge point"]) == ["conv1", "conv2"] and frame["loss added"][0] == math.inf
    assert cd.health_frame(broken)["variance ratio"].isna().all()


def test_tables_have_one_row_per_point(report):
    ranking = cd.ranking_frame(report)
    assert list(ranking["rank"]) == [1, 2] and list(ranking["merge point"]) == report["ranking"]
    health = cd.health_frame(report)
    assert list(health["merge point"]) == ["fc1", "fc2"]
    assert {"same-index corr.", "variance ratio", "samples / feature"} <= set(health.columns)


def test_gamma_sweep_marks_the_best_and_the_used_setting(report):
    sweep = report["sweep"]
    fig = cd.sweep_figure(sweep)
    assert fig.layout.xaxis.type == "log"
    star = next(t for t in fig.data if t.marker.symbol == "star")
    assert star.x[0] == sweep["best"]["gamma"] and star.y[0] == max(sweep["accuracy"])
    used = next(t for t in fig.data if t.marker.symbol == "diamond")
    assert used.x[0] == 0.1
    text = cd.sweep_caption(sweep)
    assert "best gamma = " in text and "used gamma = 0.1" in text and "held-out" in text


def test_zipit_sweep_is_a_heatmap_with_the_best_cell_starred():
    grid = [{"alpha": a, "beta": b} for a in (0.1, 0.5) for b in (0.0, 0.25)]
    sweep = {"method": "zipit", "grid": grid, "accuracy": [90.0, 91.0, 95.0, 92.0], "best": grid[2],
             "best_index": 2, "parameter": "alpha, beta", "selected_on": "held-out 20%"}
    fig = cd.sweep_figure(sweep)
    heat = fig.data[0]
    assert isinstance(heat, go.Heatmap) and np.asarray(heat.z).shape == (2, 2)
    assert fig.data[1].x[0] == "0.5" and fig.data[1].y[0] == "0"


def test_diagnose_command_reproduces_the_options():
    command = cd.diagnose_command(["a.safetensors", "b.safetensors"], "digits", "cca",
                                  {"gamma": 0.3, "relative": False}, reference=1, bn_reset=False,
                                  stats_samples=200, sweep=True)
    assert command.startswith("ccamerge diagnose a.safetensors b.safetensors --data digits")
    for flag in ("--method cca", "--reference 1", "--gamma 0.3", "--absolute", "--no-bn-reset",
                 "--stats-samples 200", "--sweep", "--json"):
        assert flag in command
    assert "--max-sweeps 5" in cd.diagnose_command([], "digits", "weight_matching",
                                                   {"max_sweeps": 5}, reference=0, bn_reset=True,
                                                   stats_samples=None, sweep=False)


def units_fixture(n=4, inputs=6):
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(n, inputs))
    model = ref[::-1] + 0.01 * rng.normal(size=(n, inputs))
    return explorer.UnitSet("fc1", n, np.concatenate([ref, model, ref, ref]),
                            tuple(np.repeat(explorer.GROUPS, n)), np.tile(np.arange(n), 4),
                            np.concatenate([np.arange(n)[::-1]] * 2 + [np.arange(n)] * 2),
                            np.full(4 * n, 0.9), inputs)


def test_unit_embedding_colours_by_model_and_hover_names_the_partner():
    units = units_fixture()
    labels = {"reference": "A", "model": "B", "aligned": "B aligned", "merged": "merged"}
    hover = cd.unit_hover(units, labels)
    assert hover[0] == "A unit 0<br>matched to B unit 3 (r = 0.90)"
    assert hover[4] == "B unit 0<br>matched to A unit 3 (r = 0.90)"
    assert hover[8].startswith("B aligned unit 0<br>aligned to A unit 0")
    fig = cd.unit_embedding_figure(explorer.embed_units(units.profiles), units, labels)
    assert [t.name for t in fig.data] == list(labels.values())
    assert len({t.marker.color for t in fig.data}) == 4 and all(len(t.x) == 4 for t in fig.data)


def test_input_embedding_has_a_panel_per_model_with_its_separability():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 10)
    features = rng.normal(size=(30, 5)) + 4 * labels[:, None]
    emb = explorer.embed_inputs(features, labels)
    fig = cd.input_embedding_figure([("A", emb), ("B", emb)])
    titles = [a.text for a in fig.layout.annotations]
    assert len(titles) == 2 and "separability 100.0%" in titles[0]
    assert len(fig.data) == 2 * 3 and sum(t.showlegend for t in fig.data) == 3


def test_teaching_figures_and_number_tables():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 6))
    cov = a.T @ a / 20
    frame = cd.corner_frame(cov, 3, rows="x", cols="y")
    assert frame.shape == (3, 3) and list(frame.columns) == ["y0", "y1", "y2"]
    assert frame.iloc[1, 2] == pytest.approx(cov[1, 2])
    eig = np.linalg.eigvalsh(cov)
    assert cd.eigen_figure(eig, eig).layout.yaxis.type == "log"
    rho = np.linspace(0.9, 0.1, 6)
    fig = cd.rho_figure(rho * 0.5, rho, rho[::-1] * 0.7, shrunk_name="shrunk (γ = 1)")
    assert list(fig.data[0].y) == list(rho) and fig.data[0].name.startswith("correlation reached")
    assert fig.data[1].name == "shrunk (γ = 1)" and list(fig.data[1].y) == list(rho * 0.5)
    assert list(fig.data[2].y) == sorted(rho * 0.7, reverse=True)
    cov_fig = cd.covariance_figure(cov, cov * 0.1)
    assert cov_fig.layout.coloraxis.cmax < 1.0 or np.abs(cov).max() >= 1.0
