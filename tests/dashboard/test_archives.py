"""TorchScript archives of architectures outside the built-in families, through the dashboard:
the trust gate, replay, every page, merges with CCA and permutation matching, the downloaded
archive; and the Merge points page."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from archive_helpers import ARCHITECTURES, archive_bytes, train
from test_apptest import assert_ok, charts, metrics, select, start, texts, upload, visit
from torch import nn

from ccamerge import api, cli
from ccamerge.errors import CcamergeError
from ccamerge.trace.torchscript import is_torchscript_archive
from dashboard import archives, data, merging, registry, spec_tables, state

SPEC_PAGE = "../pages/spec.py"


@pytest.fixture(scope="module")
def zoo() -> dict[str, list[bytes]]:
    """Two seeds of each architecture, trained briefly on digits, as archive bytes."""
    return {name: [archive_bytes(train(cls, seed)) for seed in (0, 1)]
            for name, cls in ARCHITECTURES.items()}


@pytest.fixture(scope="module")
def digits():
    return data.dataset("digits")


def add(models: dict, selected: list[str], name: str, content: bytes, folder: Path, x, *,
        trust: bool = True) -> registry.ModelEntry:
    """What the upload callback does with one file (trust box ticked unless ``trust=False``)."""
    entry, _ = registry.add_model_upload(models, name, content, folder, trust_code=trust,
                                         example=x[:8])
    return entry


def quiet_step(_index: int, _label: str):
    return lambda _fraction, _message: None


def test_the_trust_box_gates_loading(zoo, digits, tmp_path):
    models: dict = {}
    with pytest.raises(CcamergeError, match="carries code that runs when the model runs"):
        add(models, [], "mlp.pt", zoo["ln_gelu_mlp"][0], tmp_path, digits.x_train, trust=False)
    assert models == {} and list(tmp_path.iterdir()) == []  # nothing loaded, nothing kept
    entry = add(models, [], "mlp.pt", zoo["ln_gelu_mlp"][0], tmp_path, digits.x_train)
    assert entry.arch == archives.ARCH and is_torchscript_archive(entry.path)
    model = entry.model()
    assert not api.is_builtin(model) and archives.is_archive_model(model)
    assert set(model.state_dict()) == set(model.script.state_dict())
    row = registry.table_rows(models, [entry.id], {})[0]
    assert row["arch"] == "torchscript LayerNormGeluMLP"
    assert row["parameters"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_archives_merge_end_to_end_with_cca_and_permute(name, zoo, digits, tmp_path):
    models, selected = {}, []
    for k, blob in enumerate(zoo[name]):
        selected.append(add(models, selected, f"{name}_{k}.pt", blob, tmp_path, digits.x_train).id)
    inputs = registry.inputs(tuple(selected), 0, "digits", models, {})
    bn_reset = data.uses_batchnorm(inputs.models)
    results = merging.run(inputs, ["average", "cca", "permute"], {}, bn_reset=bn_reset,
                          repair=False, stats_samples=None, curve=False, step=quiet_step)
    assert not results["errors"], results["errors"]
    accuracy = {m["method"]: m["accuracy"] for m in results["merges"]}
    assert min(s["accuracy"] for s in results["base"]["models"]) > 90
    assert accuracy["cca"] > 80 and accuracy["permute"] > 80, accuracy
    assert max(accuracy["cca"], accuracy["permute"]) > accuracy["average"], accuracy
    assert results["suffix"] == ".pt"
    for method in ("cca", "permute"):
        extra = {archives.RECIPE_FILE: ""}
        downloaded = torch.jit.load(io.BytesIO(results["files"][method]), _extra_files=extra)
        info = json.loads(extra[archives.RECIPE_FILE])
        assert info["merge"]["method"] == method and info["test_accuracy"] == accuracy[method]
        merged = data.merge(inputs.models, inputs.digests, inputs.data, "digits", method, {},
                            reference=0, bn_reset=bn_reset, stats_samples=None)["model"]
        with torch.no_grad():
            assert torch.allclose(downloaded(digits.x_test), merged(digits.x_test), atol=1e-5)


def test_the_recipe_of_a_merged_archive_replays_with_the_cli(zoo, digits, tmp_path, monkeypatch):
    models, selected = {}, []
    for k, blob in enumerate(zoo["concat_net"]):
        selected.append(add(models, selected, f"concat_{k}.pt", blob, tmp_path, digits.x_train).id)
    inputs = registry.inputs(tuple(selected), 1, "digits", models, {})
    results = merging.run(inputs, ["permute"], {}, bn_reset=False, repair=False,
                          stats_samples=None, curve=False, step=quiet_step)
    recipe = json.loads(results["recipes"]["permute"])
    assert recipe["replay"].endswith("--trust-code") and recipe["reference"] == 1
    mine = tmp_path / "mine"  # the user's own copies, under the names they uploaded
    mine.mkdir()
    for k, blob in enumerate(zoo["concat_net"]):
        (mine / f"concat_{k}.pt").write_bytes(blob)
    monkeypatch.chdir(mine)
    (mine / "recipe.json").write_text(results["recipes"]["permute"])
    out = mine / "replayed.pt"
    args = ["replay", "recipe.json", "--out", str(out), "--quiet", "--json"]
    assert cli.main(args) == 2  # an archive needs --trust-code on the command line too
    assert cli.main([*args, "--trust-code"]) == 0
    replayed = torch.jit.load(str(out)).state_dict()
    downloaded = torch.jit.load(io.BytesIO(results["files"]["permute"])).state_dict()
    assert all(torch.equal(replayed[k], downloaded[k]) for k in downloaded)


def test_mismatched_and_broken_archives_get_a_message_and_change_nothing(zoo, digits, tmp_path):
    models, selected = {}, []
    for k, blob in enumerate(zoo["ln_gelu_mlp"]):
        selected.append(add(models, selected, f"mlp_{k}.pt", blob, tmp_path, digits.x_train).id)
    concat = add(models, selected, "concat.pt", zoo["concat_net"][0], tmp_path, digits.x_train)
    problem = registry.fit_problem(models, selected, concat.id)  # loaded, but it does not fit
    assert problem.startswith("concat.pt does not match mlp_0.pt (") and "vs" in problem
    del models[concat.id]
    Path(concat.path).unlink()
    before = dict(models)

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            if bool(x.sum() > 0):
                return self.fc(x.flatten(1))
            return -self.fc(x.flatten(1))

    with pytest.raises(CcamergeError, match="branchy.pt: ccamerge cannot replay"):
        add(models, [], "branchy.pt", archive_bytes(Branchy()), tmp_path, digits.x_train)
    wide = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(CcamergeError, match=r"rgb.ts does not run on images of shape \[1, 8, 8\]"):
        add(models, [], "rgb.ts", archive_bytes(wide), tmp_path, digits.x_train)
    with pytest.raises(CcamergeError, match="not a TorchScript archive"):
        add(models, [], "notes.ts", b"plain text" * 10, tmp_path, digits.x_train)
    assert models == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(Path(e.path).name
                                                                 for e in before.values())


def test_spec_tables_from_an_explained_archive(zoo, digits, tmp_path):
    entry = add({}, [], "concat.pt", zoo["concat_net"][0], tmp_path, digits.x_train)
    report = data.merge_points(entry.digest, "digits", 64, entry.model(), digits)
    assert report["verified"] and report["matches_hand_written"] is None
    rows = {r["merge point"]: r for r in spec_tables.point_rows(report)}
    assert rows["b2.1"]["consumers"] == "head.2.weight[1] ×16 +256"  # after the concatenation
    assert all(r["verified"] for r in rows.values())
    checks = spec_tables.verification_rows(report)
    assert {r["merge point"] for r in checks} == set(rows) | {"all"}
    assert all(r["result"] == "pass" for r in checks)
    assert spec_tables.unsupported_rows(report) == []


def test_archives_upload_and_work_on_every_page(demo_cache, zoo):
    app = start()
    select(app, [])
    upload(app, "mlp_a.pt", zoo["ln_gelu_mlp"][0])
    assert "carries code that runs" in texts(app.warning)  # refused until the box is ticked
    assert len(app.session_state[state.MODELS]) == 9
    app.checkbox(key=state.W_TRUST_CODE).check().run()
    assert_ok(app)
    assert "mlp_a.pt loaded as 'mlp_a' and selected" in texts(app.success)
    assert upload(app, "mlp_b.pt", zoo["ln_gelu_mlp"][1]) == ""
    selected = app.multiselect(key=state.W_MODELS).value
    assert len(selected) == 2
    table = app.dataframe[0].value
    archived = table[table["source"] == "upload"]
    assert list(archived["arch"]) == ["torchscript LayerNormGeluMLP"] * 2
    assert (archived["accuracy (%)"] > 90).all()
    for page, n_charts in (("spectra", 4), ("features", 5), ("interpolation", 1)):
        visit(app, page)
        assert not app.error, texts(app.error)
        assert len(charts(app)) == n_charts
    visit(app, "merge")
    app.multiselect(key=state.W_MERGE_METHODS).set_value(["cca", "permute"]).run()
    app.button(key=state.W_MERGE_RUN).click().run()
    assert_ok(app)
    results = app.session_state[state.MERGE_RESULTS]
    assert not results["errors"] and results["suffix"] == ".pt"
    assert "TorchScript archive" in app.get("download_button")[0].proto.label
    app.switch_page(SPEC_PAGE).run()
    assert_ok(app)
    assert metrics(app)["verification"] == "passed" and metrics(app)["merge points"] == "2"
    assert "--trust-code" in texts(app.caption)


def test_the_merge_points_page_on_the_demo(demo_cache):
    app = start()
    app.switch_page(SPEC_PAGE).run()
    assert_ok(app)
    assert not app.error, texts(app.error)
    assert metrics(app)["verification"] == "passed"
    assert metrics(app)["merge points"] == "2"  # the demo MLP's two hidden layers
    assert "hand-written spec" in texts(app.success)
    verification, points = app.dataframe[0].value, app.dataframe[1].value
    assert len(verification) == 3 and verification["merge point"].iloc[-1] == "all"
    assert (verification["result"] == "pass").all()
    assert list(points["hand-written name"]) == ["fc1", "fc2"]  # the names the other pages use
    assert texts(app.caption).count("What am I looking at?") >= 3
    assert len(app.get("graphviz_chart")) == 1
    vggs = [i for i, e in app.session_state[state.MODELS].items() if e.filename.startswith("vgg")]
    select(app, vggs[:2])
    assert_ok(app)
    assert metrics(app)["verification"] == "passed"
    assert "hand-written spec" in texts(app.success)
