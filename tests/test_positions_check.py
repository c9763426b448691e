"""benchmarks/positions_check.py: which merges a variant runs and what its verdict says."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_products_variants_run_once_and_positions_variants_per_seed():
    from positions_check import parse_variant, variant_runs

    variants = [parse_variant(v) for v in ("0.25", "16", "bfloat16")]
    assert variants == [0.25, 16, "bfloat16"]
    assert variant_runs(variants, [0, 1]) == [
        (None, 0), (0.25, 0), (0.25, 1), (16, 0), (16, 1), ("bfloat16", 0),
        ("resample", 0), ("resample", 1)]


def test_the_verdict_keeps_each_default_that_no_variant_may_replace():
    from positions_check import MARGIN, verdict

    def rows(variant, low):
        return [{"variant": variant, "ci_low": low}, {"variant": "resample", "ci_low": -5.0}]

    assert verdict(rows("bfloat16", -MARGIN - 0.01)).endswith(
        'the defaults stay float32 products (products="float32").')
    assert "every position (positions=None) and float32 products" in verdict(
        rows(0.25, -1.0) + rows("bfloat16", -1.0))
    assert verdict(rows("bfloat16", -MARGIN + 0.01)).endswith("gammas: bfloat16.")
