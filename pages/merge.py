"""Merge and compare: merge the selected models with each method, against the base models and
their ensemble; accuracy against the number of merged models; download model and recipe."""

import json

import streamlit as st

from dashboard import catalog, charts, data, merging, state, widgets

st.title("Merge and compare")
st.markdown("Align the selected models to the reference with each method, average their "
            "weights, and compare the single merged model with the models themselves and with "
            "their ensemble (which keeps every model and averages their outputs).")

sel, models, inputs = widgets.selected_inputs(mixed_widths=True)
widgets.target_width_note(inputs)

registered = list(catalog.METHODS)
methods = st.multiselect("Methods", registered, default=registered, key=state.W_MERGE_METHODS,
                         help=catalog.methods_help(), **widgets.KEEP)
options = widgets.options_panel(methods, "merge")
target_width = widgets.target_width_control(inputs, methods)
c1, c2, c4 = st.columns(3)
has_bn = data.uses_batchnorm(inputs.models)
bn_reset = c1.toggle("Reset BatchNorm statistics", value=True, key=state.W_MERGE_BN,
                     disabled=not has_bn, help="recompute BatchNorm running statistics of the "
                     "merged model on the training images; only matters for networks with "
                     "BatchNorm", **widgets.KEEP)
repair = c2.toggle("REPAIR", value=False, key=state.W_MERGE_REPAIR, disabled=has_bn,
                   help="rescale each merged unit to the mean/std of the endpoints' units (for "
                   "networks without BatchNorm; not for zipit, which aligns jointly)",
                   **widgets.KEEP)
curve = c4.checkbox("Accuracy vs N", value=True, key=state.W_MERGE_CURVE,
                    help="also merge the reference with the first 1, 2, ... other models, for "
                    "the chart of accuracy against the number of merged models", **widgets.KEEP)
stats_samples, test_samples = widgets.sampling(inputs)
bn_reset, repair = bn_reset and has_bn, repair and not has_bn
d1, d2, d3 = st.columns(3)
bn_policy = d1.selectbox("BatchNorm policy", merging.BN_POLICIES, key=state.W_MERGE_BN_POLICY,
                         disabled=not has_bn, help="mapped (default): fold BatchNorm into the conv "
                         "and give each merged unit the mean and scale of the mapped endpoint "
                         "features (exact for permutations, principled for CCA's dense maps); "
                         "paper: transform BatchNorm vectors with the conv rows, as the paper's "
                         "code does (exact for permutations only)",
                         **widgets.KEEP)
reset_base_bn = d2.toggle("Reset the base models' BatchNorm first", value=False,
                          key=state.W_MERGE_RESET_BASE, disabled=not has_bn,
                          help="recompute each base model's BatchNorm statistics on the training "
                          "images before merging (as the official code does)", **widgets.KEEP)
stream_points = d3.selectbox("Residual stream statistics", merging.STREAM_POINTS,
                             key=state.W_MERGE_STREAM, help="pooled: the stem and every block "
                             "output of a stage; last: only the last block's output (the "
                             "official code)", **widgets.KEEP)
bn_policy, reset_base_bn = (bn_policy, reset_base_bn) if has_bn else (merging.BN_DEFAULT, False)
settings = {"bn_policy": bn_policy, "reset_base_bn": reset_base_bn, "stream_points": stream_points,
            "target_width": target_width}
widgets.sampling_note(inputs)
signature = merging.signature(inputs, methods, options, bn_reset, repair, stats_samples, curve,
                              test_samples=test_samples, **settings)
seconds = widgets.estimate(inputs, stats_samples=stats_samples, pairs=data.pairs_needed(methods),
                           forwards=merging.forwards(inputs, methods, curve, bn_reset=bn_reset,
                                                     stats_samples=stats_samples,
                                                     test_samples=test_samples))

run = st.button("Run merge", type="primary", key=state.W_MERGE_RUN, disabled=not methods)
st.caption(f"Estimated time: {widgets.estimate_text(seconds)} (a timed forward pass, scaled by "
           "the images and methods).")
if run:
    widgets.resume("merge")
    tasks = merging.plan(len(inputs.models), methods, curve)
    with widgets.continue_on_error(), widgets.long_work("merge", signature, "merging",
                                                        len(tasks) + 1, seconds,
                                                        auto=False) as progress:
        st.session_state[state.MERGE_RESULTS] = merging.run(
            inputs, methods, options, bn_reset=bn_reset, repair=repair,
            stats_samples=stats_samples, test_samples=test_samples, curve=curve,
            step=progress.step, **settings)
elif widgets.was_cancelled("merge", signature):
    st.info("Merge cancelled; nothing of it was kept (the results below, if any, are earlier "
            "ones).", icon=":material/cancel:")

results = st.session_state.get(state.MERGE_RESULTS)
if not results:
    st.info(f"Press **Run merge** to merge the {len(inputs.models)} selected models with "
            f"{len(methods)} method(s).")
    st.stop()
if results["signature"] != signature:
    st.info("These results are for earlier settings; press **Run merge** to update them.")
for method, message in results["errors"].items():
    st.error(f"{method}: {message}")

st.subheader(f"Results: {len(results['names'])} models, "
             f"reference {results['names'][results['reference']]}")
frame = charts.results_frame(results["names"], results["base"], results["merges"])
ranked = merging.ranked(results["merges"])
held_on = results.get("held_out_on")
cols = st.columns(3)
cols[0].metric("best base model", f"{max(s['accuracy'] for s in results['base']['models']):.1f}%",
               help="test accuracy")
cols[1].metric("ensemble", f"{results['base']['ensemble']['accuracy']:.1f}%", help="test accuracy")
if ranked and ranked[0].get("held_out_accuracy") is not None:
    best = ranked[0]
    cols[2].metric(f"best merge on held-out training images: {best['method']}",
                   f"{best['accuracy']:.1f}% test", f"{best['held_out_accuracy']:.1f}% held-out",
                   delta_color="off", delta_arrow="off",
                   help=f"chosen by accuracy on the {held_on}, merged (statistics, BatchNorm "
                        "reset) from the rest of the training set, so the test set plays no part "
                        "in the choice; the value is its test accuracy. The base models were "
                        "trained on those images, so held-out accuracies run high.")
st.plotly_chart(charts.results_figure(frame), key="results_chart")
widgets.explain("test accuracy of each base model (grey), of their ensemble (black: averages the "
                "models' outputs, costs N forward passes, the ceiling a merge aims for) and of the "
                "single model each method produces (colours). Plain *average* without alignment "
                "usually collapses: units in the same position do different things.")
st.dataframe(frame, hide_index=True, height=charts.table_height(frame), placeholder="—",
             column_config={
                 "accuracy (%)": st.column_config.NumberColumn("test accuracy (%)", format="%.2f"),
                 "held-out accuracy (%)": st.column_config.NumberColumn(
                     format="%.2f",
                     help=f"the merge redone without the {held_on}, scored on them (the base "
                          "models trained on them: accuracies run high)" if held_on else None),
                 "loss": st.column_config.NumberColumn("test loss", format="%.4f"),
                 "seconds": st.column_config.NumberColumn("merge time (s)", format="%.2f")})
for warning, methods_with in charts.merge_warnings(results["merges"]).items():
    st.warning(f"{warning} ({', '.join(methods_with)})")

if len({p["n"] for p in results["curve"]}) > 1:
    st.subheader("Accuracy against the number of merged models")
    st.plotly_chart(charts.accuracy_vs_n_figure(results["curve"]), key="n_chart")
    widgets.explain("the reference merged with the first 1, 2, … other selected models. Merging "
                    "more models usually costs accuracy; the better the alignment, the slower "
                    "the decline. The dashed line is the ensemble of the same models.")

if results["files"]:
    st.subheader("Download")
    by_method = {m["method"]: m for m in results["merges"]}
    order = [m["method"] for m in ranked if m["method"] in results["files"]]
    widgets.valid_choice(state.W_MERGE_DOWNLOAD_METHOD, order)
    chosen = st.selectbox("Merged model (best first on held-out training images)" if held_on
                          else "Merged model", order, key=state.W_MERGE_DOWNLOAD_METHOD,
                          format_func=lambda m: charts.merge_label(by_method[m]),
                          help=f"ranked by accuracy on the {held_on}" if held_on else None)
    suffix = results.get("suffix", ".safetensors")
    kind = "TorchScript archive, .pt" if suffix == ".pt" else ".safetensors"
    d1, d2 = st.columns(2)
    d1.download_button(f"Download merged model ({kind})", results["files"][chosen],
                       file_name=f"merged_{chosen}{suffix}", mime="application/octet-stream",
                       key="download_model", on_click="ignore", icon=":material/download:")
    d2.download_button("Download recipe (.json)", results["recipes"][chosen],
                       file_name=f"recipe_{chosen}.json", mime="application/json",
                       key="download_recipe", on_click="ignore", icon=":material/receipt_long:")
    replay = json.loads(results["recipes"][chosen]).get("replay", "")
    st.caption(f"`{replay}` redoes this merge and writes the same weights, run in a folder "
               "holding the recipe and the files it names (your uploads under the names you "
               "gave them); replay checks each file's sha256 first.")
