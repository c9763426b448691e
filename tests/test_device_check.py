"""benchmarks/device_check.py runs on a CPU (tiny settings) and writes its report."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from device_check import main, relative_difference  # noqa: E402


def test_relative_difference_is_per_tensor_against_its_largest_entry():
    ref = {"a": [1.0, -4.0], "b": [0.0, 1e-3]}
    other = {"a": [1.0, -4.002], "b": [0.0, 1e-3]}
    assert abs(relative_difference(other, ref) - 5e-4) < 1e-12
    assert relative_difference(ref, ref) == 0.0


@pytest.mark.slow
def test_quick_run_writes_both_tables(tmp_path, capsys):
    out = tmp_path / "device_check.md"
    main(["--quick", "--device", "cpu", "--archs", "resnet20", "--widths", "0.25",
          "--samples", "64", "--check-samples", "32", "--factorisations", "8", "300",
          "--out", str(out)])
    text = out.read_text()
    assert "--archs resnet20" in text and "self-check (no CUDA)" in text
    cost = [line for line in text.splitlines() if line.startswith("| resnet20 | 0.25 |")]
    assert len(cost) == 1 and len(cost[0].split("|")) == 13  # 4 phases, total, forward, ratio
    sizes = [line.split("|")[1].strip() for line in text.splitlines()
             if line.startswith("| 8 |") or line.startswith("| 300 |")]
    assert sizes == ["8", "300"]  # the factorisation timings, host (and device) per size
    assert capsys.readouterr().out.count("\n") == 4  # one JSON line per row
