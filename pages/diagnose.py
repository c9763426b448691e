"""Why did it fail? A diagnosis of one merge: the checklist first, then the layers ranked by the
damage merging them does, similarity and health per merge point, collapse, and the sweep."""

import streamlit as st

from dashboard import catalog, data, state, widgets
from dashboard import charts_diagnose as cd

st.title("Why did it fail?")
st.markdown("Merge the selected models once, then take the merge apart: which merge point does "
            "the damage, how similar the models are there, whether the merged activations "
            "collapse, and whether another setting would have done better. The checklist names "
            "the likely cause and what to try next.")

sel, models, inputs = widgets.selected_inputs()

c1, c2, c4 = st.columns(3)
methods = list(catalog.METHODS)
method = c1.selectbox("Method", methods, index=methods.index("cca"), key=state.W_DIAG_METHOD,
                      help=catalog.methods_help(), **widgets.KEEP)
has_bn = data.uses_batchnorm(inputs.models)
bn_reset = c2.toggle("Reset BatchNorm statistics", value=True, key=state.W_DIAG_BN,
                     disabled=not has_bn, help="recompute the merged model's BatchNorm running "
                     "statistics on the training images; switch off to see what happens without",
                     **widgets.KEEP)
sweepable = method in ("cca", "zipit")
with_sweep = c4.checkbox("Hyperparameter sweep", value=False, key=state.W_DIAG_SWEEP,
                         disabled=not sweepable, help="merged accuracy over a log grid of gamma "
                         "(cca) or alpha x beta (zipit), on a held-out slice of the training set",
                         **widgets.KEEP) and sweepable
options = {}
if catalog.METHODS[method].options:
    with st.expander(f"{method} options"):
        options = widgets.method_options(method, "diag")

stats_samples, test_samples = widgets.sampling(inputs)
widgets.sampling_note(inputs)
diagnosed = (inputs.digests, inputs.data_key, method, options, inputs.reference, bn_reset,
             stats_samples, test_samples)
seconds = widgets.diagnosis_estimate(inputs, method, stats_samples, test_samples)
with widgets.stop_on_error(), widgets.long_work("diagnose", str(diagnosed), "diagnosing", 1,
                                                seconds) as progress:
    report = data.diagnosis(inputs.models, inputs.digests, inputs.data, inputs.data_key, method,
                            options, reference=inputs.reference, bn_reset=bn_reset and has_bn,
                            stats_samples=stats_samples, test_samples=test_samples,
                            progress=progress.step(0, method))
if with_sweep:
    sweep_seconds = widgets.sweep_estimate(inputs, method, stats_samples)
    with widgets.stop_on_error(), widgets.long_work("sweep", str(diagnosed), "sweeping", 1,
                                                    sweep_seconds) as progress:
        report = data.diagnosis_sweep(inputs.models, inputs.digests, inputs.data,
                                      inputs.data_key, report, stats_samples=stats_samples,
                                      progress=progress.step(0, method))
names = [e.name for e in inputs.entries]

st.subheader("Checklist")
st.markdown(cd.verdict(report))
show = {"failure": st.error, "warning": st.warning, "info": st.info}
icons = {"failure": ":material/error:", "warning": ":material/warning:", "info": ":material/info:"}
for severity, findings in cd.checklist_groups(report["findings"]).items():
    for finding in findings:
        show[severity](cd.finding_markdown(finding), icon=icons[severity])
        if "apply" in finding:
            widgets.apply_button(**finding["apply"], source="the diagnosis checklist",
                                 key=f"{state.W_DIAG_APPLY}_{finding['id']}")
st.caption("Models: " + " · ".join(f"model {k} = {n}" for k, n in enumerate(names))
           + f" (reference: model {inputs.reference}). Diagnosed in {report['seconds']:.1f} s.")

st.subheader("Scores", anchor=cd.CHARTS["summary"][0])
st.plotly_chart(cd.summary_figure(report, names), key="diag_summary_chart")
widgets.explain("test accuracy of each selected model (grey), of their ensemble (black: keeps "
                "every model, the ceiling a merge aims for) and of the merged model. The "
                "checklist compares the merge with the mean of the base models.")

st.subheader("Layers ranked by damage", anchor=cd.CHARTS["partial"][0])
st.plotly_chart(cd.damage_figure(report), key="diag_damage_chart")
widgets.explain("partial merges: merge only the first k merge points and keep the reference "
                "model's remaining layers (they already speak the reference's basis). Left: test "
                "accuracy and loss as k grows, from the reference alone to the full merge. Right: "
                "the loss each merge point adds, most damaging on top; 'breaks (NaN)' marks the "
                "point where the model stops computing finite numbers.")
st.dataframe(cd.ranking_frame(report), hide_index=True, placeholder="—", column_config={
    "loss added": st.column_config.NumberColumn(format="%.4f"),
    "accuracy lost (points)": st.column_config.NumberColumn(format="%.1f"),
    "accuracy merged up to here (%)": st.column_config.NumberColumn(format="%.1f")})

st.subheader("Similarity per merge point", anchor=cd.CHARTS["spectra"][0])
st.plotly_chart(cd.similarity_figure(report), key="diag_similarity_chart")
widgets.explain("how much the models have in common at each merge point, averaged over the "
                "non-reference models: the mean canonical correlation (what CCA can align), the "
                "mean correlation of Hungarian-matched unit pairs (what a permutation can align) "
                "and of units at the same index (what plain averaging pairs: near 0 means it "
                "averages unrelated units). The Spectra page shows the full spectra.")

st.subheader("Numerical health", anchor=cd.CHARTS["health"][0])
st.dataframe(cd.health_frame(report), hide_index=True, placeholder="—", column_config={
    "mean ρ (CCA, γ≈0)": st.column_config.NumberColumn(format="%.3f"),
    "mean matched corr.": st.column_config.NumberColumn(format="%.3f"),
    "same-index corr.": st.column_config.NumberColumn(format="%.3f"),
    "variance ratio": st.column_config.NumberColumn(format="%.2f"),
    "cond(S_xx)": st.column_config.NumberColumn(format="%.3g"),
    "cond(S_yy)": st.column_config.NumberColumn(format="%.3g"),
    "samples / feature": st.column_config.NumberColumn(format="%.1f")})
widgets.explain("per merge point: the similarities above, the variance ratio (collapse, below), "
                "the condition numbers of the reference's and the models' covariances (huge = "
                "unstable whitening), dead units (never active on these images) and the samples "
                "behind each covariance per feature (under 10 is noise).")

st.subheader("Collapse", anchor=cd.CHARTS["collapse"][0])
st.plotly_chart(cd.collapse_figure(report), key="diag_collapse_chart")
widgets.explain("total variance of the merged model's activations at each merge point over the "
                "mean of the endpoints'. Averaging units that do different things cancels their "
                "signals and the variance shrinks layer after layer (red below the dashed "
                "threshold); REPAIR or a BatchNorm reset rescales it. 'NaN/inf': the merged model "
                "does not compute finite numbers there.")

st.subheader("Hyperparameter sweep", anchor=cd.CHARTS["sweep"][0])
if "sweep" in report:
    st.plotly_chart(cd.sweep_figure(report["sweep"]), key="diag_sweep_chart")
    widgets.explain("merged accuracy for each setting of the grid, measured on a held-out slice "
                    "of the training set (never the test set, so choosing by it is fair). The "
                    "star marks the best setting, the diamond the one this merge used. "
                    + cd.sweep_caption(report["sweep"]) + ".")
    widgets.apply_button(report["sweep"]["method"], report["sweep"]["best"],
                         source=f"the sweep ({report['sweep']['selected_on']})",
                         key=f"{state.W_DIAG_APPLY}_sweep")
elif sweepable:
    st.info("Tick **Hyperparameter sweep** above to search the best setting on held-out data.")
else:
    st.info(f"{method} has no hyperparameter to sweep; cca (gamma) and zipit (alpha, beta) do.")

st.caption("Regenerate: `" + cd.diagnose_command(
    [e.portable_path for e in inputs.entries], inputs.data_name, method, options,
    reference=inputs.reference, bn_reset=bn_reset or not has_bn, stats_samples=stats_samples,
    sweep=with_sweep) + "`")
