"""Uploads in the dashboard (AppTest): a model or dataset that does not fit the selection loads
but stays unselected, "start a new selection from these uploads", messages that name files by
the names the user gave them, image folders as .zip, tabular and non-square .npz through every
computing page, portable recipes of .pt uploads, and the device in the sidebar."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch
from apptest_helpers import assert_ok, opened, texts, visit
from PIL import Image
from streamlit.testing.v1 import AppTest
from uploads_helpers import pt_bytes, random_model, safetensors_bytes

from ccamerge import cli
from ccamerge.data import load_dataset
from ccamerge.files import sha256_file
from ccamerge.io import load_model, load_model_bytes, save_model
from ccamerge.train import default_config, train_model
from dashboard import state, uploads


@pytest.fixture
def app(demo_cache):
    at = opened(180)
    return at


def upload_models(at: AppTest, files: dict[str, bytes]) -> None:
    uploader = at.file_uploader(key=state.W_MODEL_UPLOAD)
    for name, content in files.items():
        uploader.upload(name, content)
    at.run()
    assert_ok(at)


def upload_dataset(at: AppTest, name: str, content: bytes) -> None:
    at.file_uploader(key=state.W_DATA_UPLOAD).upload(name, content).run()
    assert_ok(at)


def selected(at: AppTest) -> list[str]:
    return list(at.multiselect(key=state.W_MODELS).value)


def names(at: AppTest, ids: list[str]) -> list[str]:
    return [at.session_state[state.MODELS][i].filename for i in ids]


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def classified(shape: tuple[int, ...], n: int, classes: int, seed: int) -> dict:
    """Learnable synthetic data: class ``k`` samples are noise around their own mean pattern."""
    centres = np.random.default_rng(100).normal(size=(classes, *shape))  # shared by both splits
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    return {"x": (centres[y] + 0.5 * rng.normal(size=(n, *shape))).astype(np.float32), "y": y}


def dataset_npz(shape: tuple[int, ...], classes: int = 3) -> bytes:
    train, test = classified(shape, 240, classes, 0), classified(shape, 60, classes, 1)
    return npz_bytes(x_train=train["x"], y_train=train["y"], x_test=test["x"], y_test=test["y"])


def trained_files(arch: str, npz: bytes, tmp_path, prefix: str, **overrides) -> dict[str, bytes]:
    """Two seeds of ``arch`` trained briefly on the (tiny) dataset in ``npz``, as files."""
    path = tmp_path / f"{prefix}.npz"
    path.write_bytes(npz)
    dataset = load_dataset(str(path))
    config = default_config(arch, dataset) | overrides
    files = {}
    for seed in (0, 1):
        model = train_model(arch, config, dataset, seed=seed, epochs=10)
        files[f"{prefix}_{seed}.safetensors"] = save_model(
            model, tmp_path / f"{prefix}_{seed}.safetensors").read_bytes()
    return files


def test_a_model_that_does_not_fit_loads_unselected_and_a_new_selection_starts_from_it(
        app, tmp_path):
    demo = selected(app)
    wide = [safetensors_bytes(random_model("mlp", s, width=2.0), tmp_path, f"w{s}.safetensors")
            for s in (0, 1)]
    vgg = safetensors_bytes(random_model("vgg", 0), tmp_path, "v.safetensors")
    upload_models(app, {"wide_a.safetensors": wide[0], "wide_b.safetensors": wide[1],
                        "other.safetensors": vgg})
    assert selected(app) == demo  # nothing that breaks the selection is selected
    assert len(app.session_state[state.MODELS]) == 12  # ... but every file is loaded
    warnings = texts(app.warning)
    assert "wide_a.safetensors loaded as 'wide_a' but not selected: wide_a.safetensors does not " \
           "match mlp seed 0 (width 2.0 vs 1.0)" in warnings
    assert "other.safetensors does not match mlp seed 0 (architecture vgg vs mlp)" in warnings
    assert "{" not in warnings and "model 0" not in warnings  # no raw configs, no indices
    visit(app, "spectra")
    assert not app.error, texts(app.error)

    visit(app, "models")
    app.button(key=state.W_NEW_SELECTION).click().run()
    assert_ok(app)
    assert names(app, selected(app)) == ["wide_a.safetensors", "wide_b.safetensors"]
    assert app.selectbox(key=state.W_REFERENCE).value == selected(app)[0]
    assert "not selected, they do not merge with wide_a.safetensors: other.safetensors" in \
        texts(app.warning)
    visit(app, "spectra")
    assert not app.error, texts(app.error)

    # a file already loaded is not selected again when it breaks the new selection
    app.multiselect(key=state.W_MODELS).set_value(selected(app)).run()
    visit(app, "models")
    upload_models(app, {"again.safetensors": vgg})
    assert names(app, selected(app)) == ["wide_a.safetensors", "wide_b.safetensors"]
    assert "again.safetensors was already loaded as 'other' but not selected" in texts(app.warning)


def test_a_mismatched_selection_is_explained_once_by_file_name(app, tmp_path):
    upload_models(app, {"deep.safetensors": safetensors_bytes(
        random_model("mlp", 0, hidden=[32, 32, 32]), tmp_path, "d.safetensors")})
    deep = next(i for i, e in app.session_state[state.MODELS].items() if e.name == "deep")
    app.multiselect(key=state.W_MODELS).set_value([*selected(app), deep]).run()
    visit(app, "merge")
    shown = [str(e.value) for e in app.error]
    assert sum("hidden" in e and "deep.safetensors" in e for e in shown) == 1, shown  # once
    assert any("the selected models do not merge together" in e for e in shown)


def test_a_dataset_that_does_not_fit_is_loaded_but_never_selected(app):
    before = app.selectbox(key=state.W_DATASET).value
    upload_dataset(app, "five.npz", dataset_npz((5, 5), classes=10))
    assert app.selectbox(key=state.W_DATASET).value == before
    lines = [str(w.value) for w in app.warning if "five.npz" in str(w.value)]
    assert len(lines) == 1 and "loaded but not selected" in lines[0]
    assert lines[0].startswith("dataset five.npz loaded but not selected: mlp seed 0 does not "
                               "fit it: the models expect inputs of shape [1, 8, 8] but the data "
                               "has [1, 5, 5]")
    key = next(iter(app.session_state[state.DATASETS]))
    assert key[4:] not in lines[0]  # the session file's name never shows
    for page in ("spectra", "interpolation", "merge"):
        visit(app, page)
        assert not app.error, (page, texts(app.error))


def image_zip(tmp_path, *, side: int = 8, classes: int = 10, per_class: int = 6,
              top: str = "") -> bytes:
    """A zip of grey ``side`` x ``side`` PNGs, one folder per class (inside ``top``/ if given)."""
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(buffer, "w") as archive:
        for k in range(classes):
            for j in range(per_class):
                pixels = rng.integers(0, 256, (side, side), dtype=np.uint8)
                png = io.BytesIO()
                Image.fromarray(pixels, mode="L").save(png, format="PNG")
                archive.writestr(f"{top}class_{k}/{j}.png", png.getvalue())
        archive.writestr(f"{top}notes.txt", "not an image")
    return buffer.getvalue()


def test_an_image_folder_zip_loads_is_selected_when_it_fits_and_merges(app, tmp_path):
    upload_dataset(app, "pictures.zip", image_zip(tmp_path, top="pictures/"))
    key = app.selectbox(key=state.W_DATASET).value
    assert key.startswith("zip:") and "pictures.zip loaded and selected" in texts(app.success)
    entry = app.session_state[state.DATASETS][key]
    assert entry.recipe_name == "pictures" and entry.prepare == "unzip pictures.zip"
    visit(app, "spectra")
    assert not app.error, texts(app.error)
    recipe = run_merge(app, ["permute"])
    assert recipe["data"]["name"] == "pictures" and recipe["data"]["file"] == "pictures.zip"
    assert recipe["replay"].startswith("unzip pictures.zip && ccamerge replay recipe_permute.json")


def test_a_hostile_zip_is_refused_and_leaves_nothing(app):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("cls/a.png", b"x")
        archive.writestr("../../escape.png", b"x")
    session = app.session_state[state.SESSION_DIR].path
    upload_dataset(app, "evil.zip", buffer.getvalue())
    assert "evil.zip has an entry outside its folder" in texts(app.error)
    assert list(session.iterdir()) == [] and not (session.parent / "escape.png").exists()


def run_merge(at: AppTest, methods: list[str]) -> dict:
    """Merge on the Merge page; returns the first method's recipe."""
    visit(at, "merge")
    at.multiselect(key=state.W_MERGE_METHODS).set_value(methods).run()
    at.button(key=state.W_MERGE_RUN).click().run()
    assert_ok(at)
    results = at.session_state[state.MERGE_RESULTS]
    assert not results["errors"], results["errors"]
    return json.loads(results["recipes"][methods[0]])


@pytest.mark.parametrize(("kind", "shape", "arch", "overrides"), [
    ("tabular", (12,), "mlp", {"hidden": [16, 16]}),
    ("non-square images", (1, 6, 10), "vgg", {"cfg": [8, "M", 16, "M"]}),
])
def test_tabular_and_non_square_npz_work_on_every_computing_page(app, tmp_path, kind, shape, arch,
                                                                 overrides):
    npz = dataset_npz(shape if len(shape) == 1 else shape[1:])  # [N, H, W] for the images
    files = trained_files(arch, npz, tmp_path, "m", **overrides)
    upload_models(app, files)
    app.button(key=state.W_NEW_SELECTION).click().run()
    assert names(app, selected(app)) == list(files)
    upload_dataset(app, f"{kind}.npz", npz)
    assert f"dataset {kind}.npz loaded and selected" in texts(app.success)
    table = app.dataframe[0].value
    assert (table[table["source"] == "upload"]["accuracy (%)"] > 60).all()  # evaluated
    for page, charts in (("spectra", 2), ("interpolation", 1)):
        visit(app, page)
        assert not app.error, (page, texts(app.error))
        assert len(app.get("plotly_chart")) >= charts
    recipe = run_merge(app, ["cca", "permute"])
    assert recipe["data"]["name"] == f"{kind}.npz"


def test_pt_uploads_replay_from_their_own_files_in_another_folder(app, tmp_path):
    state_dicts = {f"net_{s}.pt": random_model("mlp", s, hidden=[24, 24]).state_dict()
                   for s in (0, 1)}
    app.selectbox(key=state.W_PT_ARCH).set_value("mlp").run()
    config = json.loads(app.text_area(key=uploads.config_key("mlp")).value) | {"hidden": [24, 24]}
    app.text_area(key=uploads.config_key("mlp")).set_value(json.dumps(config)).run()
    upload_models(app, {name: pt_bytes(sd) for name, sd in state_dicts.items()})
    app.button(key=state.W_NEW_SELECTION).click().run()
    assert names(app, selected(app)) == list(state_dicts)
    recipe = run_merge(app, ["cca"])
    results = app.session_state[state.MERGE_RESULTS]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name, sd in state_dicts.items():
        (elsewhere / name).write_bytes(pt_bytes(sd))
    assert recipe["models"] == recipe["model_files"] == list(state_dicts)
    assert recipe["model_sha256"] == [sha256_file(elsewhere / n) for n in state_dicts]
    assert recipe["model_architectures"][0]["config"]["hidden"] == [24, 24]
    assert recipe["replay"] == ("ccamerge replay recipe_cca.json --models net_0.pt net_1.pt "
                                "--out merged_cca.safetensors")
    (elsewhere / "recipe_cca.json").write_text(results["recipes"]["cca"])
    downloaded = load_model_bytes(results["files"]["cca"], "merged.safetensors").state_dict()
    replayed = _replay(elsewhere, recipe["replay"])
    assert all(torch.equal(t, replayed[k]) for k, t in downloaded.items())
    (elsewhere / "net_1.pt").write_bytes(
        pt_bytes(random_model("mlp", 5, hidden=[24, 24]).state_dict()))
    with pytest.raises(AssertionError):
        _replay(elsewhere, recipe["replay"])  # a changed file is named, not merged


def _replay(folder, command: str) -> dict:
    """Run the dashboard's replay command with the CLI in ``folder``; the replayed state dict."""
    import os

    args = command.split()[1:]
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert cli.main([*args, "--quiet"]) == 0
        return load_model(folder / args[args.index("--out") + 1]).state_dict()
    finally:
        os.chdir(cwd)


def test_an_uploaded_npz_is_named_and_verified_by_its_sha256(app, tmp_path):
    npz = dataset_npz((8, 8), classes=10)
    upload_dataset(app, "mine.npz", npz)
    recipe = run_merge(app, ["average"])
    assert recipe["data"]["name"] == "mine.npz" and recipe["data"]["file"] == "mine.npz"
    folder = tmp_path / "replay"
    folder.mkdir()
    (folder / "mine.npz").write_bytes(npz)
    assert recipe["data"]["sha256"] == sha256_file(folder / "mine.npz")
    (folder / "recipe_average.json").write_text(json.dumps(recipe))
    _replay(folder, recipe["replay"])
    (folder / "mine.npz").write_bytes(dataset_npz((8, 8), classes=10)[:-1] + b"\x01")
    with pytest.raises(AssertionError):
        _replay(folder, recipe["replay"])


def test_the_sidebar_says_where_it_computes(app):
    shown = texts(app.sidebar.caption)
    assert "Computing on **cpu**" in shown or "Computing on **cuda" in shown


def test_regenerate_commands_name_the_users_files_not_the_session_folder(app, tmp_path):
    files = {f"my_net_{s}.safetensors": safetensors_bytes(random_model("mlp", s, width=2.0),
                                                        tmp_path, f"n{s}.safetensors")
             for s in (0, 1)}
    upload_models(app, files)
    app.button(key=state.W_NEW_SELECTION).click().run()
    assert_ok(app)
    session = str(app.session_state[state.SESSION_DIR].path)
    for page in ("spectra", "interpolation", "diagnose"):
        visit(app, page)
        captions = texts(app.caption)
        regenerate = [c for c in captions.split(" | ") if c.startswith("Regenerate")]
        assert regenerate, f"{page}: no Regenerate command"
        assert all("my_net_0.safetensors" in c and "my_net_1.safetensors" in c
                   for c in regenerate), (page, regenerate)
        assert session not in " ".join(regenerate), (page, regenerate)
