"""Merge points: what ccamerge aligns in a model, found by tracing it, verified by permuting it,
with the unsupported operations and a diagram of the network."""

import shlex

import pandas as pd
import streamlit as st

from dashboard import archives, data, registry, spec_tables, state, widgets

SAMPLES = 64  # training images the trace and the verification run on (as `ccamerge spec`)

st.title("Merge points")
st.markdown("Before a merge, ccamerge traces the model with `torch.fx`, follows every channel "
            "through the graph, and groups the parameters that must be permuted together into "
            "**merge points**. Each point is then **verified**: a random permutation applied "
            "through it must leave the network's outputs unchanged, or the point is not used. "
            "Built-in families and uploaded TorchScript archives of any architecture alike.")

sel = state.selection()
models = st.session_state[state.MODELS]
if not sel.ids:
    widgets.error("select a model in the sidebar")
    st.stop()
widgets.valid_choice(state.W_POINTS_MODEL, list(sel.ids), sel.reference_id)
chosen = st.selectbox("Model", list(sel.ids), key=state.W_POINTS_MODEL,
                      format_func=lambda i: widgets.model_label(models, i),
                      help="any model of the selection (the reference first); models of one "
                      "architecture have the same merge points")
entry = models[chosen]
with widgets.stop_on_error():
    dataset = data.dataset(registry.dataset_path(sel.dataset, st.session_state[state.DATASETS]))
    model = entry.model()
    with st.spinner("Tracing and verifying..."):
        report = data.merge_points(entry.digest, sel.dataset, SAMPLES, model, dataset)

largest = spec_tables.max_difference(report)
cols = st.columns(4)
cols[0].metric("merge points", len(report["points"]))
cols[1].metric("verification", "passed" if report["verified"] else "failed")
cols[2].metric("max |Δ output|", f"{largest:.1e}" if largest is not None else "—",
               help=f"tolerance {report['tolerance']:g}")
cols[3].metric("unsupported operations", len(report["unsupported"]))
if report["matches_hand_written"] is True:
    st.success(f"The traced merge points of this {registry.describe(model)} are exactly the "
               "hand-written spec of its family.", icon=":material/check_circle:")
elif report["matches_hand_written"] is False:
    st.warning(f"The traced merge points differ from the hand-written spec of "
               f"{registry.describe(model)}; merges of built-in models use the hand-written one.")
if not report["points"]:
    st.error("No merge point can be aligned safely in this model, so it cannot be merged with "
             "ccamerge; the sections below say why.")

st.subheader("Verification")
verification = pd.DataFrame(spec_tables.verification_rows(report))
st.dataframe(verification, hide_index=True, column_config={
    "max |Δ output|": st.column_config.NumberColumn(format="%.2e"),
    "tolerance": st.column_config.NumberColumn(format="%.0e"),
    "used": st.column_config.CheckboxColumn("used in merges")})
widgets.explain(f"each merge point's units are shuffled by a random permutation, applied to every "
                f"parameter listed for it below, and the outputs on {SAMPLES} training images are "
                f"compared with the original's (*all*: every point shuffled at once). A correct "
                f"merge point changes nothing but float rounding (1e-8 to 1e-5); above the "
                f"tolerance ({report['tolerance']:g}) the point is rejected and never merged. "
                f"Traced in {report['seconds']:.2f} s.")
for name, diff in report["rejected"].items():
    st.warning(f"merge point {name} failed verification (outputs changed by {diff:.3g}) and is "
               "not used")

st.subheader("Merge points")
points = pd.DataFrame(spec_tables.point_rows(report))
st.dataframe(points, hide_index=True, column_config={
    "producers": st.column_config.TextColumn(width="large"),
    "consumers": st.column_config.TextColumn(width="medium"),
    "max |Δ output|": st.column_config.NumberColumn(format="%.2e"),
    "verified": st.column_config.CheckboxColumn("verified")})
widgets.explain("one row per group of units that a merge aligns. *features from*: the module "
                "whose output the statistics hook (CCA and permutation matching compare these "
                "activations across models). *producers*: parameters whose axis (in brackets) "
                "creates the units, transformed by T; *consumers*: parameters that read them, "
                "transformed by T⁻¹. ×r: each unit spans r entries (a flatten); +o: its block "
                "starts at entry o (a concatenation).")

st.subheader("Unsupported operations")
unsupported = spec_tables.unsupported_rows(report)
if unsupported:
    st.table(pd.DataFrame(unsupported).set_index("operation"))
else:
    st.success("None: every operation in the graph is understood.")
widgets.explain("operations whose effect on channels the trace cannot follow (for example a "
                "grouped convolution or attention), with the reason. The channel groups they "
                "touch are left unmerged rather than merged wrongly.")
if report["unmerged"]:
    st.markdown("**Left unmerged**\n" + "\n".join(f"- {u}" for u in report["unmerged"]))
if report["notes"]:
    st.markdown("**Notes**\n" + "\n".join(f"- {n}" for n in report["notes"]))

st.subheader("Diagram")
left, right = st.columns([3, 2])
with left:
    st.graphviz_chart(report["dot"])
with right:
    widgets.explain("the traced network, one box per operation, input at the top. Blue boxes: "
                    "the modules whose outputs define a merge point's features; coloured edges "
                    "carry a merge point's channels, labelled with its name and width; red "
                    "octagons: unsupported operations.")
    with st.expander("Diagram as text (Graphviz DOT and Mermaid)"):
        st.code(report["dot"], language="dot", height=320)
        st.code(report["mermaid"], language="mermaid", height=320)
flag = " --trust-code" if entry.is_archive or archives.is_archive_model(model) else ""
command = (f"ccamerge spec {shlex.quote(entry.portable_path)} --data "
           f"{shlex.quote(registry.dataset_file(sel.dataset, st.session_state[state.DATASETS]))}"
           f"{flag} --json")
st.caption(f"`{command}` prints the same report (run in a folder holding "
           f"{entry.filename}).")
