"""Interpolation: test loss and accuracy along the straight path between two models, for plain
averaging and each alignment method, and the barrier of each curve."""

import shlex

import streamlit as st

from dashboard import catalog, charts, data, state, widgets

st.title("Interpolation")
st.markdown("Blend two models, (1 − λ)·A + λ·B, after aligning B to A. If the loss stays low "
            "all along the path, the aligned models sit in one basin and merging them works.")

sel, models, inputs = widgets.selected_inputs()

pairwise, joint = catalog.pairwise_methods(), catalog.joint_methods()
c1, c2 = st.columns(2)
with c1:
    widgets.valid_choice(state.W_INTERP_A, list(sel.ids), sel.reference_id)
    a_id = st.selectbox("Model A (λ = 0)", list(sel.ids), key=state.W_INTERP_A,
                        format_func=lambda i: widgets.model_label(models, i), **widgets.KEEP)
with c2:
    b_choices = [i for i in sel.ids if i != a_id]
    widgets.valid_choice(state.W_INTERP_B, b_choices)
    b_id = st.selectbox("Model B (λ = 1)", b_choices, key=state.W_INTERP_B,
                        format_func=lambda i: widgets.model_label(models, i), **widgets.KEEP)
methods = st.multiselect("Methods", pairwise, key=state.W_INTERP_METHODS,
                         default=[m for m in widgets.INTERPOLATION_DEFAULTS if m in pairwise],
                         help=catalog.methods_help(), **widgets.KEEP)
st.caption(f"Not offered: {', '.join(joint)} aligns all models jointly and defines no path between "
           "two models (it is on the Merge page).")
options = widgets.options_panel(methods, "interp")
c3, c4 = st.columns(2)
steps = c3.slider("Points on the path", 3, 21, 11, step=2, key=state.W_INTERP_STEPS, **widgets.KEEP)
has_bn = data.uses_batchnorm(inputs.models)
bn_reset = c4.toggle("Reset BatchNorm statistics at each point", value=True, key=state.W_INTERP_BN,
                     disabled=not has_bn, help="recompute BatchNorm running statistics on the "
                     "training images (REPAIR-style); only matters for networks with BatchNorm",
                     **widgets.KEEP)
if not has_bn:
    c4.caption("These models have no BatchNorm, so the reset changes nothing.")

if not methods or b_id is None:
    st.info("Choose two models and at least one method.")
    st.stop()

indices = [sel.ids.index(a_id), sel.ids.index(b_id)]
pair, digests = inputs.pick(indices)
widgets.sampling_note(inputs)
curves = widgets.interpolation_curves(pair, digests, inputs, methods, steps=steps,
                                      bn_reset=bn_reset and has_bn, options=options,
                                      indices=tuple(indices))

cols = st.columns(len(curves))
for col, curve in zip(cols, curves, strict=True):
    col.metric(f"barrier: {curve['method']}", f"{curve['barrier']:.3f}",
               help="largest rise of the test loss above the straight line between the endpoints")

st.plotly_chart(charts.interpolation_figure(curves), key="interpolation_chart")
widgets.explain(f"left, the test loss; right, the test accuracy of the blended model as λ goes "
                f"from {models[a_id].name} (0) to {models[b_id].name} (1). *average* blends "
                "the raw weights; the other curves first align B's units to A's. The barrier is "
                "the highest point of the loss above the straight line joining the two ends: "
                "near 0 means no barrier between the aligned models. A dense map (CCA) does not "
                "reproduce a model's function exactly, so its path is two halves, drawn apart: "
                "up to λ = 0.5 B is aligned to A (solid), after it A is aligned to B (dashed), so "
                "that both ends are the real models; the step between the halves is not part of "
                "either path.")
st.dataframe(charts.barrier_frame(curves), hide_index=True, column_config={
    "loss barrier": st.column_config.NumberColumn(format="%.3f"),
    "accuracy at λ=0.5 (%)": st.column_config.NumberColumn(format="%.1f"),
    "lowest accuracy (%)": st.column_config.NumberColumn(format="%.1f")})
pair_files = " ".join(shlex.quote(models[i].portable_path) for i in (a_id, b_id))
st.caption(f"Regenerate: `ccamerge interpolate {pair_files} --method METHOD --data "
           f"{inputs.data_name} --steps {steps}{'' if bn_reset or not has_bn else ' --no-bn-reset'}"
           " --json`" + "".join(f", for {m} add `{catalog.option_flags(m, o)}`"
                                for m, o in options.items()))
