import json
import subprocess
import sys

import pytest
import torch

from ccamerge.cli import main
from ccamerge.io import load_model


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
    assert merged.info["merge"]["method"] == method
    assert merged.info["test_accuracy"] == pytest.approx(result["accuracy"])


def test_replay_reproduces_the_same_weights(zoo, tmp_path, capsys):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run(capsys, "merge", *zoo, "--method", "cca", "--gamma", "0.3", "--reference", "1", "--out", str(first))
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
    assert code == 0
    assert [p["name"] for p in spec["merge_points"]] == ["fc1", "fc2"]
    assert len(spec["merge_points"][0]["rho"]) == 128


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
    from ccamerge.data import load_dataset

    digits = load_dataset("digits")
    out = tmp_path_factory.mktemp("archives")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = _GeluNet()
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        for _ in range(60):
            idx = torch.randint(0, len(digits.x_train), (128,))
            loss = torch.nn.functional.cross_entropy(model(digits.x_train[idx]), digits.y_train[idx])
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
        merged = torch.jit.load(str(out))  # a TorchScript archive again
        code, scores, _ = run(capsys, "evaluate", str(out), "--trust-code")
        assert scores["models"][0]["accuracy"] == pytest.approx(result["accuracy"])
        assert merged is not None


def test_spec_of_a_builtin_model_matches_the_hand_written_one(zoo, capsys):
    code, spec, _ = run(capsys, "spec", zoo[0], "--no-diagrams")
    assert code == 0 and spec["matches_hand_written"] and "dot" not in spec
