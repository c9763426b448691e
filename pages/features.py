"""Feature matching: unit-by-unit correlations between the reference and one model, the
permutation found by matching, the CCA map beside it, and how spread each feature is."""

import streamlit as st

from dashboard import catalog, charts, data, state, widgets

st.title("Feature matching")
st.markdown("Do hidden units correspond one to one between two models (then a permutation "
            "aligns them), or is a feature of one model spread over several units of the other "
            "(then only a linear map such as CCA's can align it)?")

sel, models, inputs = widgets.selected_inputs()
stats_samples, test_samples = widgets.sampling(inputs)
widgets.sampling_note(inputs)
stats = widgets.selected_statistics(inputs, stats_samples)

other, point = widgets.pick_model_and_point("Model compared with the reference", sel, models,
                                            stats.points, model_key=state.W_FEAT_MODEL,
                                            point_key=state.W_FEAT_POINT)
gamma, relative = widgets.gamma_controls(state.W_FEAT_GAMMA, state.W_FEAT_RELATIVE)
with widgets.stop_on_error():
    fm = data.features(inputs.digests, inputs.data_key, inputs.reference, other, point, gamma,
                       relative, stats_samples, inputs.models, inputs.data)
ref_name, other_name = inputs.entries[inputs.reference].name, inputs.entries[other].name

summary = fm.summary()
cols = st.columns(5)
cols[0].metric("mean matched corr.", f"{summary['mean_matched_corr']:.3f}")
cols[1].metric("mean top-1 share", f"{summary['mean_top1']:.2f}",
               help="1 = each feature sits in one unit")
cols[2].metric("mean participation ratio", f"{summary['mean_participation']:.2f}",
               help="effective number of units a feature is spread over (1 = one unit)")
cols[3].metric("median k90", f"{summary['median_k90']:g}", help="units holding 90% of a feature")
cols[4].metric("argmax agrees with matching", f"{100 * summary['agreement']:.0f}%")

view, start = "aggregate", 0
max_units = catalog.MAX_DISPLAY_UNITS  # a wider layer is drawn in blocks or as a zoomed window
wide = fm.width > max_units
if wide:
    v1, v2 = st.columns([2, 3])
    view = v1.radio("Wide layer", ["aggregate", "zoom"], key=state.W_FEAT_VIEW, horizontal=True,
                    format_func=lambda v: {
                        "aggregate": f"strongest entry per block (≤{max_units})",
                        "zoom": f"{max_units} raw units"}[v], **widgets.KEEP)
    if view == "zoom":
        start = v2.slider("first unit", 0, fm.width - max_units, 0, key=state.W_FEAT_START,
                          **widgets.KEEP)

st.subheader("Correlation between units")
raw, rows, cols_raw = charts.window(fm.corr, view=view, start=start)
matched, _, cols_matched = charts.window(fm.corr_matched, view=view, start=start)
st.plotly_chart(charts.matrix_pair_figure(
    raw, matched, titles=("raw order", "model units reordered by the matching"),
    x_title=f"unit of {other_name}", y_title=f"unit of {ref_name}", rows=rows, cols=cols_raw,
    right_cols=cols_matched, limit=1.0), key="corr_chart")
widgets.explain(f"entry (j, k) is the Pearson correlation of unit j of {ref_name} (rows) with unit "
                f"k of {other_name} (columns) at {point}, over the training images. Left in the "
                "models' own order: no structure, because units are numbered arbitrarily. Right, "
                "the columns reordered by the Hungarian matching: a bright diagonal means units "
                "correspond one to one; off-diagonal colour means features are shared between "
                "several units." + (" A wide layer is shown in blocks (the strongest entry of "
                                    "each, labelled by its first unit) or as a zoomed window of "
                                    "raw units." if wide else ""))

st.subheader("CCA map beside the permutation")
order = st.toggle("Order model units by the matching", value=True, key=state.W_FEAT_ORDER,
                  **widgets.KEEP)
t_view, p_view = charts.transform_views(fm.T_tilde, fm.perm_matrix, fm.perm, matched_order=order)
t_win, rows, cols_t = charts.window(t_view, view=view, start=start)
p_win, _, _ = charts.window(p_view, view=view, start=start)
st.plotly_chart(charts.matrix_pair_figure(
    t_win, p_win, titles=("CCA transform T̃ (correlation units)", "permutation"),
    x_title=f"unit of {other_name}" + (" (matched order)" if order else ""),
    y_title=f"unit of {ref_name}", rows=rows, cols=cols_t, colorbar="weight"),
    key="transform_chart")
widgets.explain("how each model unit contributes to each reference feature when the models are "
                f"merged. Left: CCA's map T̃ = D_y T D_x⁻¹, in correlation units (γ = {gamma:g}). "
                "Right: the permutation found by matching, which can only copy one unit. Where "
                "the left is close to the right, both methods agree; where a row of T̃ spreads "
                "over many columns, CCA combines several units into one feature. Colours "
                "saturate at the 98th percentile: reference units that barely vary get very "
                "large weights (bright stripes).")

st.subheader("How spread is each feature?")
st.plotly_chart(charts.spread_figure(fm.top1, fm.participation, fm.k90), key="spread_chart")
widgets.explain("one count per reference unit j, from column j of T̃: the top-1 share (largest "
                "squared weight over the total), the participation ratio (Σw²)²/Σw⁴ (1 for a "
                "permutation, n for a uniform mix) and k90 (how many units hold 90% of the "
                "weight). Mass near 1 / 1 / 1 means a permutation would do.")
with st.expander("Per-unit values"):
    st.dataframe(charts.spread_frame(fm.top1, fm.participation, fm.k90, fm.agrees, fm.perm),
                 hide_index=True)

st.subheader("Spread weights, the same feature?")
st.markdown("The map above spreads each feature over many units, the permutation copies one. "
            "Do they align different features? Measured on held-out training images: how closely "
            "each alignment reproduces the reference's units, and what merging costs, layer by "
            "layer, with each method.")
pair, pair_digests = inputs.pick([inputs.reference, other])
pair_stats = data.pick_statistics(stats, [inputs.reference, other], 0)
pair_methods = (("cca", {"gamma": gamma, "relative": relative}), ("permute", {}))
seconds = widgets.estimate(inputs, stats_samples=stats_samples, forwards=len(pair_methods) * (
    widgets.points_count(inputs) + 1) * (test_samples or len(inputs.data.test)))
signature = str((pair_digests, inputs.data_key, point, gamma, relative, stats_samples,
                 test_samples))
with widgets.stop_on_error(), widgets.long_work("features", signature, "merging layer by layer",
                                                len(pair_methods), seconds) as progress:
    units = data.held_out_alignment(inputs.digests, inputs.data_key, inputs.reference, other,
                                    point, gamma, relative, stats_samples, inputs.models,
                                    inputs.data)
    curves = []
    for k, (method, opts) in enumerate(pair_methods):
        progress.step(k, method)
        curves.append(data.partial_merges(pair_digests, inputs.data_key, method, opts,
                                          data.uses_batchnorm(pair), stats_samples, test_samples,
                                          pair, inputs.data, pair_stats))
where = "held-out" if units.held_out else "fitting"
means = units.means()
q = st.columns(3)
q[0].metric(f"CCA's mix vs reference unit ({where})", f"{means['cca']:.3f}",
            help="mean over reference units j of corr(x_j, (y·T)_j): CCA's mapped features "
                 "against the unit they stand for")
q[1].metric(f"matched unit vs reference unit ({where})", f"{means['permute']:.3f}",
            help="mean over reference units j of corr(x_j, y_perm(j)): the permutation's copy")
q[2].metric(f"CCA's mix vs matched unit ({where})", f"{means['mix_vs_match']:.3f}",
            help="mean over j of corr((y·T)_j, y_perm(j)): how much of CCA's mix is the unit "
                 "the permutation picks")
st.markdown(charts.alignment_conclusion(means, summary["mean_participation"], curves,
                                        where=where))
left, right = st.columns(2)
with left:
    st.plotly_chart(charts.aligned_units_figure(units.cca, units.permute, units.mix_vs_match,
                                                where=where), key="aligned_units_chart")
    widgets.explain(f"one value per reference unit at {point}, sorted: the correlation of CCA's "
                    "mapped features with the reference unit, of the matched unit with it and "
                    "of CCA's mix with the matched unit (dotted). CCA and the matching are "
                    "fitted on 80% of the training images and measured on the other 20%.")
with right:
    st.plotly_chart(charts.partial_merges_figure(curves), key="partial_merges_chart")
    widgets.explain(f"test accuracy of merging {ref_name} and {other_name} at the first k merge "
                    "points only (the reference's own layers after them), for CCA at this γ and "
                    "for the permutation; 'reference' is the reference alone.")
