"""``ccamerge spectrum --shared``: the gcca shared space of three models, as JSON, the same rows
as the API's, beside the pairwise spectrum of the same command without the flag."""

import json

import numpy as np
import pytest

from ccamerge import api
from ccamerge.cli import main
from ccamerge.data import load_dataset
from ccamerge.io import load_model


def run(capsys, *argv):
    code = main([*argv, "--json", "--quiet"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo3")
    assert main(["train", "--arch", "mlp", "--seeds", "0", "1", "2", "--epochs", "1", "--out",
                 str(out), "--json", "--quiet"]) == 0
    return sorted(str(p) for p in out.glob("*.safetensors"))


def test_spectrum_shared_reports_the_space_of_all_models(zoo, capsys):
    code, result, _ = run(capsys, "spectrum", *zoo, "--shared", "--stats-samples", "600")
    assert code == 0 and result["method"] == "gcca"
    assert result["gamma"] == 0.1 and result["relative"] is True  # gcca's registry defaults
    points = result["merge_points"]
    assert [p["name"] for p in points] == ["fc1", "fc2"]
    for p in points:
        values = np.asarray(p["eigenvalues"])
        assert p["num_models"] == 3 and len(values) == p["directions"] > 0
        assert (np.diff(values) <= 1e-12).all() and 0.0 <= values.min() and values.max() <= 3.0
        assert p["heldout_samples"] == 120 and len(p["rho_heldout"]) == len(values)
        assert [m["model"] for m in p["models"]] == [0, 1, 2]
    models = [load_model(path) for path in zoo]
    want = api.shared_spectrum(models, load_dataset("digits"), stats_samples=600)
    assert np.allclose(points[0]["eigenvalues"], want[0]["eigenvalues"], atol=1e-9)
    assert np.allclose(points[1]["rho_heldout"], want[1]["rho_heldout"], atol=1e-9)


def test_spectrum_without_shared_pairs_the_first_model_with_each_other(zoo, capsys):
    code, result, _ = run(capsys, "spectrum", *zoo, "--stats-samples", "600", "--gamma", "0.5")
    assert code == 0 and result["method"] == "cca" and result["gamma"] == 0.5
    assert [(p["name"], p["model"]) for p in result["merge_points"]] == [
        ("fc1", 1), ("fc1", 2), ("fc2", 1), ("fc2", 2)]


def test_spectrum_shared_refuses_a_bad_gamma_in_one_line(zoo, capsys):
    code = main(["spectrum", *zoo, "--shared", "--gamma", "-1"])
    _, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1 and "gamma" in err
