"""Smoke test of benchmarks/cost_paper.py (cost.py --paper) on tiny widths."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.parametrize("arch, width", [("vgg11", 0.125), ("resnet20", 0.25)])
def test_a_setting_row_adds_up_and_projects_fixed_costs_away(arch, width):
    from cost_paper import measure, paper_summary

    from ccamerge.layout import CANDIDATES

    row = measure(arch, width, 2, 8, 1)
    phases = ["layout_probe", "statistics", "solve", "transforms", "averaging", "bn_reset"]
    assert row["layout"] in CANDIDATES and row["layout_probe"] > 0
    assert row["total"] == pytest.approx(sum(row[p] for p in phases), abs=1e-3)
    assert row["forward"] == min(row[f"forward_{k}"] for k in CANDIDATES)
    assert row["ratio"] == pytest.approx(row["total"] / row["forward"], rel=1e-2)
    assert row["ratio_50k"] < row["ratio"] and row["projection"] == "steady batches"
    assert row["images"] == 2 * row["batch"]  # 8 images: two batches, the least to project
    assert 0 < row["statistics_50k"] and 0 < row["forward_50k"]
    assert row["statistics_ratio_median"] > 0 and row["ratio_50k_adjacent"] > 0
    assert (row["bn_reset"] > 0) == (arch == "resnet20")
    assert row["peak_gb"] > 0 and row["merge_peak_extra_gb"] >= 0
    text = paper_summary([row, {"arch": arch, "width": 8, "N": 4, "error": "exit -9: killed"}], 8)
    assert f"{arch} x{width:g} N=2" in text and "Did not complete" in text


def test_projection_keeps_the_once_cost_and_repeats_the_steady_batches():
    from cost_paper import paper_batches, projected

    # a first batch of 5 s (3 s of it once), steady batches of 2 s, 1 s to finish: 5 + 2 + 2 + 1
    assert projected(10.0, [5.0, 2.0, 2.0], 100) == pytest.approx(4.0 + 100 * 2.0)
    assert projected(6.0, [3.0, 3.0], 4) == pytest.approx(12.0)  # no once cost: linear
    assert paper_batches(4000) == (4000, 500) and paper_batches(500) == (500, 250)
    assert paper_batches(125) == (124, 62) and paper_batches(1001) == (999, 333)


def test_a_setting_runs_in_its_own_process_with_its_products_and_allocator():
    """``run_setting`` passes the products and the allocator to the child (a row says both);
    rows of other conditions are kept beside and grouped apart in the summary."""
    from cost_paper import paper_summary, run_setting, setting_key

    row = run_setting("vgg11", 0.125, 2, 8, 1, products="bfloat16", allocator="kept")
    assert "error" not in row, row.get("error")
    assert (row["products"], row["allocator"]) == ("bfloat16", "kept")
    older = {k: v for k, v in row.items() if k not in ("products", "allocator")}
    assert setting_key(older)[4:] == ("float32", "fixed")  # rows from before the choice
    assert setting_key(row) != setting_key(older)
    text = paper_summary([row, older], 8)
    assert "bfloat16 products, kept allocator" in text
    assert "float32 products, fixed allocator" in text


def test_a_setting_that_fails_is_a_row_of_this_machine_and_condition():
    """A failure (out of memory, a bad setting) is a row keyed like the setting it replaces, so
    ``--paper-redo`` measures it again instead of keeping the stale error beside the new row."""
    from cost_paper import cpu_name, run_setting, setting_key

    row = run_setting("no_such_arch", 1, 2, 8, 1, products="bfloat16", allocator="kept")
    assert row["error"].startswith("exit ")
    assert setting_key(row) == ("no_such_arch", 1.0, 2, cpu_name(), "bfloat16", "kept")
