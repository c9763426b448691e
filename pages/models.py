"""Models and data: what is loaded, the dataset, and uploads of models and datasets."""

import pandas as pd
import streamlit as st

from dashboard import archives, catalog, charts, data, registry, state, uploads, widgets

st.title("Models and data")
st.markdown("Pick **2 or more models of one architecture**, the **reference** and the **dataset** "
            "in the sidebar; every page works on that selection. The demo zoo was trained on "
            "`digits` by `ccamerge.train.train_zoo`; add your own models below.")

sel = state.selection()
models = st.session_state[state.MODELS]
datasets = st.session_state[state.DATASETS]

dataset = None
with widgets.continue_on_error():
    dataset = data.dataset(registry.dataset_path(sel.dataset, datasets))

st.subheader("Loaded models")
scores = {e.id: data.model_scores(e.digest, sel.dataset, e.model(), dataset) if dataset else None
          for e in models.values()}
frame = pd.DataFrame(registry.table_rows(models, list(sel.ids), scores))
columns = {
    "selected": st.column_config.CheckboxColumn("selected", width="small"),
    "arch": st.column_config.TextColumn("arch", width="medium", help="the built-in family, or "
                                        "`torchscript` and the class of a TorchScript archive"),
    "parameters": st.column_config.NumberColumn("parameters", format="localized"),
    "accuracy (%)": st.column_config.NumberColumn("accuracy (%)", format="%.1f",
                                                  help="measured now on the selected "
                                                       "dataset's test set"),
    "saved accuracy (%)": st.column_config.NumberColumn("saved accuracy (%)", format="%.1f",
                                                        help="recorded in the file when it "
                                                             "was trained"),
}
st.dataframe(frame, hide_index=True, placeholder="—", height=charts.table_height(frame),
             column_config=columns)
widgets.explain("one row per model this session has loaded. *accuracy* is measured on the test "
                "images of the dataset chosen in the sidebar (empty when the dataset does not fit "
                "the model); *saved accuracy* is what the file recorded after training. Models "
                "trained from different seeds reach similar accuracy but their hidden units come "
                "in a different order: that is what the other pages align.")

if dataset is not None:
    st.subheader(f"Dataset: {registry.dataset_label(sel.dataset, datasets)}")
    info = dataset.describe()
    cols = st.columns(4)
    cols[0].metric("training images", f"{info['train_size']:,}")
    cols[1].metric("test images", f"{info['test_size']:,}")
    cols[2].metric("classes", info["num_classes"])
    shape = info.get("image_shape") or info.get("input_shape")
    cols[3].metric("image shape" if "image_shape" in info else "features",
                   " x ".join(map(str, shape)))

st.subheader("Upload")
left, right = st.columns(2)
with left:
    st.file_uploader("Model files (.safetensors from `ccamerge train`, weights-only .pt/.pth, "
                     "or TorchScript archives from `torch.jit.save`)",
                     type=["safetensors", "pt", "pth", "ts", "torchscript"],
                     accept_multiple_files=True, key=state.W_MODEL_UPLOAD,
                     on_change=uploads.on_model_upload,
                     max_upload_size=data.MAX_UPLOAD_BYTES // 2**20)
    st.warning(archives.WARNING, icon=":material/gpp_maybe:")
    st.checkbox(archives.TRUST_LABEL, key=state.W_TRUST_CODE, on_change=uploads.on_trust_change,
                help="TorchScript archives of any architecture are replayed, traced and verified "
                "(see the Merge points page); without this box they are not loaded at all")
    with st.expander("Architecture of .pt / .pth files (a bare state dict does not say)"):
        arch = st.selectbox("architecture", list(catalog.ARCHITECTURES), key=state.W_PT_ARCH,
                            **widgets.KEEP)
        st.text_area("config (JSON, as `build_model(arch, **config)` takes it)",
                     value=uploads.default_pt_config(arch, sel.dataset),
                     key=uploads.config_key(arch), height=90, **widgets.KEEP)
        st.caption(".pt files are read with PyTorch's weights-only unpickler: a file that tries to "
                   "run code is refused, never executed.")
with right:
    st.file_uploader("Dataset (.npz with x_train, y_train, x_test, y_test, or a .zip of an "
                     "image folder root/<class>/*.png)", type=["npz", "zip"],
                     key=state.W_DATA_UPLOAD, on_change=uploads.on_dataset_upload,
                     max_upload_size=data.MAX_UPLOAD_BYTES // 2**20,
                     help="an .npz holds feature vectors [N, F] (for MLPs) or images [N, H, W] / "
                     "[N, C, H, W] of any size; a zip holds one folder per class (or train/ and "
                     "test/ folders of classes)")
    st.caption(f"Built-in: {', '.join(['digits', 'fashion-mnist'])} (fashion-mnist when the Debian "
               "package `dataset-fashion-mnist` is installed).")

for level, text in st.session_state[state.UPLOAD_MESSAGES]:
    {"error": st.error, "warning": st.warning}.get(level, st.success)(text)
recent = uploads.recent_uploads(st.session_state)
if recent:
    st.button(uploads.NEW_SELECTION_LABEL, key=state.W_NEW_SELECTION,
              on_click=uploads.on_new_selection, icon=":material/restart_alt:",
              help="select those of these models that merge together (deselecting the others) "
                   "and a dataset that fits them")
    st.caption("These uploads: " + ", ".join(models[i].label for i in recent))
st.caption(f"Uploads stay in this browser session only (limit {data.MAX_UPLOAD_BYTES // 2**20} MB "
           "per file). Demo files: " + f"`{data.demo_dir()}`.")
