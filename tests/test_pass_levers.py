"""Smoke test of benchmarks/pass_levers.py on a tiny width."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_a_setting_times_every_variant_and_the_ratios_compare_them():
    from pass_levers import ratios, setting

    from ccamerge.layout import CANDIDATES

    row = setting("vgg11", 0.125, 12, 1)
    assert row["layout_chosen"] in CANDIDATES and row["probe_s"] > 0
    for name in ("before", "layout", "gram", "copy", "mkl", "mkl_samples", "after",
                 "forward_standard", "forward_channels_last"):
        assert row[name] > 0, name
    table = ratios(row)
    assert table["after / before"] == round(row["after"] / row["before"], 3)
    assert table["gram lever (triangle / one GEMM)"] == round(row["after"] / row["layout"], 3)
    assert table["maps lever (in place / copied)"] == round(row["after"] / row["copy"], 3)
    assert table["oneDNN lever (oneDNN / torch.mm)"] == round(row["after"] / row["mkl"], 3)
    assert (table["oneDNN samples lever (oneDNN / torch.mm for [S, n])"]
            == round(row["after"] / row["mkl_samples"], 3))
