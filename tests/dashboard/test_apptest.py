"""Every page of the dashboard on the demo, through Streamlit's AppTest (no browser)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from apptest_helpers import assert_ok, opened
from streamlit.testing.v1 import AppTest
from uploads_helpers import hostile_pt_bytes, pt_bytes, random_model, safetensors_bytes

from ccamerge import cli
from ccamerge.io import load_model, load_model_bytes
from ccamerge.methods import METHODS
from dashboard import state, widgets

PAGES = {name: f"../pages/{name}.py"
         for name in ("models", "spectra", "features", "interpolation", "merge")}


def start() -> AppTest:
    return opened(180)


def visit(at: AppTest, page: str) -> AppTest:
    at.switch_page(PAGES[page]).run()
    assert_ok(at)
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def charts(at: AppTest) -> list:
    return list(at.get("plotly_chart"))


def texts(elements) -> str:
    return " | ".join(str(e.value) for e in elements)


def select(at: AppTest, ids: list[str], reference: str | None = None) -> None:
    at.multiselect(key=state.W_MODELS).set_value(ids).run()
    if reference is not None:
        at.selectbox(key=state.W_REFERENCE).set_value(reference).run()
    assert_ok(at)


def ids_of(at: AppTest, prefix: str) -> list[str]:
    """Ids of the loaded models whose file name starts with ``prefix``."""
    return [i for i, e in at.session_state[state.MODELS].items() if e.filename.startswith(prefix)]


@pytest.fixture
def app(demo_cache):
    return start()


def test_opens_on_the_demo_with_a_default_selection(app):
    models = app.session_state[state.MODELS]
    assert len(models) == 9
    selected = app.multiselect(key=state.W_MODELS).value
    assert len(selected) >= 2
    assert {models[i].filename.split("_")[0] for i in selected} == {"mlp"}
    assert app.selectbox(key=state.W_REFERENCE).value == selected[0]
    assert app.selectbox(key=state.W_DATASET).value == "digits"
    table = app.dataframe[0].value
    assert len(table) == 9 and {"arch", "parameters", "accuracy (%)"} <= set(table.columns)
    assert (table["accuracy (%)"] > 85).all()
    assert metrics(app)["classes"] == "10"


@pytest.mark.parametrize("page, n_charts", [("spectra", 4), ("features", 5), ("interpolation", 1),
                                            ("merge", 0)])
def test_every_page_renders_with_charts_and_explanations(app, page, n_charts):
    visit(app, page)
    assert len(charts(app)) == n_charts
    notes = texts(app.caption)
    assert notes.count("What am I looking at?") >= n_charts
    assert not app.error, texts(app.error)


def test_selection_stays_set_on_every_page(app):
    mlps = ids_of(app, "mlp_w1_same")
    select(app, mlps[1:3], reference=mlps[2])
    for page in PAGES:
        visit(app, page)
        assert app.multiselect(key=state.W_MODELS).value == mlps[1:3]
        assert app.selectbox(key=state.W_REFERENCE).value == mlps[2]


def test_spectra_numbers_react_to_gamma_and_the_model(app):
    visit(app, "spectra")
    pairwise = [m for m in app.metric if not m.label.startswith("shared correlation")]
    assert {m.label for m in pairwise} == {"correlation reached, fc1", "correlation reached, fc2"}
    assert all(0.0 < float(m.value) <= 1.0 for m in pairwise)
    shrunk = {m.label: float(m.delta.split("shrunk s.v. ")[1]) for m in pairwise}
    app.select_slider(key=state.W_SPEC_GAMMA).set_value(0.001).run()
    assert_ok(app)
    after = {m.label: float(m.delta.split("shrunk s.v. ")[1]) for m in app.metric
             if m.label.startswith("correlation reached")}
    assert after["correlation reached, fc1"] > shrunk["correlation reached, fc1"] + 0.1
    app.toggle(key=state.W_SPEC_RELATIVE).set_value(False).run()
    assert_ok(app)
    assert len(app.dataframe[0].value) == 2 * 3  # 2 merge points x 3 non-reference models
    other = app.session_state[state.SELECTION].others[0]
    app.selectbox(key=state.W_SPEC_MODEL).set_value(other).run()
    assert_ok(app)
    assert len(app.dataframe[0].value) == 2


def test_spectra_warns_about_dead_units(app):
    visit(app, "spectra")
    assert "Dead units" in texts(app.warning) or "No warnings" in texts(app.success)


def test_features_react_to_point_gamma_and_order(app):
    visit(app, "features")
    first = metrics(app)
    assert {"mean top-1 share", "mean participation ratio", "median k90",
            "argmax agrees with matching"} <= set(first)
    app.selectbox(key=state.W_FEAT_POINT).set_value("fc2").run()
    assert_ok(app)
    assert metrics(app)["mean matched corr."] != first["mean matched corr."]
    app.select_slider(key=state.W_FEAT_GAMMA).set_value(1.0).run()
    app.toggle(key=state.W_FEAT_ORDER).set_value(False).run()
    assert_ok(app)
    assert len(charts(app)) == 5


def test_features_on_a_wide_layer_aggregate_and_zoom(app, tmp_path):
    wide = [random_model("mlp", seed, hidden=[300]) for seed in (1, 2)]
    select(app, [])
    for k, model in enumerate(wide):
        app.file_uploader(key=state.W_MODEL_UPLOAD).upload(
            f"wide{k}.safetensors", safetensors_bytes(model, tmp_path, f"wide{k}.safetensors"))
    app.run()
    assert_ok(app)
    assert len(app.multiselect(key=state.W_MODELS).value) == 2
    visit(app, "features")
    heatmap = charts(app)[0].proto.spec
    assert '"z"' in heatmap
    app.radio(key=state.W_FEAT_VIEW).set_value("zoom").run()
    app.slider(key=state.W_FEAT_START).set_value(100).run()
    assert_ok(app)
    assert len(charts(app)) == 5


def test_interpolation_offers_pairwise_methods_and_shows_barriers(app):
    visit(app, "interpolation")
    offered = app.multiselect(key=state.W_INTERP_METHODS).options
    assert "zipit" not in offered and "cca" in offered
    barriers = {k: float(v) for k, v in metrics(app).items() if k.startswith("barrier")}
    assert len(barriers) == len(widgets.INTERPOLATION_DEFAULTS) < len(offered)
    assert barriers["barrier: cca"] < barriers["barrier: average"]
    assert "zipit" in texts(app.caption)
    app.multiselect(key=state.W_INTERP_METHODS).set_value(["average", "permute"]).run()
    app.slider(key=state.W_INTERP_STEPS).set_value(5).run()
    assert_ok(app)
    assert {k for k in metrics(app) if k.startswith("barrier")} == {"barrier: average",
                                                                      "barrier: permute"}
    assert app.toggle(key=state.W_INTERP_BN).disabled  # the demo MLPs have no BatchNorm


def run_merge(at: AppTest, methods: list[str]) -> dict:
    visit(at, "merge")
    at.multiselect(key=state.W_MERGE_METHODS).set_value(methods).run()
    at.button(key=state.W_MERGE_RUN).click().run()
    assert_ok(at)
    return at.session_state[state.MERGE_RESULTS]


def test_merge_every_registered_method_and_replay_its_recipe(app, tmp_path):
    mlps = ids_of(app, "mlp_w1_same")
    select(app, mlps[:2])
    results = run_merge(app, list(METHODS))
    assert not results["errors"], results["errors"]
    assert [m["method"] for m in results["merges"]] == list(METHODS)
    assert len(charts(app)) == 1  # N = 2 only: no accuracy-vs-N chart
    table = app.dataframe[0].value
    assert list(table["kind"]).count("merge") == len(METHODS)
    assert {"best base model", "ensemble"} <= set(metrics(app))
    assert len(app.get("download_button")) == 2
    by_method = {m["method"]: m for m in results["merges"]}
    assert by_method["cca"]["accuracy"] > by_method["average"]["accuracy"]
    for method in METHODS:
        downloaded = load_model_bytes(results["files"][method], "merged.safetensors")
        recipe = tmp_path / f"{method}.json"
        recipe.write_text(results["recipes"][method])
        out = tmp_path / f"{method}.safetensors"
        assert cli.main(["replay", str(recipe), "--out", str(out), "--quiet", "--json"]) == 0
        replayed = load_model(out)
        for key, tensor in downloaded.state_dict().items():
            assert torch.equal(tensor, replayed.state_dict()[key]), (method, key)


def test_merges_are_ranked_on_held_out_training_images_not_the_test_set(app):
    results = run_merge(app, ["average", "permute", "cca"])
    held = {m["method"]: m["held_out_accuracy"] for m in results["merges"]}
    assert all(v is not None for v in held.values())
    assert "held-out 20% of the training set" in results["held_out_on"]
    best = max(held, key=held.get)
    label = next(m.label for m in app.metric if m.label.startswith("best merge"))
    assert label == f"best merge on held-out training images: {best}"
    picker = app.selectbox(key=state.W_MERGE_DOWNLOAD_METHOD)
    assert picker.options == [charts_label(m, results) for m in sorted(held, key=held.get,
                                                                        reverse=True)]
    assert "held-out accuracy (%)" in app.dataframe[0].value
    dead = [w.value for w in app.warning if str(w.value).startswith("Dead units")]
    assert len(dead) <= 1  # the per-point notes of every method, grouped


def charts_label(method: str, results: dict) -> str:
    from dashboard import charts as dashboard_charts

    merge = next(m for m in results["merges"] if m["method"] == method)
    return dashboard_charts.merge_label(merge)


def test_merge_options_progress_and_accuracy_vs_n(app):
    results = run_merge(app, ["average", "cca"])
    assert {p["n"] for p in results["curve"]} == {2, 3, 4}
    assert {p["method"] for p in results["curve"]} == {"average", "cca", "ensemble"}
    assert len(charts(app)) == 2
    app.number_input(key=state.option_key("merge", "cca", "gamma")).set_value(0.5).run()
    assert "earlier settings" in texts(app.info)
    app.button(key=state.W_MERGE_RUN).click().run()
    assert_ok(app)
    recipe = json.loads(app.session_state[state.MERGE_RESULTS]["recipes"]["cca"])
    assert recipe["options"]["gamma"] == 0.5 and recipe["reference"] == 0
    assert all(Path(p).is_file() for p in recipe["models"])


def test_merge_results_survive_page_switches(app):
    results = run_merge(app, ["permute"])
    visit(app, "spectra")
    visit(app, "merge")
    assert app.session_state[state.MERGE_RESULTS] is results
    assert len(charts(app)) == 2


def upload(at: AppTest, name: str, content: bytes) -> str:
    at.file_uploader(key=state.W_MODEL_UPLOAD).upload(name, content).run()
    assert_ok(at)
    return texts(at.error)


def test_uploads_of_good_models_are_added_and_selected(app, tmp_path):
    before = list(app.multiselect(key=state.W_MODELS).value)
    mlp = random_model("mlp", 5)
    upload(app, "fresh.safetensors", safetensors_bytes(mlp, tmp_path))
    assert "fresh.safetensors loaded" in texts(app.success)
    app.selectbox(key=state.W_PT_ARCH).set_value("mlp").run()
    upload(app, "weights.pt", pt_bytes(random_model("mlp", 6).state_dict()))
    assert "weights.pt loaded" in texts(app.success)
    selected = app.multiselect(key=state.W_MODELS).value
    assert selected[: len(before)] == before and len(selected) == len(before) + 2
    entry = app.session_state[state.MODELS][selected[-1]]
    assert Path(entry.path).is_file() and entry.path.endswith(".safetensors")  # replayable
    visit(app, "spectra")
    assert len(charts(app)) == 4  # the pairwise spectrum and mean rho, the shared space and
                                  # each model's consensus


def test_bad_uploads_get_an_inline_message_and_change_nothing(app, tmp_path):
    models_before = dict(app.session_state[state.MODELS])
    selected_before = list(app.multiselect(key=state.W_MODELS).value)
    cases = {
        "corrupt.safetensors": (b"\x00garbage" * 100, "not a valid safetensors"),
        "wrong_width.pt": (pt_bytes(random_model("mlp", hidden=[32, 32]).state_dict()), "shape"),
        "not_a_dict.pt": (pt_bytes([torch.zeros(3)]), "does not hold a state dict"),
    }
    for name, (content, expected) in cases.items():
        errors = upload(app, name, content)
        assert name.split(".")[0] in errors and expected in errors, (name, errors)
        assert app.session_state[state.MODELS] == models_before
        assert app.multiselect(key=state.W_MODELS).value == selected_before
    visit(app, "merge")
    assert not app.error


def test_a_hostile_pickle_is_refused_and_never_runs(app, tmp_path):
    marker = tmp_path / "pwned"
    errors = upload(app, "hostile.pt", hostile_pt_bytes(marker))
    assert "refused to unpickle hostile.pt" in errors
    assert not marker.exists()
    assert len(app.session_state[state.MODELS]) == 9


def test_too_large_and_unknown_uploads_are_refused(tmp_path):
    from ccamerge.errors import CcamergeError
    from dashboard import registry

    models: dict = {}
    with pytest.raises(CcamergeError, match="over the 0 MB upload limit"):
        registry.add_model_upload(models, "big.safetensors", b"x" * 1000, tmp_path,
                                  max_bytes=100)
    with pytest.raises(CcamergeError, match="expected a .safetensors"):
        registry.add_model_upload(models, "notes.txt", b"hello", tmp_path)
    assert models == {}


def test_dataset_uploads(app, tmp_path):
    rng = np.random.default_rng(0)
    good = tmp_path / "tiny.npz"
    np.savez(good, x_train=rng.random((200, 8, 8)), y_train=np.arange(200) % 10,
             x_test=rng.random((50, 8, 8)), y_test=np.arange(50) % 10)
    app.file_uploader(key=state.W_DATA_UPLOAD).upload("tiny.npz", good.read_bytes()).run()
    assert_ok(app)
    assert app.selectbox(key=state.W_DATASET).value.startswith("npz:")
    visit(app, "spectra")
    assert len(charts(app)) == 4
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=rng.random((20, 8, 8)))
    visit(app, "models")
    app.file_uploader(key=state.W_DATA_UPLOAD).upload("bad.npz", bad.read_bytes()).run()
    assert "lacks" in texts(app.error)
    three = tmp_path / "three.npz"
    np.savez(three, x_train=rng.random((60, 8, 8)), y_train=np.arange(60) % 3,
             x_test=rng.random((30, 8, 8)), y_test=np.arange(30) % 3)
    selected = app.selectbox(key=state.W_DATASET).value
    app.file_uploader(key=state.W_DATA_UPLOAD).upload("three.npz", three.read_bytes()).run()
    assert "dataset three.npz loaded but not selected" in texts(app.warning)
    assert app.selectbox(key=state.W_DATASET).value == selected  # a misfit is never selected
    app.selectbox(key=state.W_DATASET).set_value(app.selectbox(key=state.W_DATASET).options[-1]).run()
    visit(app, "merge")
    assert "does not fit dataset three.npz" in texts(app.error)  # chosen by hand: said, not raised


def test_two_sessions_never_see_each_others_uploads_or_results(demo_cache, tmp_path):
    first, second = start(), start()
    upload(first, "private.safetensors", safetensors_bytes(random_model("mlp", 9), tmp_path))
    run_merge(first, ["average"])
    private = [e for e in first.session_state[state.MODELS].values() if e.kind == "upload"]
    assert len(private) == 1
    second.run()
    assert private[0].id not in second.session_state[state.MODELS]
    assert private[0].id not in second.multiselect(key=state.W_MODELS).options
    assert state.MERGE_RESULTS not in second.session_state
    assert (first.session_state[state.SESSION_DIR].path
            != second.session_state[state.SESSION_DIR].path)


def test_batchnorm_reset_toggles_on_batchnorm_nets(app):
    vggs = ids_of(app, "vgg_w1_same")
    select(app, vggs[:2])
    visit(app, "interpolation")
    app.multiselect(key=state.W_INTERP_METHODS).set_value(["permute"]).run()
    assert not app.toggle(key=state.W_INTERP_BN).disabled
    with_reset = float(metrics(app)["barrier: permute"])
    app.toggle(key=state.W_INTERP_BN).set_value(False).run()
    assert_ok(app)
    assert float(metrics(app)["barrier: permute"]) > with_reset
    results = run_merge(app, ["permute"])
    assert json.loads(results["recipes"]["permute"])["bn_reset"] is True
    assert app.toggle(key=state.W_MERGE_REPAIR).disabled  # REPAIR is for nets without BatchNorm


def test_the_batchnorm_policy_and_stream_options_reach_the_recipe(app):
    select(app, ids_of(app, "vgg_w1_same")[:2])
    visit(app, "merge")
    app.selectbox(key=state.W_MERGE_BN_POLICY).set_value("paper").run()
    app.toggle(key=state.W_MERGE_RESET_BASE).set_value(True).run()
    app.selectbox(key=state.W_MERGE_STREAM).set_value("last").run()
    recipe = json.loads(run_merge(app, ["permute"])["recipes"]["permute"])
    assert (recipe["bn_policy"], recipe["reset_base_bn"], recipe["stream_points"]) == (
        "paper", True, "last")


def test_reference_follows_a_changed_selection(app):
    vggs = ids_of(app, "vgg_w1_same")
    select(app, [])
    assert app.session_state[state.SELECTION].ids == ()
    visit(app, "spectra")
    assert "select at least 2 models" in texts(app.error)
    select(app, vggs)
    assert app.selectbox(key=state.W_REFERENCE).value == vggs[0]
    visit(app, "interpolation")
    assert app.selectbox(key=state.W_INTERP_A).value == vggs[0]
    assert app.selectbox(key=state.W_INTERP_B).value == vggs[1]


def test_a_dataset_that_does_not_fit_the_models_is_explained(app):
    from ccamerge.data import available_datasets

    if "fashion-mnist" not in available_datasets():
        pytest.skip("Fashion-MNIST is not installed")
    app.selectbox(key=state.W_DATASET).set_value("fashion-mnist").run()
    assert_ok(app)
    assert app.dataframe[0].value["accuracy (%)"].isna().all()  # 28x28 images, 8x8 models
    for page in ("spectra", "features", "interpolation", "merge"):
        visit(app, page)
        assert "pick the dataset the models were trained on" in texts(app.error)
