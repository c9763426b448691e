"""Smoke test of benchmarks/average_memory.py on a tiny width: the maps it builds are orthogonal,
both paths run in their own processes, agree, and the report says how much each added."""

import subprocess
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_random_maps_are_orthogonal_and_the_reference_is_left_alone():
    from average_memory import random_alignment
    from cost_paper import paper_model

    from ccamerge.spec import build_spec

    models = [paper_model("vgg11", 0.125, seed) for seed in range(3)]
    spec = build_spec(models[0])
    alignment = random_alignment(models, spec)
    for p in spec.points:
        assert np.array_equal(alignment.transforms[0][p.name].T, np.eye(p.width))
        t = alignment.transforms[2][p.name]
        np.testing.assert_allclose(t.T @ t.T_inv, np.eye(p.width), atol=1e-10)
        assert not np.allclose(t.T, np.eye(p.width))


def test_the_report_compares_both_paths_and_finds_them_equal(tmp_path):
    out = tmp_path / "report.md"
    done = subprocess.run([sys.executable, str(BENCH / "average_memory.py"), "--width", "0.125",
                           "--n", "3", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    line = out.read_text()
    assert "held" in line and "entry at a time" in line and "sums equal" in line
