"""Arrays in, plotly figures and pandas tables out. No ``st.*`` here, so plain pytest tests it.

Colours: one per method in registry order (the same on every page), grey for the base models,
black for the ensemble.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from ccamerge.analysis.features import MAX_DISPLAY, block_reduce
from ccamerge.methods import METHODS

METHOD_COLORS = dict(zip(METHODS, qualitative.D3, strict=False))
MODEL_COLORS = qualitative.Set2
BASE_COLOR = "#9e9e9e"
ENSEMBLE_COLOR = "#222222"

_MARGIN = dict(l=10, r=10, t=40, b=10)


def method_color(method: str) -> str:
    return METHOD_COLORS.get(method, "#636efa")


# ----------------------------------------------------------------------------- feature matching
def _heatmap(z: np.ndarray, rows: Sequence[int], cols: Sequence[int], hover: str) -> go.Heatmap:
    return go.Heatmap(z=z, x=list(cols), y=list(rows), coloraxis="coloraxis", hovertemplate=hover)


def matrix_pair_figure(left: np.ndarray, right: np.ndarray, *, titles: tuple[str, str],
                       x_title: str, y_title: str, rows: Sequence[int] | None = None,
                       cols: Sequence[int] | None = None, right_cols: Sequence[int] | None = None,
                       limit: float | None = None, colorbar: str = "corr.",
                       quantile: float = 0.98) -> go.Figure:
    """Two matrices side by side on one diverging colour scale centred at 0. ``rows``/``cols``
    label the axes (unit index or the first unit of each aggregated block). Without ``limit``
    the scale ends at the ``quantile`` of the absolute entries (at least 1), so a few huge
    entries saturate instead of washing out the rest."""
    rows = list(rows) if rows is not None else list(range(left.shape[0]))
    cols = list(cols) if cols is not None else list(range(left.shape[1]))
    right_cols = list(right_cols) if right_cols is not None else cols
    if limit is None:
        finite = np.abs(np.concatenate([left[np.isfinite(left)], right[np.isfinite(right)]]))
        limit = float(max(1.0, np.quantile(finite, quantile))) if finite.size else 1.0
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles, horizontal_spacing=0.08)
    hover = f"{y_title} %{{y}}<br>{x_title} %{{x}}<br>%{{z:.3f}}<extra></extra>"
    fig.add_trace(_heatmap(left, rows, cols, hover), row=1, col=1)
    fig.add_trace(_heatmap(right, rows, right_cols, hover), row=1, col=2)
    fig.update_yaxes(autorange="reversed", title_text=y_title, col=1)
    fig.update_yaxes(autorange="reversed", col=2)
    fig.update_xaxes(title_text=x_title)
    fig.update_layout(coloraxis=dict(colorscale="RdBu", cmid=0, cmin=-limit, cmax=limit,
                                     colorbar=dict(title=colorbar)),
                      height=470, margin=_MARGIN)
    return fig


def spread_figure(top1: np.ndarray, participation: np.ndarray, k90: np.ndarray) -> go.Figure:
    """Histograms over reference units of the top-1 share, participation ratio and k90."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=(
        "top-1 share (1 = one unit)", "participation ratio (1 = one unit)", "k90 (units for 90%)"))
    for k, (values, color) in enumerate(((top1, method_color("cca")),
                                         (participation, method_color("permute")),
                                         (k90, method_color("ot")))):
        values = np.asarray(values, float)
        fig.add_trace(go.Histogram(x=values[np.isfinite(values)], marker_color=color, nbinsx=30,
                                   showlegend=False,
                                   hovertemplate="%{x}: %{y} units<extra></extra>"),
                      row=1, col=k + 1)
    fig.update_yaxes(title_text="reference units", col=1)
    fig.update_layout(height=300, margin=_MARGIN, bargap=0.05)
    return fig


def aligned_units_figure(cca: np.ndarray, permute: np.ndarray, mix: np.ndarray, *,
                         where: str) -> go.Figure:
    """Per reference unit ``[n]``, each sorted high to low: how closely CCA's mapped features
    (``cca``) and the matched unit (``permute``) reproduce it, and how much of CCA's mix is
    the matched unit (``mix``)."""
    fig = go.Figure()
    for values, name, color, dash in (
            (cca, "CCA's mix vs the reference unit", method_color("cca"), "solid"),
            (permute, "matched unit vs the reference unit", method_color("permute"), "solid"),
            (mix, "CCA's mix vs the matched unit", BASE_COLOR, "dot")):
        values = np.sort(np.asarray(values, float)[np.isfinite(values)])[::-1]
        fig.add_trace(go.Scatter(x=np.arange(1, len(values) + 1), y=values, mode="lines",
                                 name=name, line=dict(color=color, dash=dash, width=2),
                                 hovertemplate="%{x}: %{y:.3f}<extra>" + name + "</extra>"))
    fig.update_layout(height=360, margin=_MARGIN, legend=dict(orientation="h", y=-0.25),
                      xaxis_title="reference units (sorted, best first)",
                      yaxis=dict(title=f"correlation ({where})", range=[-0.05, 1.02]))
    return fig


def accuracy_axis(values: Sequence[float], *, title: str = "test accuracy (%)") -> dict:
    """A y axis for accuracies (percent): from 0 unless every value is above 60, then from 5
    points below the lowest (rounded down to 5) and the title says where it starts."""
    finite = [v for v in values if v is not None and np.isfinite(v)]
    low = min(finite, default=0.0)
    if low <= 60:
        return dict(title=title, range=[0, 101])
    start = float(5 * np.floor((low - 5) / 5))
    return dict(title=f"{title}, axis from {start:g}", range=[start, 101])


def partial_merges_figure(curves: Sequence[dict]) -> go.Figure:
    """Test accuracy of merging the first k merge points, one line per method (``curves``:
    ``{"method", "points", "accuracy"}``); k = 0 is the reference alone."""
    fig = go.Figure()
    for curve in curves:
        labels = ["reference", *[f"+ {p}" for p in curve["points"]]]
        fig.add_trace(go.Scatter(
            x=labels, y=curve["accuracy"], mode="lines+markers", name=curve["method"],
            line=dict(color=method_color(curve["method"]), width=2),
            hovertemplate=f"{curve['method']}<br>%{{x}}: %{{y:.2f}}%<extra></extra>"))
    values = [v for c in curves for v in c["accuracy"]]
    fig.update_layout(height=360, margin=_MARGIN, legend=dict(orientation="h", y=-0.25),
                      xaxis_title="merged up to", yaxis=accuracy_axis(values))
    return fig


def alignment_conclusion(means: dict, participation: float, curves: Sequence[dict], *,
                         where: str) -> str:
    """What to conclude from :func:`aligned_units_figure`'s means (``cca``, ``permute``,
    ``mix_vs_match``) and the partial merges of ``cca`` and ``permute`` (``curves``)."""
    by = {c["method"]: c["accuracy"] for c in curves}
    ref, cca, perm = by["cca"][0], by["cca"][-1], by["permute"][-1]
    text = (f"Each CCA feature mixes about {participation:.0f} units of model i, yet on {where} "
            f"images the mix correlates **{means['cca']:.2f}** with the reference unit it stands "
            f"for, the single matched unit **{means['permute']:.2f}**, and the mix correlates "
            f"{means['mix_vs_match']:.2f} with that matched unit: spread weights over correlated "
            "units build a closer copy of the same feature, not a different one. ")
    gap_cca, gap_perm = ref - cca, ref - perm
    text += (f"Merged, the pair scores {cca:.1f}% with CCA and {perm:.1f}% with the permutation "
             f"(reference alone {ref:.1f}%): ")
    if max(gap_cca, gap_perm) < 2.0:
        return text + ("both stay within 2 points of the reference, so a permutation is already "
                       "close enough here and the closer alignment has little accuracy to win.")
    if gap_cca < gap_perm:
        return text + (f"the closer alignment pays off, CCA recovers {gap_perm - gap_cca:.1f} of "
                       f"the {gap_perm:.1f} points the permutation loses.")
    return text + ("here the closer alignment does not pay off in accuracy; for BatchNorm nets "
                   "see Why did it fail?, a dense map does not commute with BatchNorm.")


# ----------------------------------------------------------------------------- interpolation
SWITCH_LAMBDA = 0.5  # api.interpolate: lambda <= 0.5 aligns B to A, above it A to B (inexact maps)


def path_segments(curve: dict) -> list[dict]:
    """The parts of an interpolation ``curve`` that share one alignment: the whole path for a
    method whose maps are exact (permutations), else ``aligned to A`` (λ <= 0.5, B brought into
    A's basis) and ``aligned to B`` (λ > 0.5), as ``api.interpolate`` computes them. Each part:
    ``{"label", "dash", "lambdas", "accuracy", "loss"}``."""
    lambdas = np.asarray(curve["lambdas"])
    parts = [("", "solid", np.ones(len(lambdas), bool))]
    if not METHODS[curve["method"]].exact:
        first = lambdas <= SWITCH_LAMBDA
        parts = [(", aligned to A", "solid", first), (", aligned to B", "dash", ~first)]
    return [{"label": curve["method"] + suffix, "dash": dash,
             "lambdas": lambdas[mask].tolist(),
             "accuracy": np.asarray(curve["accuracy"])[mask].tolist(),
             "loss": np.asarray(curve["loss"])[mask].tolist()}
            for suffix, dash, mask in parts if mask.any()]


def interpolation_figure(curves: Sequence[dict]) -> go.Figure:
    """Test loss and accuracy along the path from model A (0) to model B (1), one line per
    method; a method with inexact maps (CCA) is drawn as its two halves (:func:`path_segments`),
    not joined."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("test loss", "test accuracy (%)"),
                        horizontal_spacing=0.08)
    for curve in curves:
        color = method_color(curve["method"])
        for part in path_segments(curve):
            for col, series in ((1, "loss"), (2, "accuracy")):
                fig.add_trace(go.Scatter(
                    x=part["lambdas"], y=part[series], mode="lines+markers", name=part["label"],
                    legendgroup=part["label"], showlegend=col == 1,
                    line=dict(color=color, width=2, dash=part["dash"]),
                    hovertemplate=f"{part['label']}<br>λ=%{{x:.2f}}: %{{y:.3f}}<extra></extra>"),
                    row=1, col=col)
    accuracy = [v for c in curves for v in c["accuracy"]]
    fig.update_xaxes(title_text="λ  (0 = model A, 1 = model B)")
    fig.update_yaxes(title_text="test loss", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(**{"title_text" if k == "title" else k: v
                        for k, v in accuracy_axis(accuracy).items()}, row=1, col=2)
    fig.update_layout(height=380, margin=_MARGIN, legend=dict(orientation="h", y=-0.2))
    return fig


def barrier_frame(curves: Sequence[dict]) -> pd.DataFrame:
    """Per method: loss barrier, accuracy at the midpoint and the lowest accuracy on the path."""
    rows = []
    for c in curves:
        mid = int(np.argmin(np.abs(np.asarray(c["lambdas"]) - 0.5)))
        rows.append({"method": c["method"], "loss barrier": c["barrier"],
                     "accuracy at λ=0.5 (%)": c["accuracy"][mid],
                     "lowest accuracy (%)": min(c["accuracy"])})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- merge results
def results_frame(names: Sequence[str], base: dict, merges: Sequence[dict]) -> pd.DataFrame:
    """Rows: each base model, the logit ensemble, each merge (test accuracy %, loss, seconds;
    with the merges' held-out accuracy when they have one)."""
    rows = [{"kind": "base model", "name": n, "accuracy (%)": s["accuracy"], "loss": s["loss"],
             "seconds": np.nan} for n, s in zip(names, base["models"], strict=True)]
    rows.append({"kind": "ensemble", "name": "ensemble (mean logits)",
                 "accuracy (%)": base["ensemble"]["accuracy"], "loss": base["ensemble"]["loss"],
                 "seconds": np.nan})
    rows += [{"kind": "merge", "name": m["method"], "accuracy (%)": m["accuracy"],
              "loss": m["loss"], "seconds": m["seconds"]} for m in merges]
    frame = pd.DataFrame(rows)
    if any(m.get("held_out_accuracy") is not None for m in merges):
        held = [np.nan] * (len(rows) - len(merges)) + [m.get("held_out_accuracy") for m in merges]
        frame.insert(3, "held-out accuracy (%)", held)
    return frame


def merge_label(merge: dict) -> str:
    """``cca (97.2% held-out, 96.4% test)`` or, without a held-out score, ``cca (96.4% test)``."""
    held = merge.get("held_out_accuracy")
    prefix = f"{held:.1f}% held-out, " if held is not None else ""
    return f"{merge['method']} ({prefix}{merge['accuracy']:.1f}% test)"


def table_height(frame: pd.DataFrame, row: int = 35) -> int:
    """Pixels that show every row of a table without an inner scrollbar (capped at 20 rows)."""
    return row * (min(len(frame), 20) + 1) + 3


DEAD_NOTE = re.compile(r"^merge point (?P<point>.+): dead units per model (?P<counts>\[.*\])$")


def merge_warnings(merges: Sequence[dict]) -> dict[str, list[str]]:
    """Each distinct warning of the merges, with the methods that raised it; the per-point
    dead-unit notes (``api.sample_warnings``) become one warning listing every point."""
    out: dict[str, list[str]] = {}
    dead: dict[str, str] = {}
    dead_methods: list[str] = []
    for merge in merges:
        for warning in merge["warnings"]:
            note = DEAD_NOTE.match(warning)
            if note:
                dead[note["point"]] = note["counts"]
                dead_methods += [merge["method"]] if merge["method"] not in dead_methods else []
            else:
                out.setdefault(warning, []).append(merge["method"])
    if dead:
        text = ("Dead units (never active on the training images; CCA pairs them aside, other "
                "methods match them like any unit), per model in selection order: "
                + "; ".join(f"{point} {counts}" for point, counts in dead.items()))
        out = {text: dead_methods, **out}
    return out


def results_figure(frame: pd.DataFrame) -> go.Figure:
    """Test accuracy of the base models, the ensemble and each merged model."""
    colors = [BASE_COLOR if k == "base model" else ENSEMBLE_COLOR if k == "ensemble"
              else method_color(n) for k, n in zip(frame["kind"], frame["name"], strict=True)]
    acc = frame["accuracy (%)"]
    fig = go.Figure(go.Bar(x=frame["name"], y=acc, marker_color=colors,
                           text=[f"{v:.1f}" for v in acc], textposition="outside",
                           cliponaxis=False, customdata=frame["kind"],
                           hovertemplate="%{x} (%{customdata}): %{y:.2f}%<extra></extra>"))
    fig.update_layout(height=380, margin=dict(_MARGIN, t=50), xaxis_title=None,
                      yaxis=dict(title="test accuracy (%)", range=[0, 106]))  # bars start at 0
    return fig


def accuracy_vs_n_figure(points: Sequence[dict]) -> go.Figure:
    """Accuracy against the number of merged models, one line per method (and the ensemble).
    ``points``: ``{"method", "n", "accuracy"}`` (method ``"ensemble"`` for the ensemble)."""
    frame = pd.DataFrame(points)
    fig = go.Figure()
    for method, group in frame.groupby("method", sort=False):
        group = group.sort_values("n")
        is_ens = method == "ensemble"
        fig.add_trace(go.Scatter(
            x=group["n"], y=group["accuracy"], mode="lines+markers", name=method,
            line=dict(color=ENSEMBLE_COLOR if is_ens else method_color(method),
                      dash="dash" if is_ens else "solid", width=2),
            hovertemplate=f"{method}<br>N=%{{x}}: %{{y:.2f}}%<extra></extra>"))
    fig.update_layout(height=360, margin=_MARGIN, xaxis=dict(title="number of merged models N",
                      dtick=1), yaxis=accuracy_axis(frame["accuracy"].tolist()),
                      legend=dict(orientation="h", y=-0.2))
    return fig


def window(matrix: np.ndarray, *, view: str = "aggregate", start: int = 0,
           max_size: int = MAX_DISPLAY) -> tuple[np.ndarray, list[int], list[int]]:
    """What a heatmap of ``matrix`` ``[r, c]`` shows: all of it when it fits in ``max_size``;
    else the strongest entry (sign kept) of each block (``view="aggregate"``, labels = first
    unit of each block; a mean would wash out a diagonal) or the raw ``max_size`` x ``max_size``
    window from unit ``start`` (``view="zoom"``)."""
    r, c = matrix.shape
    if max(r, c) <= max_size:
        return matrix, list(range(r)), list(range(c))
    if view == "zoom":
        start = int(np.clip(start, 0, max(0, min(r, c) - max_size)))
        stop = start + max_size
        return (matrix[start:stop, start:stop], list(range(start, min(r, stop))),
                list(range(start, min(c, stop))))
    reduced, rows, cols = block_reduce(matrix, max_size, how="absmax")
    return reduced, rows.tolist(), cols.tolist()


def transform_views(t_tilde: np.ndarray, perm_matrix: np.ndarray, perm: np.ndarray, *,
                    matched_order: bool) -> tuple[np.ndarray, np.ndarray]:
    """``T~`` and the permutation, both ``[n_x, n_y]`` (rows reference units j, columns model
    units k, like the correlation heatmaps). With ``matched_order`` the columns are reordered so
    the match of reference unit j is column j: the permutation becomes the identity and ``T~``
    shows how far CCA spreads each feature beyond that diagonal."""
    left, right = t_tilde.T, perm_matrix.T
    if matched_order:
        left, right = left[:, perm], right[:, perm]
    return left, right


def spread_frame(top1: np.ndarray, participation: np.ndarray, k90: np.ndarray,
                 agrees: np.ndarray, perm: np.ndarray) -> pd.DataFrame:
    """Per reference unit: its match, top-1 share, participation ratio, k90, agreement."""
    return pd.DataFrame({"reference unit": np.arange(len(perm)), "matched model unit": perm,
                         "top-1 share": top1, "participation ratio": participation, "k90": k90,
                         "argmax = match": agrees})
