"""Figures and tables of the diagnosis, feature-explorer and teaching pages. No ``st.*`` here:
reports and arrays in, plotly figures, pandas tables and markdown strings out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from ccamerge.analysis.checklist import COLLAPSE_RATIO
from dashboard.charts import (
    BASE_COLOR,
    ENSEMBLE_COLOR,
    accuracy_axis,
    matrix_pair_figure,
    method_color,
    window,
)

_MARGIN = dict(l=10, r=10, t=40, b=10)
# the chart a finding points to: (anchor on the diagnosis page, its title)
CHARTS = {"summary": ("diag-summary", "Scores"),
          "partial": ("diag-partial", "Layers ranked by damage"),
          "spectra": ("diag-similarity", "Similarity per merge point"),
          "health": ("diag-health", "Numerical health"),
          "collapse": ("diag-collapse", "Collapse"),
          "sweep": ("diag-sweep", "Hyperparameter sweep")}
SEVERITIES = ("failure", "warning", "info")
GROUP_COLORS = {"reference": "#1f77b4", "model": "#ff7f0e", "aligned": "#2ca02c",
                "merged": "#d62728"}
CLASS_COLORS = qualitative.D3 + qualitative.Set3


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


# ----------------------------------------------------------------------------- checklist
def finding_markdown(finding: dict) -> str:
    """One checklist entry: the finding in bold, what to try next, a link to its chart."""
    anchor, title = CHARTS.get(finding["chart"], CHARTS["summary"])
    return (f"**{finding['title']}**  \n**Next:** {finding['next_step']}  \n"
            f"[↓ {title}](#{anchor})")


def checklist_groups(findings: Sequence[dict]) -> dict[str, list[dict]]:
    """Findings by severity (failures, then warnings, then information), order kept."""
    return {s: [f for f in findings if f["severity"] == s] for s in SEVERITIES}


def verdict(report: dict) -> str:
    """One line above the checklist."""
    groups = checklist_groups(report["findings"])
    if report["healthy"]:
        return (f"No failure found: merged {report['merged']['accuracy']:.1f}% "
                f"({len(groups['warning'])} warning(s)).")
    return (f"{len(groups['failure'])} failure(s) explain this merge: merged "
            f"{report['merged']['accuracy']:.1f}% against {report['ensemble']['accuracy']:.1f}% "
            "for the ensemble.")


def diagnose_command(model_paths: Sequence[str], data_name: str, method: str, options: dict, *,
                     reference: int, bn_reset: bool, stats_samples: int | None, sweep: bool) -> str:
    """The ``ccamerge diagnose`` command line that reproduces a diagnosis."""
    flags = [*model_paths, f"--data {data_name}", f"--method {method}", f"--reference {reference}"]
    for name, value in options.items():
        if isinstance(value, bool):
            flags.append("--relative" if value else "--absolute")
        else:
            flags.append(f"--{name.replace('_', '-')} {value:g}")
    flags += [] if bn_reset else ["--no-bn-reset"]
    flags += [f"--stats-samples {stats_samples}"] if stats_samples else []
    flags += ["--sweep"] if sweep else []
    return "ccamerge diagnose " + " ".join(flags) + " --json"


# ----------------------------------------------------------------------------- scores, damage
def summary_figure(report: dict, names: Sequence[str]) -> go.Figure:
    """Test accuracy of each base model (grey), the ensemble (black) and the merge."""
    labels = [*names, "ensemble", f"merged ({report['method']})"]
    values = [b["accuracy"] for b in report["base"]] + [report["ensemble"]["accuracy"],
                                                       report["merged"]["accuracy"]]
    colors = [BASE_COLOR] * len(names) + [ENSEMBLE_COLOR, method_color(report["method"])]
    fig = go.Figure(go.Bar(x=labels, y=values, marker_color=colors,
                           text=[f"{v:.1f}" for v in values],
                           textposition="outside", cliponaxis=False,
                           hovertemplate="%{x}: %{y:.2f}%<extra></extra>"))
    fig.update_layout(height=320, margin=dict(_MARGIN, t=30), yaxis=dict(
        title="test accuracy (%)", range=[0, 106]))  # bars start at 0
    return fig


def partial_labels(report: dict) -> list[str]:
    return ["reference", *[f"+ {p['name']}" for p in report["points"]]]


def damage_figure(report: dict) -> go.Figure:
    """Left: test accuracy and loss of the partial merges (first k points merged, the reference's
    remaining layers kept). Right: loss each point adds, most damaging on top."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], horizontal_spacing=0.2,
                        specs=[[{"secondary_y": True}, {}]],
                        subplot_titles=("partial merges: first k points merged",
                                        "loss added by each point (ranked)"))
    x = partial_labels(report)
    acc = [report["reference_only"]["accuracy"]] + [p["partial_accuracy"] for p in report["points"]]
    loss = [report["reference_only"]["loss"]] + [p["partial_loss"] for p in report["points"]]
    color = method_color(report["method"])
    fig.add_trace(go.Scatter(x=x, y=acc, mode="lines+markers", name="accuracy (%)",
                             line=dict(color=color, width=3),
                             hovertemplate="%{x}: %{y:.2f}%<extra>accuracy</extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(x=x, y=[v if _finite(v) else None for v in loss], mode="lines+markers",
                             name="loss", line=dict(color=ENSEMBLE_COLOR, dash="dot", width=2),
                             hovertemplate="%{x}: %{y:.4f}<extra>loss</extra>"),
                  row=1, col=1, secondary_y=True)
    ranked = [next(p for p in report["points"] if p["name"] == n) for n in report["ranking"]][::-1]
    added = [p["damage_loss"] for p in ranked]
    shown = [v if _finite(v) else 0.0 for v in added]
    top = max([abs(v) for v in shown] + [1e-3])
    text = [f"{v:+.3f}" if _finite(v) else ("breaks (NaN)" if v is not None else "n/a")
            for v in added]
    fig.add_trace(go.Bar(y=[p["name"] for p in ranked],
                         x=[top if v == math.inf else s
                            for v, s in zip(added, shown, strict=True)],
                         orientation="h", marker_color=["#d62728" if (v or 0) > 0 else BASE_COLOR
                                                        for v in added],
                         text=text, textposition="auto", showlegend=False,
                         customdata=[p["damage_accuracy"] for p in ranked],
                         hovertemplate="%{y}: loss %{text}, accuracy −%{customdata:.1f} points"
                                       "<extra></extra>"), row=1, col=2)
    axis = accuracy_axis(acc)
    fig.update_yaxes(title_text=axis["title"], range=axis["range"], row=1, col=1,
                     secondary_y=False)
    fig.update_yaxes(title_text="test loss", row=1, col=1, secondary_y=True, showgrid=False,
                     rangemode="tozero")
    fig.update_xaxes(title_text="loss added", row=1, col=2)
    fig.update_layout(height=360, margin=_MARGIN, legend=dict(orientation="h", y=-0.18))
    return fig


def ranking_frame(report: dict) -> pd.DataFrame:
    """Merge points ranked by the loss merging them adds."""
    by_name = {p["name"]: p for p in report["points"]}
    return pd.DataFrame([{"rank": k + 1, "merge point": name,
                          "loss added": by_name[name]["damage_loss"],
                          "accuracy lost (points)": by_name[name]["damage_accuracy"],
                          "accuracy merged up to here (%)": by_name[name]["partial_accuracy"]}
                         for k, name in enumerate(report["ranking"])])


# ----------------------------------------------------------------------------- per point
def health_frame(report: dict) -> pd.DataFrame:
    """Similarity, health and collapse per merge point (depth order)."""
    return pd.DataFrame([{
        "merge point": p["name"], "width": p["width"], "mean ρ (CCA, γ≈0)": p["mean_rho"],
        "mean matched corr.": p["mean_matched"], "same-index corr.": p.get("mean_same_index"),
        "variance ratio": p["variance_ratio"], "cond(S_xx)": p["cond_reference"],
        "cond(S_yy)": p["cond_models"], "dead units per model": str(p["dead_units"]),
        "samples / feature": p["samples_per_feature"]} for p in report["points"]])


def similarity_figure(report: dict) -> go.Figure:
    """Per point: mean canonical correlation, mean matched correlation, and the correlation of
    same-index units (what averaging without alignment pairs)."""
    names = [p["name"] for p in report["points"]]
    bars = (("mean_rho", "mean ρ (CCA, γ≈0)", method_color("cca")),
            ("mean_matched", "mean matched corr. (permutation)", method_color("permute")),
            ("mean_same_index", "same-index corr. (no alignment)", method_color("average")))
    fig = go.Figure([go.Bar(x=names, y=[p.get(key) for p in report["points"]], name=label,
                            marker_color=color,
                            text=[f"{p[key]:.2f}" if _finite(p.get(key)) else ""
                                  for p in report["points"]],
                            textposition="outside", cliponaxis=False)
                     for key, label, color in bars])
    fig.update_layout(barmode="group", height=320, margin=_MARGIN, xaxis_title="merge point",
                      yaxis=dict(title="mean correlation", range=[min(0.0, _low(report)), 1.12]),
                      legend=dict(orientation="h", y=1.15))
    return fig


def _low(report: dict) -> float:
    values = [p.get("mean_same_index") for p in report["points"]]
    return min([v for v in values if _finite(v)] + [0.0]) - 0.05


def collapse_figure(report: dict) -> go.Figure:
    """Variance of the merged model's features over the endpoints' mean, per point."""
    names = [p["name"] for p in report["points"]]
    ratios = [p["variance_ratio"] for p in report["points"]]
    fig = go.Figure(go.Bar(
        x=names, y=[r if _finite(r) else 0.0 for r in ratios],
        marker_color=["#d62728" if not _finite(r) or r < COLLAPSE_RATIO
                      else method_color(report["method"])
                      for r in ratios],
        text=[f"{r:.2f}" if _finite(r) else "NaN/inf" for r in ratios], textposition="auto",
        cliponaxis=False, hovertemplate="%{x}: %{text}× the endpoints' variance<extra></extra>"))
    fig.add_hline(y=1.0, line=dict(color=ENSEMBLE_COLOR, dash="dot"), annotation_text="endpoints")
    fig.add_hline(y=COLLAPSE_RATIO, line=dict(color="#d62728", dash="dash"),
                  annotation_text="collapse threshold", annotation_position="top left")
    top = max([r for r in ratios if _finite(r)] + [1.0])
    fig.update_layout(height=300, margin=_MARGIN, xaxis_title="merge point",
                      yaxis=dict(title="variance ratio (merged / endpoints)", range=[0, top * 1.2]))
    return fig


# ----------------------------------------------------------------------------- sweep
def _setting(options: dict, keys: Sequence[str]) -> str:
    return ", ".join(f"{k} = {options[k]:g}" if isinstance(options[k], float)
                     else f"{k} = {options[k]}"
                     for k in keys)


def sweep_figure(sweep: dict) -> go.Figure:
    """Held-out accuracy over the sweep grid; the best setting is a star, the one the merge used
    a diamond. One varied option: a line (log x for gamma); two: a heatmap."""
    keys = [k for k in sweep["parameter"].split(", ") if k]
    grid, acc = sweep["grid"], sweep["accuracy"]
    best = sweep["best_index"]
    current = sweep.get("current")
    if len(keys) == 2:
        return _sweep_heatmap(sweep, keys)
    key = keys[0] if keys else next(iter(grid[0]))
    x = [g[key] for g in grid]
    fig = go.Figure(go.Scatter(x=x, y=acc, mode="lines+markers", name="held-out accuracy",
                               line=dict(color=method_color(sweep["method"]), width=2),
                               hovertemplate=f"{key} = %{{x:g}}: %{{y:.2f}}%<extra></extra>"))
    fig.add_trace(go.Scatter(x=[x[best]], y=[acc[best]], mode="markers",
                             name=f"best: {key} = {x[best]:g}",
                             marker=dict(symbol="star", size=18, color="#ffbf00",
                                         line=dict(color="black", width=1))))
    if current is not None and key in current["options"]:
        fig.add_trace(go.Scatter(x=[current["options"][key]], y=[current["accuracy"]],
                                 mode="markers",
                                 name=f"used: {key} = {current['options'][key]:g}",
                                 marker=dict(symbol="diamond", size=12, color=ENSEMBLE_COLOR)))
    positive = all(isinstance(v, (int, float)) and v > 0 for v in x)
    fig.update_layout(height=340, margin=_MARGIN, legend=dict(orientation="h", y=-0.25),
                      xaxis=dict(title=key, type="log" if positive else "linear", tickvals=x,
                                 ticktext=[f"{v:g}" for v in x]),
                      yaxis=accuracy_axis(acc, title="held-out accuracy (%)"))
    return fig


def _sweep_heatmap(sweep: dict, keys: Sequence[str]) -> go.Figure:
    a_key, b_key = keys
    a_values = sorted({g[a_key] for g in sweep["grid"]})
    b_values = sorted({g[b_key] for g in sweep["grid"]})
    z = np.full((len(b_values), len(a_values)), np.nan)
    for g, acc in zip(sweep["grid"], sweep["accuracy"], strict=True):
        z[b_values.index(g[b_key]), a_values.index(g[a_key])] = acc
    labels = ([f"{v:g}" for v in a_values], [f"{v:g}" for v in b_values])
    fig = go.Figure(go.Heatmap(z=z, x=labels[0], y=labels[1], colorscale="Viridis",
                               colorbar=dict(title="held-out<br>acc. (%)"), texttemplate="%{z:.1f}",
                               hovertemplate=f"{a_key} = %{{x}}, {b_key} = %{{y}}: "
                                             f"%{{z:.2f}}%<extra></extra>"))
    best = sweep["best"]
    fig.add_trace(go.Scatter(x=[f"{best[a_key]:g}"], y=[f"{best[b_key]:g}"], mode="markers",
                             name=f"best: {_setting(best, keys)}",
                             marker=dict(symbol="star", size=22, color="#ffbf00",
                                         line=dict(color="black", width=1))))
    fig.update_layout(height=340, margin=_MARGIN, xaxis_title=a_key, yaxis_title=b_key,
                      legend=dict(orientation="h", y=-0.25))
    return fig


def sweep_caption(sweep: dict) -> str:
    keys = [k for k in sweep["parameter"].split(", ") if k]
    text = (f"best {_setting(sweep['best'], keys or list(sweep['best']))}: "
            f"{max(sweep['accuracy']):.1f}%")
    current = sweep.get("current")
    if current is not None:
        text += (f"; used {_setting(current['options'], keys or list(current['options']))}: "
                 f"{current['accuracy']:.1f}%")
    return f"{text}; chosen on the {sweep['selected_on']}"


# ----------------------------------------------------------------------------- explorer
def unit_hover(units, labels: dict[str, str]) -> list[str]:
    """Hover text per unit: its model and index, and its partner with their correlation."""
    out = []
    for group, unit, partner, corr in zip(units.group, units.unit, units.partner,
                                          units.partner_corr, strict=True):
        kind = "matched to" if group in ("reference", "model") else "aligned to"
        other = labels["model"] if group == "reference" else labels["reference"]
        out.append(f"{labels[group]} unit {unit}<br>{kind} {other} unit {partner} (r = {corr:.2f})")
    return out


def unit_embedding_figure(coords: np.ndarray, units, labels: dict[str, str], *,
                          method: str = "pca") -> go.Figure:
    """Units of the four groups in one 2-D embedding, coloured by model."""
    hover = np.asarray(unit_hover(units, labels))
    fig = go.Figure()
    for group, color in GROUP_COLORS.items():
        rows = units.rows(group)
        fig.add_trace(go.Scattergl(x=coords[rows, 0], y=coords[rows, 1], mode="markers",
                                   name=labels[group], text=hover[rows],
                                   marker=dict(color=color, size=7, opacity=0.75,
                                               line=dict(color="white", width=0.5)),
                                   hovertemplate="%{text}<extra></extra>"))
    axis = "PC" if method == "pca" else "UMAP "
    fig.update_layout(height=520, margin=_MARGIN, xaxis_title=f"{axis}1", yaxis_title=f"{axis}2",
                      legend=dict(orientation="h", y=1.08))
    return fig


def input_embedding_figure(panels: Sequence[tuple[str, object]], *, class_names=None) -> go.Figure:
    """Inputs embedded by each model's representation, side by side, coloured by class; each
    title carries the nearest-centroid accuracy (full representation / the 2-D picture)."""
    titles = [f"{name}<br>separability {e.separability:.1f}% (2-D: {e.separability_2d:.1f}%)"
              for name, e in panels]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=titles, horizontal_spacing=0.03)
    classes = sorted({int(c) for _, e in panels for c in e.labels})
    for col, (name, emb) in enumerate(panels, start=1):
        for c in classes:
            rows = np.flatnonzero(emb.labels == c)
            label = class_names[c] if class_names else str(c)
            fig.add_trace(go.Scattergl(
                x=emb.coords[rows, 0], y=emb.coords[rows, 1], mode="markers", name=f"class {label}",
                legendgroup=str(c), showlegend=col == 1,
                marker=dict(color=CLASS_COLORS[c % len(CLASS_COLORS)], size=5, opacity=0.8),
                hovertemplate=f"{name}<br>class {label}, input %{{customdata}}<extra></extra>",
                customdata=rows), row=1, col=col)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    fig.update_annotations(font_size=12)
    fig.update_layout(height=400, margin=dict(_MARGIN, t=70), legend=dict(orientation="h", y=-0.05))
    return fig


# ----------------------------------------------------------------------------- teaching
def covariance_figure(s_xx: np.ndarray, s_xy: np.ndarray) -> go.Figure:
    """S_xx beside S_xy on one colour scale ending at the 98th percentile of |entries| (wide
    layers shown as their strongest entry per block)."""
    left, rows, cols = window(s_xx)
    right, _, right_cols = window(s_xy)
    values = np.abs(np.concatenate([left.ravel(), right.ravel()]))
    limit = float(np.quantile(values[np.isfinite(values)], 0.98)) or 1.0
    return matrix_pair_figure(left, right, titles=("S_xx = Σ_xx + γ_x I", "S_xy"), x_title="unit",
                              y_title="unit", rows=rows, cols=cols, right_cols=right_cols,
                              limit=limit, colorbar="cov.")


def corner_frame(matrix: np.ndarray, k: int = 5, *, rows: str = "x",
                 cols: str = "y") -> pd.DataFrame:
    """The top-left ``k`` x ``k`` entries of ``matrix`` as a labelled table (real numbers)."""
    part = np.asarray(matrix)[:k, :k]
    return pd.DataFrame(part, index=[f"{rows}{i}" for i in range(part.shape[0])],
                        columns=[f"{cols}{j}" for j in range(part.shape[1])])


def eigen_figure(eig_x: np.ndarray, eig_y: np.ndarray) -> go.Figure:
    """Eigenvalues of S_xx and S_yy (log scale); after whitening they are all 1."""
    fig = go.Figure()
    for eig, name, color in ((eig_x, "S_xx (reference)", GROUP_COLORS["reference"]),
                             (eig_y, "S_yy (model)", GROUP_COLORS["model"])):
        eig = np.sort(np.asarray(eig))[::-1]
        fig.add_trace(go.Scatter(x=np.arange(1, len(eig) + 1), y=eig, mode="lines", name=name,
                                 line=dict(color=color, width=2),
                                 hovertemplate="eigenvalue %{x}: %{y:.3g}<extra></extra>"))
    fig.add_hline(y=1.0, line=dict(color=ENSEMBLE_COLOR, dash="dot"),
                  annotation_text="after whitening: all 1")
    fig.update_layout(height=300, margin=_MARGIN,
                      yaxis=dict(type="log", title="eigenvalue", dtick=1),
                      xaxis_title="index (sorted)", legend=dict(orientation="h", y=1.12))
    return fig


def rho_figure(shrunk: np.ndarray, reached: np.ndarray, matched: np.ndarray | None = None, *,
               shrunk_name: str = "shrunk singular values of M",
               where: str = "held-out") -> go.Figure:
    """Bars: the correlation ``reached`` ``[n]`` each canonical pair reaches (canonical order);
    grey line: the ridge-shrunk singular values ``shrunk`` ``[n]``; line: the matched unit
    pairs' correlations ``matched`` ``[n]``, sorted."""
    k = np.arange(1, len(reached) + 1)
    fig = go.Figure(go.Bar(x=k, y=reached, name=f"correlation reached by pair k ({where})",
                           marker_color=method_color("cca"),
                           hovertemplate="pair %{x}: %{y:.3f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=np.arange(1, len(shrunk) + 1), y=shrunk, mode="lines",
                             name=shrunk_name, line=dict(color=BASE_COLOR, width=2, dash="dashdot"),
                             hovertemplate="s%{x}: %{y:.3f}<extra></extra>"))
    if matched is not None:
        fig.add_trace(go.Scatter(x=np.arange(1, len(matched) + 1), y=np.sort(matched)[::-1],
                                 mode="lines", name=f"matched unit pairs, sorted ({where})",
                                 line=dict(color=method_color("permute"), width=2)))
    low = min(0.0, float(np.min(reached))) - 0.02
    fig.update_layout(height=320, margin=_MARGIN, xaxis_title="canonical pair / unit pair",
                      yaxis=dict(title="correlation / singular value", range=[low, 1.05]),
                      legend=dict(orientation="h", y=1.16), bargap=0.1)
    return fig
