"""Spectra: the correlations CCA's canonical pairs reach per merge point, against the
Hungarian-matched unit pairs, both on held-out training images; the ridge-shrunk singular values
beside them; the numerical health of the statistics."""

import streamlit as st

from dashboard import catalog, data, state, widgets
from dashboard import charts_spectra as cs

st.title("Spectra")
st.markdown("How much do the models' features have in common, layer by layer? CCA finds pairs of "
            "directions (linear combinations of units) that correlate best; a permutation can "
            "only pair units one to one. Both are fitted on "
            f"{100 - round(100 * catalog.SPECTRA_HOLDOUT)}% of the training images and measured "
            f"on the held-out {round(100 * catalog.SPECTRA_HOLDOUT)}%.")

sel, models, inputs = widgets.selected_inputs()

gamma, relative = widgets.gamma_controls(state.W_SPEC_GAMMA, state.W_SPEC_RELATIVE)
choices = ["all"] + sel.others
widgets.valid_choice(state.W_SPEC_MODEL, choices)
shown = st.selectbox("Model compared with the reference", choices, key=state.W_SPEC_MODEL,
                     format_func=lambda i: ("every model" if i == "all"
                                            else widgets.model_label(models, i)),
                     **widgets.KEEP)
stats_samples, _test_samples = widgets.sampling(inputs)
widgets.sampling_note(inputs)
widgets.selected_statistics(inputs, stats_samples, pairs="all")  # gcca below needs every pair
with widgets.stop_on_error():
    rows = data.held_out_spectrum(inputs.digests, inputs.data_key, inputs.reference, gamma,
                                  relative, stats_samples, inputs.models, inputs.data)
names = {k: e.name for k, e in enumerate(inputs.entries)}
pair_rows = rows  # every model, for the shared space below
if shown != "all" and shown in sel.ids:
    rows = [r for r in rows if r["model"] == sel.ids.index(shown)]
where = "held-out" if cs.held_out(rows) else "fitting images"
measured = "heldout" if cs.held_out(rows) else "fit"
if not cs.held_out(rows):
    st.warning("Too few training images to hold some out: the correlations below are measured "
               "on the images CCA was fitted on, and overstate what generalises.")

points = list(dict.fromkeys(r["name"] for r in rows))
for col, point in zip(st.columns(len(points)), points, strict=True):
    at_point = [r for r in rows if r["name"] == point]
    means = cs.point_means(at_point)
    col.metric(f"correlation reached, {point}", f"{means['reached_' + measured]:.3f}",
               f"matched pairs {means['matched_' + measured]:.3f} · shrunk s.v. "
               f"{means['shrunk']:.3f}", delta_color="off", delta_arrow="off",
               help=f"mean correlation CCA's canonical pairs reach ({where}); below, the matched "
                    "unit pairs' and the mean of the shrunk singular values (not correlations)")
    col.caption(cs.headline(at_point, gamma, relative))

st.subheader(f"Correlations against {inputs.entries[inputs.reference].name}")
st.plotly_chart(cs.spectrum_figure(rows, gamma=gamma, relative=relative, model_names=names),
                key="spectrum_chart")
widgets.explain(
    f"one panel per merge point. Solid: the correlation each canonical pair of directions reaches "
    f"on {where} (pairs in CCA's order, fitted at the γ above). Dotted: the correlations of the "
    "unit pairs a permutation (Hungarian matching) pairs, on the same images, sorted. Dash-dot: "
    "shrunk singular values of the ridge-regularised problem; the ridge pulls them towards 0, "
    "they are not correlations. Where solid is above dotted, a canonical pair captures a shared "
    "signal more cleanly than any single unit pair. Further right the solid curve falls below "
    "the dotted one: each canonical pair must be uncorrelated with the earlier ones, while "
    "matched pairs may repeat one signal. A curve near 0 means directions the other model lacks.")

st.subheader("Mean correlation per layer")
st.plotly_chart(cs.means_figure(rows, gamma=gamma, relative=relative), key="mean_rho_chart")
widgets.explain("per merge point, averaged over the models shown: the mean correlation the "
                "canonical pairs reach on held-out and on fitting images, the matched unit pairs' "
                "on held-out images, and the mean shrunk singular value (grey). Fitting above "
                "held-out is overfitting. The ridge changes the shrunk values far more than the "
                "correlations the pairs reach, so compare the coloured bars. Similarity usually "
                "falls with depth.")
st.dataframe(cs.correlation_frame(rows, names), hide_index=True, placeholder="—",
             column_config={c: st.column_config.NumberColumn(format="%.3f") for c in (
                 "CCA pairs, held-out", "CCA pairs, fitting", "γ≈0 pairs, held-out",
                 "γ≈0 pairs, fitting", "matched, held-out", "matched, fitting",
                 "shrunk singular values")})

st.subheader(f"Shared space (gcca, all {len(inputs.models)} models)")
with widgets.stop_on_error():
    shared_rows = data.held_out_shared_spectrum(inputs.digests, inputs.data_key, gamma, relative,
                                                stats_samples, inputs.models, inputs.data)
shared_where = "held-out" if cs.shared_held_out(shared_rows) else "fitting images"
for col, row in zip(st.columns(len(shared_rows)), shared_rows, strict=True):
    col.metric(
        f"shared correlation, {row['name']}",
        f"{row['mean_rho_heldout' if cs.shared_held_out(shared_rows) else 'mean_rho_fit']:.3f}",
        f"mean eigenvalue {row['mean_eigenvalues']:.2f} of {row['num_models']}",
        delta_color="off", delta_arrow="off",
        help=f"mean pairwise correlation of the shared directions' variates "
             f"({shared_where}); below, the mean MAXVAR eigenvalue (1 to N)")
    col.caption(cs.shared_headline(row, [r for r in pair_rows if r["name"] == row["name"]]))
st.plotly_chart(cs.shared_figure(shared_rows, pair_rows, model_names=names), key="shared_chart")
widgets.explain(
    "one panel per merge point. Thick: for each shared direction of generalized CCA (MAXVAR, "
    f"fitted on all models at once at the γ above), the correlation between every two models' "
    f"variates along it, averaged over the model pairs, on {shared_where}; dotted: the same on "
    "the fitting images; dash-dot: gcca's own number (λ − 1)/(N − 1) from the eigenvalue λ, "
    "equal to the mean correlation only when every model carries the direction equally and "
    "γ = 0 (the ridge shrinks it). Thin: the pairwise spectrum above, the reference's "
    "canonical pairs with each model alone. Where thick lies below thin, the models share less "
    "all together than the reference does with each of them: structure some pairs have and "
    "the rest lack.")
st.plotly_chart(cs.consensus_figure(shared_rows, model_names=names), key="consensus_chart")
widgets.explain(
    f"per model, the correlation ({shared_where}) of its variate along each shared direction "
    "with the shared variate (the sum of all models' variates). On the fitting images at γ = 0 "
    "the squares add up to the eigenvalue. A model whose curve lies below the others' shares "
    "least with them: the outlier.")
st.markdown(cs.outlier_note(shared_rows, names))
st.dataframe(cs.shared_models_frame(shared_rows, names), hide_index=True, column_config={
    c: st.column_config.NumberColumn(format="%.3f") for c in (
        "with the shared variates, held-out", "with the shared variates, fitting",
        "variance in the shared directions")})
widgets.explain(
    "per merge point and model: its mean correlation with the shared variates, the share of its "
    "variance (on the fitting images) in the span of its shared directions (below 1 when it is "
    "wider or richer than the space all models share), and the condition number of V_iᵀV_i, "
    "its block of the eigenvectors (large: it barely spans the shared space).")
st.caption(f"Regenerate (CLI): `ccamerge spectrum "
           f"{' '.join(e.portable_path for e in inputs.entries)} "
           f"--shared --data {inputs.data_name} --gamma {gamma:g}"
           f"{'' if relative else ' --absolute'}"
           f"{'' if stats_samples is None else f' --stats-samples {stats_samples}'} --json`"
           + ("" if stats_samples is None else " (it holds out 20% of those images instead of "
              "the page's held-out ones)"))

st.subheader("Numerical health")
warnings = cs.health_warnings(rows, names)
for text in warnings:
    st.warning(text)
if not warnings:
    st.success("No warnings: enough samples per feature, no dead units, well-conditioned "
               "covariances.")
st.dataframe(cs.health_frame(rows, names), hide_index=True, column_config={
    "samples / feature": st.column_config.NumberColumn(format="%.1f"),
    "chance correlation": st.column_config.NumberColumn(format="%.2f")})
widgets.explain("per merge point: samples behind the fitting covariances (images × pixels of the "
                "feature map) per feature (warn under 10), the largest canonical correlation "
                "unrelated features would reach by chance with that many samples (Wachter's "
                "limit), condition numbers of the regularised covariances S_xx (reference) and "
                "S_yy (model) (huge = unstable inverse square roots, raise γ), and dead units "
                "that never activate on this data.")
ordered = [inputs.entries[inputs.reference],
           *(e for k, e in enumerate(inputs.entries) if k != inputs.reference)]
st.caption("Regenerate (Python): `from ccamerge import load_dataset, load_model, spectrum; "
           "spectrum([load_model(p) "
           f"for p in {[e.portable_path for e in inputs.entries]!r}], "
           f"load_dataset('{inputs.data_name}'), reference="
           f"{inputs.reference}, gamma={gamma:g}, relative={relative}"
           f"{'' if stats_samples is None else f', stats_samples={stats_samples}'})` or (CLI, "
           f"reference first) `ccamerge spectrum {' '.join(e.portable_path for e in ordered)} "
           f"--data {inputs.data_name} --gamma {gamma:g}{'' if relative else ' --absolute'}"
           f"{'' if stats_samples is None else f' --stats-samples {stats_samples}'} --json`"
           + ("" if stats_samples is None else "; both hold out 20% of those images instead "
              "of the page's held-out ones"))
