"""Teaching mode: model merging in four steps on the selected models, with their real numbers."""

import numpy as np
import streamlit as st

from dashboard import charts, data, state, widgets
from dashboard import charts_diagnose as cd

st.title("Teaching mode")
st.markdown("Why can't we just average two trained networks, and what does alignment do? Four "
            "steps, computed live on the models selected in the sidebar.")

sel, models, inputs = widgets.selected_inputs()
stats_samples, test_samples = widgets.sampling(inputs)
widgets.sampling_note(inputs)
stats = widgets.selected_statistics(inputs, stats_samples)
other, point = widgets.pick_model_and_point("Model i (compared with the reference)", sel, models,
                                            stats.points, model_key=state.W_TEACH_MODEL,
                                            point_key=state.W_TEACH_POINT)
ref_name, other_name = inputs.entries[inputs.reference].name, inputs.entries[other].name

# ----------------------------------------------------------------------------- step 1
st.header("1. Swapping hidden units changes nothing")
with widgets.stop_on_error():
    swap = data.swap_demo(inputs.digests[inputs.reference], inputs.data_key, stats_samples,
                          test_samples, inputs.models[inputs.reference], inputs.data)
acc = swap["accuracy"]
st.markdown(f"Hidden units have no fixed order. Shuffle the {swap['width']} units of "
            f"{swap['point']} in {ref_name} (and every other layer's), moving each unit's incoming "
            f"weights and outgoing weights together: unit 0 now sits where unit {swap['perm'][0]} "
            f"was, unit 1 where unit {swap['perm'][1]} was, and so on "
            f"(`{swap['perm']}`...). The network computes the same function.")
m = st.columns(4)
m[0].metric("largest output change", f"{swap['max_abs_diff']:.1e}",
            help="max |logits(original) − logits(swapped)| over the test images (float32 rounding)")
m[1].metric("accuracy, original", f"{acc['original']:.1f}%")
m[2].metric("accuracy, swapped", f"{acc['swapped']:.1f}%")
m[3].metric("averaged with its swapped copy", f"{acc['average_unaligned']:.1f}%",
            delta=f"{acc['average_unaligned'] - acc['original']:.1f}", delta_color="normal",
            help="plain weight average of the model and its own shuffled copy")
st.markdown(f"Averaging the model with its own shuffled copy, two networks computing *the same "
            f"function*, drops it to {acc['average_unaligned']:.1f}%: weight by weight it "
            f"averages unrelated units. Matching units by their activations finds the shuffle "
            f"again ({100 * swap['recovered']:.0f}% of units; dead units, which never fire, "
            f"cannot be told apart) and the average is the original: "
            f"{acc['average_matched']:.1f}%.")

# ----------------------------------------------------------------------------- step 2
st.header("2. The permutation found by matching")
with widgets.stop_on_error():
    fm = data.features(inputs.digests, inputs.data_key, inputs.reference, other, point, 0.1,
                       True, stats_samples, inputs.models, inputs.data)
same = float(np.mean(np.diag(fm.corr)))
matched = float(np.mean(np.diag(fm.corr_matched)))
st.markdown(f"Two independently trained models learn similar units in different places. "
            f"Correlate every unit of {ref_name} with every unit of {other_name} at {point} over "
            f"the training images, then pick the one-to-one pairing with the highest total "
            f"correlation (the Hungarian algorithm). Units at the same index correlate "
            f"**{same:.2f}** on average; matched pairs **{matched:.2f}**.")
raw, rows, cols_raw = charts.window(fm.corr)
reordered, _, cols_matched = charts.window(fm.corr_matched)
st.plotly_chart(charts.matrix_pair_figure(
    raw, reordered, titles=("units in their own order", "columns reordered by the matching"),
    x_title=f"unit of {other_name}", y_title=f"unit of {ref_name}", rows=rows, cols=cols_raw,
    right_cols=cols_matched, limit=1.0), key="teach_corr_chart")
widgets.explain("correlation of each reference unit (rows) with each unit of model i (columns). "
                "Left, as trained: no pattern. Right, model i's units reordered by the "
                "permutation: the bright diagonal is the pairs the matching found.")
first = min(8, fm.width)
st.dataframe({"reference unit": np.arange(first), f"matched unit of {other_name}": fm.perm[:first],
              "correlation of the pair": np.diag(fm.corr_matched)[:first],
              "correlation with the same index": np.diag(fm.corr)[:first]}, hide_index=True)

# ----------------------------------------------------------------------------- step 3
st.header("3. CCA, step by step")
st.markdown("A permutation can only pair units one to one. CCA Merge looks for a linear map "
            "instead: the directions in which the two models' features correlate best.")
gamma, relative = widgets.gamma_controls(state.W_TEACH_GAMMA, state.W_TEACH_RELATIVE)
with widgets.stop_on_error():
    steps = data.cca_steps(inputs.digests, inputs.data_key, inputs.reference, other, point,
                           gamma, relative, stats_samples, inputs.models, inputs.data)
n_live = len(steps.live_x)
dead = stats.points[point].width - n_live
st.markdown(f"**a. Covariances.** From the activations at {point}: S_xx ({ref_name} with "
            f"itself), S_yy ({other_name}) and S_xy (between them), each {n_live}×{n_live}"
            + (f" ({dead} dead units paired aside)" if dead else "") + ". The ridge γ adds "
            f"{steps.gamma_x:.3g} to S_xx's diagonal and {steps.gamma_y:.3g} to S_yy's.")
st.plotly_chart(cd.covariance_figure(steps.s_xx, steps.c_xy), key="teach_cov_chart")
widgets.explain("left, the reference's covariance (its diagonal holds each unit's variance); "
                "right, the cross-covariance between reference units (rows) and model i units "
                "(columns). Colours saturate at the 98th percentile.")
st.dataframe(cd.corner_frame(steps.s_xx, rows="x", cols="x").style.format("{:.4f}"))

st.markdown(f"**b. Whitening.** W_x = S_xx^-1/2 and W_y = S_yy^-1/2 turn each model's features "
            f"into uncorrelated unit-variance ones. S_xx's eigenvalues span "
            f"{steps.eig_x.min():.3g} to {steps.eig_x.max():.3g} (condition number "
            f"{steps.eig_x.max() / steps.eig_x.min():.3g}); after whitening all are 1: "
            f"max |W_x S_xx W_x − I| = {steps.whitening_error:.1e}.")
st.plotly_chart(cd.eigen_figure(steps.eig_x, steps.eig_y), key="teach_eigen_chart")
widgets.explain("eigenvalues of the regularised covariances, largest first, on a log scale. "
                "Whitening divides each eigen-direction by its square root; tiny eigenvalues "
                "(the right end) are what γ keeps from blowing up.")

with widgets.stop_on_error():
    spectrum = next(r for r in data.held_out_spectrum(
        inputs.digests, inputs.data_key, inputs.reference, gamma, relative, stats_samples,
        inputs.models, inputs.data) if r["name"] == point and r["model"] == other)
held = spectrum["reached_heldout"] is not None
where = "held-out images" if held else "the fitting images"
shrunk_name = f"shrunk singular values (ridge γ = {gamma:g}{', relative' if relative else ''})"
st.markdown(
    f"**c. SVD.** M = W_x S_xy W_y = U diag(s) Vᵀ (max reconstruction error "
    f"{steps.svd_error:.1e}). With a ridge the singular values are **shrunk**, not correlations: "
    f"s₁ = {steps.rho[0]:.3f}, mean {steps.rho.mean():.3f}. Pair k's directions a_k = W_x u_k "
    "and b_k = W_y v_k reach the correlation corr(X a_k, Y b_k) = a_kᵀ C_xy b_k / "
    "√(a_kᵀ C_xx a_k · b_kᵀ C_yy b_k), with the unregularised covariances C. Fitted on 80% of "
    f"the training images, the pairs reach a mean of **{spectrum['mean_reached_fit']:.3f}** there"
    + (f" and **{spectrum['mean_reached_heldout']:.3f}** on the held-out 20%, against "
       f"{spectrum['mean_matched_heldout']:.3f} for the matched unit pairs on the same images."
       if held else f", against {spectrum['mean_matched_fit']:.3f} for the matched unit pairs."))
measured = "heldout" if held else "fit"
st.plotly_chart(cd.rho_figure(spectrum["shrunk"], spectrum[f"reached_{measured}"],
                              spectrum[f"matched_{measured}"], shrunk_name=shrunk_name,
                              where=where), key="teach_rho_chart")
widgets.explain(f"bars: the correlation each canonical pair reaches on {where}, best pair "
                "first. Grey: the singular values of M, shrunk by the ridge; slide γ towards 0 "
                "and they rise, while the correlations the pairs reach change far less. Line: the "
                "matched unit pairs' correlations, sorted. The first canonical pairs beat every "
                "matched pair; later ones must be uncorrelated with the earlier ones and fall "
                "below the line, while matched pairs may repeat one shared signal.")

st.markdown(f"**d. The two maps.** T = W_y V Uᵀ S_xx^1/2 sends a row of {other_name}'s features "
            f"into {ref_name}'s basis (y ↦ y·T); T⁻¹ = W_x U Vᵀ S_yy^1/2 goes back, and "
            f"max |T·T⁻¹ − I| = {steps.inverse_error:.1e}. The merge rewrites {other_name}'s "
            "weights with T and T⁻¹ (the next layer undoes the map), then averages. These are "
            f"the library's own T (largest difference {steps.library_error:.1e}).")
st.dataframe(cd.corner_frame(steps.T, rows="y", cols="x").style.format("{:.4f}"))
widgets.explain("the top-left 5×5 entries of T (rows: units of model i, columns: reference "
                "units). The Feature matching page shows all of T in correlation units beside "
                "the permutation.")

# ----------------------------------------------------------------------------- step 4
st.header("4. Why averaging without alignment fails")
st.markdown(f"Walk in a straight line from {ref_name} (λ = 0) to {other_name} (λ = 1), blending "
            "the weights. Without alignment the blend passes through a region of high loss (a "
            "barrier); after aligning the units the path stays low and its midpoint is a good "
            "merged model.")
pair, digests = inputs.pick([inputs.reference, other])
curves = widgets.interpolation_curves(pair, digests, inputs, ("average", "permute", "cca"),
                                      steps=11, bn_reset=data.uses_batchnorm(pair),
                                      indices=(inputs.reference, other))
for col, curve in zip(st.columns(3), curves, strict=True):
    col.metric(f"loss barrier, {curve['method']}", f"{curve['barrier']:.3f}",
               help="highest rise of the test loss above the straight line between the ends")
st.plotly_chart(charts.interpolation_figure(curves), key="teach_interp_chart")
widgets.explain("test loss (left) and accuracy (right) along the path. *average* blends the raw "
                "weights; *permute* and *cca* first align model i to the reference (step 2 and "
                "step 3). The dip of *average* in the middle is why naive merging fails.")
