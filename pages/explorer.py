"""Feature explorer: the hidden units of the reference, of one model before and after alignment
and of the merged model in one 2-D map; the inputs as each of them sees them, by class."""

import streamlit as st

from dashboard import catalog, data, state, widgets
from dashboard import charts_diagnose as cd

st.title("Feature explorer")
st.markdown("Each hidden unit is a point placed by what it responds to: two units that fire on "
            "the same images land together. Alignment should bring model i's units onto the "
            "reference's; the merged model's units should stay where both models put them.")

sel, models, inputs = widgets.selected_inputs()
stats_samples, _test_samples = widgets.sampling(inputs)
stats = widgets.selected_statistics(inputs, stats_samples)

c1, c2, c3 = st.columns(3)
other, point = widgets.pick_model_and_point("Model i", sel, models, stats.points,
                                            model_key=state.W_EXPL_MODEL,
                                            point_key=state.W_EXPL_POINT, columns=(c1, c2))
methods = list(catalog.METHODS)
with c3:
    method = st.selectbox("Alignment method", methods, index=methods.index("cca"),
                          key=state.W_EXPL_METHOD, help="default options; the merged model "
                          "averages every selected model after this alignment", **widgets.KEEP)
c4, c5 = st.columns(2)
n_test = len(inputs.data.y_test)
samples = c4.slider("Test images", min(20, n_test), min(1000, n_test), min(360, n_test), step=10,
                    key=state.W_EXPL_SAMPLES, help="the sample of inputs that defines each unit's "
                    "profile and the input maps", **widgets.KEEP)
embedding = c5.radio("Embedding", list(catalog.EXPLORER_EMBEDDINGS), key=state.W_EXPL_EMBEDDING,
                     horizontal=True, format_func=lambda e: {
                         "pca": "PCA (instant)", "umap": "UMAP (first run ~30 s, then cached)"}[e],
                     **widgets.KEEP)
bn_reset = data.uses_batchnorm(inputs.models)
names = {"reference": f"{inputs.entries[inputs.reference].name} (reference)",
         "model": inputs.entries[other].name,
         "aligned": f"{inputs.entries[other].name} aligned ({method})",
         "merged": f"merged ({method})"}

key = (inputs.digests, inputs.data_key, method, inputs.reference, other, point, samples, bn_reset,
       stats_samples)
with widgets.stop_on_error(), st.spinner(f"Embedding units with {embedding.upper()}..."):
    units = data.unit_set(*key, inputs.models, inputs.data)
    coords = data.unit_embedding(*key, embedding, inputs.models, inputs.data)

st.subheader(f"Units at {point}")
cols = st.columns(4)
for col, group in zip(cols, catalog.EXPLORER_GROUPS, strict=True):
    rows = units.rows(group)
    partner = "matched" if group in ("reference", "model") else "aligned"
    col.metric(names[group], f"{units.partner_corr[rows].mean():.3f}",
               help=f"mean correlation of these units with their {partner} partner "
                    "(profiles over the sampled test images)")
st.plotly_chart(cd.unit_embedding_figure(coords, units, names, method=embedding),
                key="units_chart")
widgets.explain(f"{units.width} units from each of four networks at {point}, placed by their "
                f"activation on {units.inputs} test images (averaged over positions for a conv "
                "map; each unit's profile standardised, then PCA or UMAP). Hover a point for its "
                "partner: a reference unit's Hungarian match in model i and back; for the aligned "
                "and merged models, the reference unit they were aligned to, with the profile "
                "correlation r. The metrics above average r. A permutation only renames units, so "
                "model i aligned sits exactly on model i; CCA mixes them into new units.")

st.subheader(f"Inputs as each model sees them at {point}")
with widgets.stop_on_error(), st.spinner("Embedding inputs..."):
    panels = data.input_embeddings(*key, embedding, inputs.models, inputs.data)
st.plotly_chart(cd.input_embedding_figure([(names[g], panels[g])
                                           for g in catalog.EXPLORER_GROUPS]),
                key="inputs_chart")
widgets.explain(f"the same {samples} test images, each placed by its whole representation at "
                f"{point} (every unit at every position), one panel per network, coloured by "
                "class. Separability is the accuracy of classifying each image by the nearest "
                "class centre (two-fold, full representation; in brackets, on the 2-D picture "
                "alone). If the merged panel separates the classes about as well as the others, "
                "merging kept the information this layer carries.")
