"""Figures, tables and sentences of the Spectra page, from :mod:`ccamerge.analysis.spectra` rows.
No ``st.*`` here.

Words used on the page: a canonical pair's *correlation* is the Pearson correlation its two
directions reach on a set of images (held-out ones unless said otherwise); the *shrunk singular
values* are what the SVD of the ridge-regularised problem returns, never called correlations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ccamerge.stats import MIN_SAMPLES_PER_FEATURE
from dashboard.charts import BASE_COLOR, MODEL_COLORS, method_color

MAX_CONDITION = 1e8
OVERFIT_GAP = 0.05  # fitting-data mean above held-out mean by more than this: overfitting
CHANCE_LEVEL = 0.3  # a chance correlation (noise level) above this deserves a warning
_MARGIN = dict(l=10, r=10, t=40, b=10)


def shrunk_label(gamma: float, relative: bool) -> str:
    """``shrunk singular values (ridge γ = 0.1, relative)``."""
    return f"shrunk singular values (ridge γ = {gamma:g}{', relative' if relative else ''})"


def format_condition(value: float) -> str:
    """A condition number for people: ``339``, ``5.3e18``, or ``∞ (singular)``."""
    if value is None or not math.isfinite(value) or value <= 0:
        return "∞ (singular)"
    if value < 1e4:
        return f"{value:.3g}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def held_out(rows: Sequence[dict]) -> bool:
    """True when the rows carry held-out measurements."""
    return bool(rows) and rows[0]["reached_heldout"] is not None


def _measured(rows: Sequence[dict], key: str) -> str:
    """``key``'s held-out variant when there is one, else its fitting-data variant."""
    return f"{key}_heldout" if held_out(rows) else f"{key}_fit"


def point_means(rows: Sequence[dict]) -> dict[str, float | None]:
    """Means over ``rows`` (models at one merge point) of every ``mean_*`` entry."""
    keys = [k for k in rows[0] if k.startswith("mean_")]
    return {k[5:]: None if rows[0][k] is None else float(np.mean([r[k] for r in rows]))
            for k in keys}


def pairs_above_matching(row: dict) -> int:
    """How many canonical pairs correlate more than the best matched unit pair (held-out
    when measured there)."""
    reached = np.asarray(row[_measured([row], "reached")])
    return int((reached > max(row[_measured([row], "matched")])).sum())


def headline(rows: Sequence[dict], gamma: float, relative: bool) -> str:
    """The sentences beside a merge point's headline number (``rows``: its models)."""
    m, held = point_means(rows), held_out(rows)
    count = round(float(np.mean([pairs_above_matching(r) for r in rows])))
    reached = m["reached_heldout" if held else "reached_fit"]
    matched = m["matched_heldout" if held else "matched_fit"]
    where = ("held-out images" if held else "the fitting images (none held out)")
    fit = f" ({m['reached_fit']:.3f} on the fitting images)" if held else ""
    return (f"**{reached:.3f}** is the mean correlation CCA's canonical pairs reach on {where}"
            f"{fit}; matched unit pairs reach {matched:.3f}. {m['shrunk']:.3f} is the mean of "
            f"the {shrunk_label(gamma, relative)}, not a correlation. The first {count} canonical "
            "pairs beat the best matched pair; later ones must be uncorrelated with the earlier "
            "ones and fall below.")


# ----------------------------------------------------------------------------- figures
def _series(rows: Sequence[dict], gamma: float, relative: bool) -> list[tuple[str, str, str]]:
    """``(row key, legend label, dash)`` of the spectrum chart's curves."""
    where = "held-out" if held_out(rows) else "fitting images"
    return [(_measured(rows, "reached"), f"CCA pairs, {where}", "solid"),
            (_measured(rows, "matched"), f"matched unit pairs, {where}", "dot"),
            ("shrunk", shrunk_label(gamma, relative), "dashdot")]


def spectrum_figure(rows: Sequence[dict], *, gamma: float, relative: bool,
                    model_names: dict[int, str] | None = None) -> go.Figure:
    """Per merge point (one panel each): the correlations the canonical pairs reach (canonical
    order) and the matched unit pairs' (sorted), both held-out when measured there, and the
    shrunk singular values; one colour per model."""
    names, points = model_names or {}, list(dict.fromkeys(r["name"] for r in rows))
    n_cols = min(len(points), 3) or 1
    n_rows = math.ceil(len(points) / n_cols) or 1
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=points, shared_yaxes=True,
                        horizontal_spacing=0.04, vertical_spacing=0.12)
    models = list(dict.fromkeys(r["model"] for r in rows))
    for row in rows:
        k, color = points.index(row["name"]), MODEL_COLORS[models.index(row["model"]) % 8]
        label = names.get(row["model"], f"model {row['model']}")
        for key, kind, dash in _series(rows, gamma, relative):
            fig.add_trace(go.Scatter(
                x=np.arange(1, len(row[key]) + 1), y=row[key], mode="lines",
                name=f"{kind}: {label}",
                line=dict(color=color, dash=dash, width=1.5 if key == "shrunk" else 2),
                legendgroup=f"{key}{row['model']}", showlegend=k == 0,
                hovertemplate=f"{label}<br>{kind} #%{{x}}: %{{y:.3f}}<extra>{row['name']}</extra>"),
                row=k // n_cols + 1, col=k % n_cols + 1)
    low = min(0.0, min(min(r[_measured(rows, "reached")]) for r in rows))
    fig.update_yaxes(range=[low - 0.02, 1.02])
    fig.update_yaxes(title_text="correlation / singular value", col=1)
    fig.update_xaxes(title_text="canonical pair or unit pair (best first)", row=n_rows)
    fig.update_layout(height=320 * n_rows + 110, margin=_MARGIN,
                      legend=dict(orientation="h", yanchor="top", y=-0.14 / n_rows - 0.06))
    return fig


def means_figure(rows: Sequence[dict], *, gamma: float, relative: bool) -> go.Figure:
    """Per merge point, averaged over the models shown: the mean correlation CCA's pairs reach
    (held-out and fitting images), the matched unit pairs' and the shrunk singular values'."""
    points = list(dict.fromkeys(r["name"] for r in rows))
    means = [point_means([r for r in rows if r["name"] == p]) for p in points]
    bars = [("reached_fit", "CCA pairs, fitting images", method_color("cca"), "/"),
            ("matched_heldout", "matched unit pairs, held-out", method_color("permute"), None),
            ("shrunk", shrunk_label(gamma, relative), BASE_COLOR, "x")]
    if held_out(rows):
        bars.insert(0, ("reached_heldout", "CCA pairs, held-out", method_color("cca"), None))
    else:
        bars[1] = ("matched_fit", "matched unit pairs, fitting images", method_color("permute"),
                   None)
    fig = go.Figure([go.Bar(x=points, y=[m[key] for m in means], name=label, marker_color=color,
                            marker_pattern_shape=pattern, text=[f"{m[key]:.3f}" for m in means],
                            textposition="outside") for key, label, color, pattern in bars])
    fig.update_layout(barmode="group", height=360, margin=_MARGIN, xaxis_title="merge point",
                      yaxis=dict(range=[0, 1.1], title="mean over pairs"),
                      legend=dict(orientation="h", y=1.16))
    return fig


# ----------------------------------------------------------------------------- tables, warnings
def _name(names: dict[int, str], model: int) -> str:
    return names.get(model, f"model {model}")


def correlation_frame(rows: Sequence[dict],
                      model_names: dict[int, str] | None = None) -> pd.DataFrame:
    """Mean correlations per merge point and model, on fitting and held-out images."""
    names = model_names or {}
    return pd.DataFrame([{
        "merge point": r["name"], "model": _name(names, r["model"]),
        "CCA pairs, held-out": r["mean_reached_heldout"],
        "CCA pairs, fitting": r["mean_reached_fit"],
        "γ≈0 pairs, held-out": r["mean_exact_heldout"], "γ≈0 pairs, fitting": r["mean_exact_fit"],
        "matched, held-out": r["mean_matched_heldout"], "matched, fitting": r["mean_matched_fit"],
        "shrunk singular values": r["mean_shrunk"]} for r in rows])


def health_frame(rows: Sequence[dict], model_names: dict[int, str] | None = None) -> pd.DataFrame:
    """Numerical health per merge point and model; condition numbers as text
    (:func:`format_condition`)."""
    names = model_names or {}
    return pd.DataFrame([{
        "merge point": r["name"], "model": _name(names, r["model"]), "width": r["width"],
        "samples": r["samples"], "samples / feature": r["samples_per_feature"],
        "chance correlation": r["noise_level"],
        "cond(S_xx)": format_condition(r["cond_xx"]), "cond(S_yy)": format_condition(r["cond_yy"]),
        "dead (reference)": r["dead_reference"], "dead (model)": r["dead_model"]} for r in rows])


def _overfits(row: dict) -> bool:
    gap = (row["mean_exact_fit"] - row["mean_exact_heldout"]
           if row["mean_exact_heldout"] is not None else 0.0)
    return gap > OVERFIT_GAP or row["noise_level"] > CHANCE_LEVEL


def overfitting_warning(rows: Sequence[dict]) -> str | None:
    """One warning for every merge point where nearly unregularised CCA overfits (its
    fitting-data mean above the held-out one by over :data:`OVERFIT_GAP`) or where chance alone
    reaches :data:`CHANCE_LEVEL`; None when there is none."""
    parts = []
    for point in dict.fromkeys(r["name"] for r in rows if _overfits(r)):
        m = point_means([r for r in rows if r["name"] == point])
        row = next(r for r in rows if r["name"] == point)
        held = "" if m["exact_heldout"] is None else f", {m['exact_heldout']:.3f} held-out"
        parts.append(f"{point}: {row['samples_per_feature']:.1f} samples per feature, chance "
                     f"reaches {row['noise_level']:.2f}; γ≈0 pairs {m['exact_fit']:.3f} on the "
                     f"fitting images{held}")
    if not parts:
        return None
    return ("Unregularised CCA overfits at this sample size: on the images it is fitted on, even "
            "unrelated features would reach canonical correlations up to the chance level, so "
            "values near 1 there prove little; trust the held-out correlations. "
            + "; ".join(parts))


def health_warnings(rows: Sequence[dict], model_names: dict[int, str] | None = None, *,
                    min_samples: float = MIN_SAMPLES_PER_FEATURE,
                    max_condition: float = MAX_CONDITION) -> list[str]:
    """Readable warnings, one per kind: overfitting, too few samples per feature, dead units,
    ill-conditioned covariances (each listing the merge points and models concerned)."""
    names = model_names or {}
    few, dead, cond = [], [], []
    for r in rows:
        who = f"{r['name']} ({_name(names, r['model'])})"
        if r["samples_per_feature"] < min_samples:
            few.append(f"{r['name']}: {r['samples_per_feature']:.1f}")
        if r["dead_reference"] or r["dead_model"]:
            dead.append(f"{who}: {r['dead_reference']} in the reference, "
                        f"{r['dead_model']} in the model")
        worst = max(r["cond_xx"], r["cond_yy"])
        if not math.isfinite(worst) or worst > max_condition:
            cond.append(f"{who}: {format_condition(worst)}")
    out = [w for w in [overfitting_warning(rows)] if w]
    if few:
        out.append(f"Few samples per feature (under {min_samples:g}; covariances are unreliable, "
                   f"use more statistics data): {'; '.join(dict.fromkeys(few))}")
    if dead:
        out.append("Dead units (never active on these images, CCA pairs them aside): "
                   + "; ".join(dead))
    if cond:
        out.append(f"Ill-conditioned covariances (condition number over "
                   f"{format_condition(max_condition)}; raise γ): {'; '.join(cond)}")
    return out


# ----------------------------------------------------------------------------- shared space (gcca)
def shared_held_out(rows: Sequence[dict]) -> bool:
    """True when the shared-space rows carry held-out measurements."""
    return bool(rows) and rows[0]["rho_heldout"] is not None


def _shared_key(rows: Sequence[dict], key: str) -> str:
    return f"{key}_heldout" if shared_held_out(rows) else f"{key}_fit"


def shared_headline(row: dict, pair_rows: Sequence[dict]) -> str:
    """The sentence beside a merge point's shared-space number (``row``: its gcca row,
    ``pair_rows``: its pairwise CCA rows, reference against each model)."""
    held = shared_held_out([row])
    shared = row[_shared_key([row], "mean_rho")]
    pairs = point_means(pair_rows)["reached_heldout" if held else "reached_fit"]
    where = "held-out images" if held else "the fitting images"
    return (f"**{shared:.3f}** is how strongly all {row['num_models']} models' variates of one "
            f"shared direction correlate, averaged over model pairs and directions on {where} "
            f"(canonical pairs of the reference with each model alone: {pairs:.3f}; MAXVAR "
            f"eigenvalues average {row['mean_eigenvalues']:.2f}, from 1 = one model's alone to "
            f"{row['num_models']} = all share it).")


def shared_figure(rows: Sequence[dict], pair_rows: Sequence[dict], *,
                  model_names: dict[int, str] | None = None) -> go.Figure:
    """Per merge point (one panel each): the mean pairwise correlation of each shared
    direction's N variates (held-out when measured there, and on the fitting images), gcca's
    ``(lambda - 1) / (N - 1)``, and, thin, the correlations the pairwise canonical pairs of the
    reference with each model reach on the same images."""
    names, points = model_names or {}, [r["name"] for r in rows]
    fig = make_subplots(rows=1, cols=len(points) or 1, subplot_titles=points, shared_yaxes=True,
                        horizontal_spacing=0.04)
    models = list(dict.fromkeys(r["model"] for r in pair_rows))
    where = "held-out" if shared_held_out(rows) else "fitting images"
    series = [(_shared_key(rows, "rho"), f"shared directions, {where}", "solid", 3),
              ("rho_fit", "shared directions, fitting images", "dot", 2),
              ("rho_eigen", "from the eigenvalue, (λ − 1)/(N − 1)", "dashdot", 1.5)]
    shown = series if shared_held_out(rows) else [series[0], series[2]]
    for col, row in enumerate(rows, start=1):
        for key, label, dash, width in shown:
            fig.add_trace(_line(row[key], label, method_color("gcca"), dash, width, row["name"],
                                col == 1), row=1, col=col)
        for pair in (p for p in pair_rows if p["name"] == row["name"]):
            label = f"CCA pairs, {where}: {_name(names, pair['model'])}"
            color = MODEL_COLORS[models.index(pair["model"]) % 8]
            fig.add_trace(_line(pair[_measured(pair_rows, "reached")], label, color, "solid", 1,
                                row["name"], col == 1, opacity=0.6), row=1, col=col)
    fig.update_yaxes(title_text="correlation", col=1)
    fig.update_xaxes(title_text="shared direction or canonical pair (best first)")
    fig.update_layout(height=420, margin=_MARGIN, legend=dict(orientation="h", y=-0.25))
    return fig


def _line(values, label: str, color: str, dash: str, width: float, point: str, legend: bool,
          opacity: float = 1.0) -> go.Scatter:
    return go.Scatter(x=np.arange(1, len(values) + 1), y=values, mode="lines", name=label,
                      line=dict(color=color, dash=dash, width=width), opacity=opacity,
                      legendgroup=label, showlegend=legend,
                      hovertemplate=f"{label} #%{{x}}: %{{y:.3f}}<extra>{point}</extra>")


def consensus_figure(rows: Sequence[dict], *,
                     model_names: dict[int, str] | None = None) -> go.Figure:
    """Per merge point: each model's correlation with the shared (consensus) variate of every
    direction, held-out when measured there; a model far below the others is the outlier."""
    names, points = model_names or {}, [r["name"] for r in rows]
    fig = make_subplots(rows=1, cols=len(points) or 1, subplot_titles=points, shared_yaxes=True,
                        horizontal_spacing=0.04)
    for col, row in enumerate(rows, start=1):
        for i, values in enumerate(row[_shared_key(rows, "consensus")]):
            fig.add_trace(_line(values, _name(names, i), MODEL_COLORS[i % 8], "solid", 2,
                                row["name"], col == 1), row=1, col=col)
    fig.update_yaxes(title_text="correlation with the shared variate", col=1)
    fig.update_xaxes(title_text="shared direction (best first)")
    fig.update_layout(height=360, margin=_MARGIN, legend=dict(orientation="h", y=-0.25))
    return fig


def shared_models_frame(rows: Sequence[dict],
                        model_names: dict[int, str] | None = None) -> pd.DataFrame:
    """Per merge point and model: how well it spans the shared space."""
    names = model_names or {}
    return pd.DataFrame([{
        "merge point": r["name"], "model": _name(names, m["model"]),
        "with the shared variates, held-out": m["mean_consensus_heldout"],
        "with the shared variates, fitting": m["mean_consensus_fit"],
        "variance in the shared directions": m["variance_share"],
        "cond(V_iᵀV_i)": format_condition(m["cond_shared"]), "dead units": m["dead"]}
        for r in rows for m in r["models"]])


def outlier_note(rows: Sequence[dict], model_names: dict[int, str] | None = None) -> str:
    """Which model follows the shared variates least, per merge point (held-out when
    measured), against the mean of the others."""
    names, key = model_names or {}, _shared_key(rows, "mean_consensus")
    parts = []
    for r in rows:
        scores = [m[key] for m in r["models"]]
        low = int(np.argmin(scores))
        rest = float(np.mean([s for i, s in enumerate(scores) if i != low]))
        parts.append(f"{r['name']}: {_name(names, low)} ({scores[low]:.3f}; the others "
                     f"{rest:.3f})")
    return "Follows the shared variates least: " + "; ".join(parts) + "."
