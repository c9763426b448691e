"""Smoke test of benchmarks/cost_paper.py (cost.py --paper) on tiny widths."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.parametrize("arch, width", [("vgg11", 0.125), ("resnet20", 0.25)])
def test_a_setting_row_adds_up_and_projects_fixed_costs_away(arch, width):
    from cost_paper import measure, paper_summary

    row = measure(arch, width, 2, 8, 1)
    phases = ["layout_probe", "statistics", "solve", "transforms", "averaging", "bn_reset"]
    assert row["layout"] in ("standard", "channels_last") and row["layout_probe"] > 0
    assert row["total"] == pytest.approx(sum(row[p] for p in phases), abs=1e-3)
    assert row["forward"] == min(row[f"forward_{k}"] for k in
                                 ("standard", "channels_last", "channels_last_weights"))
    assert row["ratio"] == pytest.approx(row["total"] / row["forward"], rel=1e-2)
    assert row["per_image_ratio"] <= row["ratio_50k"] < row["ratio"]
    assert row["statistics_ratio_median"] > 0 and row["ratio_50k_adjacent"] > 0
    assert (row["bn_reset"] > 0) == (arch == "resnet20")
    assert row["peak_gb"] > 0 and row["merge_peak_extra_gb"] >= 0
    text = paper_summary([row, {"arch": arch, "width": 8, "N": 4, "error": "exit -9: killed"}], 8)
    assert f"{arch} x{width:g} N=2" in text and "Did not complete" in text
