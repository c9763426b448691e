import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ccamerge import api, cli
from ccamerge.cli import main
from ccamerge.data import load_dataset
from ccamerge.errors import CcamergeError
from ccamerge.evaluate import evaluate_model
from ccamerge.io import RECIPE_FILE, archive_info, load_archive_model, load_model
from ccamerge.methods import METHODS, Alignment, Method, Option
from ccamerge.methods.base import identity_transforms


def run(capsys, *argv):
    code = main([*argv, "--json", "--quiet"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def run_error(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code != 0
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    assert main(["train", "--arch", "mlp", "--seeds", "0", "1", "--epochs", "3", "--out", str(out),
                 "--json", "--quiet"]) == 0
    return sorted(str(p) for p in out.glob("*.safetensors"))


def test_train_writes_loadable_files_and_reports_accuracy(tmp_path, capsys):
    code, result, _ = run(capsys, "train", "--arch", "vgg", "--seeds", "3", "--epochs", "1",
                          "--width", "0.5", "--split", "skewed", "--out", str(tmp_path))
    assert code == 0
    (row,) = result["models"]
    assert row["seed"] == 3 and 0 <= row["accuracy"] <= 100
    model = load_model(row["path"])
    assert model.info["split"]["kind"] == "skewed"


def test_evaluate_with_ensemble(zoo, capsys):
    code, result, _ = run(capsys, "evaluate", *zoo, "--ensemble")
    assert code == 0
    assert [m["path"] for m in result["models"]] == zoo
    assert set(result["ensemble"]) == {"accuracy", "loss"}
    assert all(m["accuracy"] > 50 for m in result["models"])


@pytest.mark.parametrize("method", ["cca", "permute", "zipit"])
def test_merge_writes_a_model_that_loads(zoo, tmp_path, capsys, method):
    out = tmp_path / "merged.safetensors"
    code, result, _ = run(capsys, "merge", *zoo, "--method", method, "--out", str(out))
    assert code == 0
    assert result["method"] == method and result["out"] == str(out)
    merged = load_model(out)
    recipe = merged.info["merge"]
    assert recipe["method"] == method and recipe["options"] == result["options"]
    assert recipe["models"] == [str(Path(p).resolve()) for p in zoo]
    assert recipe["data"]["name"] == "digits" and recipe["weights"] == [0.5, 0.5]
    assert merged.info["test_accuracy"] == pytest.approx(result["accuracy"])
    wanted = api.merge([load_model(p) for p in zoo], load_dataset("digits"), method)
    assert wanted.recipe == recipe  # the CLI saves the API's recipe, nothing patched in
    assert all(torch.equal(t, merged.state_dict()[k]) for k, t in wanted.model.state_dict().items())


def test_merge_with_bfloat16_products_records_them_and_replays(zoo, tmp_path, capsys):
    out, again = tmp_path / "low.safetensors", tmp_path / "again.safetensors"
    code, result, _ = run(capsys, "merge", *zoo, "--products", "bfloat16", "--out", str(out))
    assert code == 0 and result["products"] == "bfloat16"
    recipe = load_model(out).info["merge"]
    assert recipe["products"] == "bfloat16"
    exact = api.merge([load_model(p) for p in zoo], load_dataset("digits"), "cca")
    assert exact.recipe["products"] == "float32"
    digits = load_dataset("digits")
    exact_accuracy = evaluate_model(exact.model, digits.x_test, digits.y_test)["accuracy"]
    assert abs(result["accuracy"] - exact_accuracy) < 2.0
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    code, replayed, _ = run(capsys, "replay", str(tmp_path / "recipe.json"), "--out", str(again))
    assert code == 0 and replayed["products"] == "bfloat16"
    a, b = load_model(out).state_dict(), load_model(again).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    err = run_error(capsys, "interpolate", *zoo, "--products", "bfloat16")
    assert "--products bfloat16 is available for merge, not interpolate" in err


def test_replay_reproduces_the_same_weights(zoo, tmp_path, capsys):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run(capsys, "merge", *zoo, "--method", "cca", "--gamma", "0.3", "--reference", "1",
        "--out", str(first))
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(load_model(first).info["merge"]))
    code, result, _ = run(capsys, "replay", str(recipe), "--out", str(second))
    assert code == 0 and result["options"]["gamma"] == 0.3
    a, b = load_model(first).state_dict(), load_model(second).state_dict()
    assert all((a[k] == b[k]).all() for k in a)


def test_interpolate_and_spectrum(zoo, capsys):
    code, curve, _ = run(capsys, "interpolate", *zoo, "--method", "permute", "--steps", "3")
    assert code == 0 and curve["lambdas"] == [0.0, 0.5, 1.0]
    assert len(curve["accuracy"]) == 3 and isinstance(curve["barrier"], float)
    code, spec, _ = run(capsys, "spectrum", *zoo)
    assert code == 0 and spec["gamma"] == 0.1 and spec["relative"] is True  # the registry's
    assert [p["name"] for p in spec["merge_points"]] == ["fc1", "fc2"]
    first = spec["merge_points"][0]
    assert len(first["shrunk"]) == len(first["reached_heldout"]) == 128
    code, absolute, _ = run(capsys, "spectrum", *zoo, "--absolute", "--gamma", "0.01")
    assert code == 0 and absolute["gamma"] == 0.01 and absolute["relative"] is False
    assert absolute["merge_points"][0]["shrunk"] != first["shrunk"]


def test_diagnose_prints_a_checklist(zoo, capsys):
    code, report, _ = run(capsys, "diagnose", *zoo, "--method", "permute")
    assert code == 0
    assert report["method"] == "permute" and report["findings"]
    assert {p["name"] for p in report["points"]} == set(report["ranking"]) == {"fc1", "fc2"}


def test_methods_lists_the_registry(capsys):
    code, result, _ = run(capsys, "methods")
    assert code == 0
    assert result["methods"]["cca"]["options"]["gamma"]["default"] == 0.1


def test_error_paths_are_one_line(zoo, tmp_path, capsys):
    out = str(tmp_path / "x.safetensors")
    assert "unknown method" in run_error(capsys, "merge", *zoo, "--method", "magic", "--out", out)
    vgg_dir = tmp_path / "vgg"
    main(["train", "--arch", "vgg", "--seeds", "0", "--epochs", "1", "--width", "0.25",
          "--out", str(vgg_dir), "--quiet"])
    capsys.readouterr()
    vgg = str(next(vgg_dir.glob("*.safetensors")))
    assert "architecture" in run_error(capsys, "merge", zoo[0], vgg, "--out", out)
    assert "fashion" in run_error(capsys, "evaluate", *zoo, "--data", "fashion-mnist",
                                  "--data-dir", str(tmp_path)).lower()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage")
    run_error(capsys, "evaluate", str(bad))
    run_error(capsys, "evaluate", str(tmp_path / "missing.safetensors"))
    assert "no option" in run_error(capsys, "merge", *zoo, "--method", "permute", "--gamma", "1",
                                    "--out", out)
    run_error(capsys, "merge")  # argparse usage error, also one line


def test_module_entry_point_prints_json():
    proc = subprocess.run([sys.executable, "-m", "ccamerge", "methods", "--json"],
                          capture_output=True, text=True, check=True)
    assert "cca" in json.loads(proc.stdout)["methods"]


class _GeluNet(torch.nn.Module):
    """Not a built-in family: LayerNorm, GELU, a residual add."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(64, 48)
        self.norm = torch.nn.LayerNorm(48)
        self.act = torch.nn.GELU()
        self.hidden = torch.nn.Linear(48, 48)
        self.act2 = torch.nn.GELU()
        self.out = torch.nn.Linear(48, 10)

    def forward(self, x):
        h = self.act(self.norm(self.inp(x.flatten(1))))
        return self.out(self.act2(self.hidden(h)) + h)


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    digits = load_dataset("digits")
    out = tmp_path_factory.mktemp("archives")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = _GeluNet()
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        for _ in range(60):
            idx = torch.randint(0, len(digits.x_train), (128,))
            loss = torch.nn.functional.cross_entropy(model(digits.x_train[idx]),
                                                     digits.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        path = out / f"gelu_s{seed}.ts"
        torch.jit.save(torch.jit.script(model.eval()), str(path))
        paths.append(str(path))
    return paths


def test_torchscript_archives_need_trust_then_trace_verify_and_merge(archives, tmp_path, capsys):
    out = tmp_path / "merged.ts"
    assert "--trust-code" in run_error(capsys, "merge", *archives, "--out", str(out))
    code, spec, _ = run(capsys, "spec", archives[0], "--trust-code")
    assert code == 0 and spec["verified"]
    (stream,) = spec["points"]  # the residual add ties inp, norm and hidden into one stream
    assert {"inp", "norm", "hidden", "out"} <= set(stream["layers"])
    assert "digraph" in spec["dot"]
    for method in ("cca", "permute"):
        code, result, _ = run(capsys, "merge", *archives, "--method", method, "--out", str(out),
                              "--trust-code")
        assert code == 0 and result["accuracy"] > 50
        extra = {RECIPE_FILE: ""}
        merged = torch.jit.load(str(out), _extra_files=extra)  # a TorchScript archive again
        assert json.loads(extra[RECIPE_FILE])["merge"]["options"] == result["options"]
        code, scores, _ = run(capsys, "evaluate", str(out), "--trust-code")
        assert scores["models"][0]["accuracy"] == pytest.approx(result["accuracy"])
        x = load_dataset("digits").x_train[:8]
        wanted = api.merge([load_archive_model(p, x) for p in archives], load_dataset("digits"),
                           method).model.state_dict()
        assert all(torch.equal(merged.state_dict()[k], t) for k, t in wanted.items())
    again = tmp_path / "again.ts"
    code, replayed, _ = run(capsys, "replay", str(out), "--out", str(again), "--trust-code")
    assert code == 0 and replayed["method"] == "permute"
    assert archive_info(again)["merge"] == archive_info(out)["merge"]
    first, second = torch.jit.load(str(out)).state_dict(), torch.jit.load(str(again)).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_spec_of_a_builtin_model_matches_the_hand_written_one(zoo, capsys):
    code, spec, _ = run(capsys, "spec", zoo[0], "--no-diagrams")
    assert code == 0 and spec["matches_hand_written"] and "dot" not in spec


def _toy_method(calls: list) -> Method:
    """A method the registry does not have: identity transforms, records the options it got."""
    def align_toy(ctx, *, toy_level, sharpen):
        calls.append({"toy_level": toy_level, "sharpen": sharpen})
        return Alignment(identity_transforms(ctx))
    return Method("toy", "a method for this test", align_toy, None,
                  {"toy_level": Option(3, int, "how many toy levels", 1),
                   "sharpen": Option(False, bool, "sharpen the toy")})


def test_a_method_added_to_the_registry_gets_cli_flags(zoo, tmp_path, capsys, monkeypatch):
    calls: list = []
    monkeypatch.setitem(METHODS, "toy", _toy_method(calls))
    assert main(["merge", "--help"]) == 0
    usage = " ".join(capsys.readouterr().out.split())
    assert "--toy-level TOY_LEVEL toy: how many toy levels (default 3)" in usage
    assert "[--sharpen | --no-sharpen]" in usage and "[--relative | --absolute]" in usage
    out = str(tmp_path / "toy.safetensors")
    code, result, _ = run(capsys, "merge", *zoo, "--method", "toy", "--toy-level", "5",
                          "--sharpen", "--out", out)
    assert code == 0 and calls == [{"toy_level": 5, "sharpen": True}]
    assert result["options"] == {"toy_level": 5, "sharpen": True}
    assert load_model(out).info["merge"]["options"] == result["options"]
    code, result, _ = run(capsys, "merge", *zoo, "--method", "toy", "--no-sharpen", "--out", out)
    assert calls[-1] == {"toy_level": 3, "sharpen": False}  # the registry's default for the rest
    for command in (["interpolate", "a", "b"], ["diagnose", "a", "b"]):
        args = cli.build_parser().parse_args([*command, "--toy-level", "2"])
        assert cli._method_options(args) == {"toy_level": 2}
    assert "no option" in run_error(capsys, "merge", *zoo, "--method", "permute",
                                    "--toy-level", "2", "--out", out)
    assert "invalid int" in run_error(capsys, "merge", *zoo, "--toy-level", "2.5", "--out", out)


def test_only_the_flags_given_reach_the_registry(capsys):
    parser = cli.build_parser()
    assert cli._method_options(parser.parse_args(["merge", "a", "b", "--out", "o"])) == {}
    args = parser.parse_args(["merge", "a", "b", "--out", "o", "--absolute", "--max-sweeps", "7",
                              "--alpha", "0.5", "--beta", "0.25", "--gamma", "0.2"])
    assert cli._method_options(args) == {"max_sweeps": 7, "alpha": 0.5, "beta": 0.25,
                                         "gamma": 0.2, "relative": False}
    relative = parser.parse_args(["spectrum", "a", "b", "--relative"])
    assert cli._method_options(relative) == {"relative": True}
    assert "not allowed with" in run_error(capsys, "merge", "a", "b", "--out", "o", "--relative",
                                           "--absolute")


@pytest.mark.parametrize("method", list(METHODS))
def test_option_flags_parse_back_to_the_options(method):
    declared = METHODS[method].options
    changed = {n: (not o.default) if o.kind is bool else o.kind(o.default) * 2
               for n, o in declared.items()}
    parser = cli.build_parser()
    for options in (METHODS[method].defaults(), changed):
        words = cli.option_flags(method, options)
        args = parser.parse_args(["merge", "a", "b", "--out", "o", "--method", method, *words])
        assert cli._method_options(args) == options
    assert cli.option_flags("cca", {"gamma": 0.3, "relative": False}) == ["--gamma", "0.3",
                                                                         "--absolute"]
    with pytest.raises(CcamergeError, match="no option"):
        cli.option_flags("average", {"gamma": 0.3})


def test_options_shared_by_methods_must_agree(monkeypatch):
    calls: list = []
    other = Method("toy2", "clashes with toy", _toy_method(calls).solve, None,
                   {"toy_level": Option(0.5, float, "a float this time")})
    monkeypatch.setitem(METHODS, "toy", _toy_method(calls))
    monkeypatch.setitem(METHODS, "toy2", other)
    with pytest.raises(TypeError, match="toy_level differs"):
        cli.build_parser()


def test_device_flag_on_every_command_and_a_missing_device_is_one_line(tmp_path, capsys,
                                                                      monkeypatch):
    zoo = tmp_path / "zoo"
    assert main(["train", "--arch", "mlp", "--seeds", "0", "1", "--epochs", "1", "--out",
                 str(zoo), "--device", "cpu", "--json", "--quiet"]) == 0
    a, b = sorted(str(p) for p in zoo.glob("*.safetensors"))
    capsys.readouterr()
    out = str(tmp_path / "m.safetensors")
    for argv in (["evaluate", a, b], ["merge", a, b, "--out", out], ["spectrum", a, b],
                 ["interpolate", a, b, "--steps", "2"], ["diagnose", a, b], ["replay", out,
                 "--out", str(tmp_path / "r.safetensors")]):
        assert main([*argv, "--device", "cpu", "--json", "--quiet"]) == 0, argv
        capsys.readouterr()
    merged = json.loads((main(["merge", a, b, "--out", out, "--json", "--quiet"]), capsys
                         .readouterr().out)[1])
    assert merged["device"] == "cpu" and merged["world_size"] == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["merge", a, b, "--out", str(tmp_path / "x.safetensors"), "--device", "cuda:7"
                 ]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0]
    assert not (tmp_path / "x.safetensors").exists()
