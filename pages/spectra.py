"""Spectra: canonical correlations of every merge point against the reference, with the
Hungarian-matched correlations overlaid, and the numerical health of the statistics."""

import streamlit as st

from dashboard import charts, data, state, widgets

st.title("Spectra")
st.markdown("How much do the models' features have in common, layer by layer? CCA finds the "
            "linear combinations of units that correlate best; a permutation can only pair units "
            "one to one.")

sel, models, inputs = widgets.selected_inputs()

gamma, relative = widgets.gamma_controls(state.W_SPEC_GAMMA, state.W_SPEC_RELATIVE)
choices = ["all"] + sel.others
widgets.valid_choice(state.W_SPEC_MODEL, choices)
shown = st.selectbox("Model compared with the reference", choices, key=state.W_SPEC_MODEL,
                     format_func=lambda i: "every model" if i == "all" else widgets.model_label(models, i),
                     **widgets.KEEP)
with widgets.stop_on_error():
    rows = data.spectrum(inputs.digests, inputs.data_key, inputs.reference, gamma, relative, None,
                         inputs.models, inputs.data)
names = {k: e.name for k, e in enumerate(inputs.entries)}
if shown != "all" and shown in sel.ids:
    rows = [r for r in rows if r["model"] == sel.ids.index(shown)]

points = list(dict.fromkeys(r["name"] for r in rows))
for col, point in zip(st.columns(len(points)), points, strict=True):
    means = charts.mean_correlations([r for r in rows if r["name"] == point])
    col.metric(f"mean ρ, {point}", f"{means['rho']:.3f}",
               f"γ≈0: {means['rho_exact']:.3f} · matched: {means['matched']:.3f}",
               delta_color="off", delta_arrow="off",
               help="mean canonical correlation at this γ; below, nearly unregularised and the "
                    "mean correlation of the unit pairs a permutation matches")

st.subheader(f"Canonical correlations against {inputs.entries[inputs.reference].name}")
st.plotly_chart(charts.spectrum_figure(rows, model_names=names), key="spectrum_chart")
widgets.explain("one panel per merge point. Solid: canonical correlations ρ₁ ≥ ρ₂ ≥ … at the γ "
                "chosen above; dashed: the same, nearly unregularised (γ ≈ 0, can overfit); "
                "dotted: the correlations of the unit pairs a permutation (Hungarian matching) "
                "finds, sorted. The gap between solid and dotted is what CCA Merge gains over "
                "permutation methods. A curve that drops to 0 means directions the other model "
                "does not have.")

st.subheader("Mean correlation per layer")
st.plotly_chart(charts.mean_rho_figure(rows), key="mean_rho_chart")
widgets.explain("one number per merge point: the mean canonical correlation at the chosen γ "
                "and nearly unregularised (hatched), next to the mean correlation of the unit "
                "pairs a permutation matches. A ridge shrinks the correlations (it trades fit for "
                "stability); with γ≈0 CCA is always at least as high as the matching. Similarity "
                "usually falls with depth.")

st.subheader("Numerical health")
warnings = charts.health_warnings(rows, names)
for text in warnings:
    st.warning(text)
if not warnings:
    st.success("No warnings: enough samples per feature, no dead units, well-conditioned "
               "covariances.")
st.dataframe(charts.health_frame(rows, names), hide_index=True, column_config={
    "samples / feature": st.column_config.NumberColumn(format="%.1f"),
    "cond(S_xx)": st.column_config.NumberColumn(format="%.3g"),
    "cond(S_yy)": st.column_config.NumberColumn(format="%.3g"),
    "mean ρ": st.column_config.NumberColumn(format="%.3f"),
    "mean matched": st.column_config.NumberColumn(format="%.3f")})
widgets.explain("per merge point: samples behind the covariances (images × pixels of the "
                "feature map) per feature (warn under 10), condition numbers of the regularised "
                "covariances S_xx (reference) and S_yy (model) (huge = unstable inverse square "
                "roots, raise γ), and dead units that never activate on this data.")
st.caption("Regenerate: `ccamerge spectrum A.safetensors B.safetensors --data "
           f"{inputs.data_name} --gamma {gamma:g}{'' if relative else ' --absolute'} --json`")
