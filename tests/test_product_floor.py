"""benchmarks/product_floor.py: multiply-add counts against hand formulas and the pass itself."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_forward_macs_counts_convolutions_and_linears_by_hand():
    from product_floor import forward_macs

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.Flatten(),
                          nn.Linear(8 * 5 * 5, 10))
    # 25 positions: 8 outputs x 3*3*3 inputs, 8 outputs x 2*3*3 inputs (groups of 2), then 200*10
    expected = 25 * 8 * 27 + 25 * 8 * 18 + 200 * 10
    assert forward_macs(model, torch.zeros(1, 3, 5, 5)) == expected


def test_product_macs_are_self_products_and_reference_pairs():
    from product_floor import product_macs

    shapes = [(4, 3), (1, 10)]  # (positions, units) per image
    # N = 3: three 3x3 self products and two pairs per position, then the same at 10 units
    assert product_macs(shapes, 3) == 4 * (3 * 9 + 2 * 9) + 1 * (3 * 100 + 2 * 100)
    assert product_macs(shapes, 3, triangles=True) == 4 * (3 * 6 + 2 * 9) + (3 * 55 + 2 * 100)


def test_counted_products_are_what_the_statistics_pass_multiplies(monkeypatch):
    """The floor's product count against the sizes of the products one pass really computes."""
    from cost_paper import paper_model
    from product_floor import point_shapes, product_macs

    from ccamerge import moments
    from ccamerge.spec import build_spec
    from ccamerge.stats import collect_statistics

    done = []
    gram, product = moments.gram, moments.product

    def counted_gram(a, *args, **kwargs):
        done.append(a.shape[0] * a.shape[1] ** 2)
        return gram(a, *args, **kwargs)

    def counted_product(a, b):
        done.append(a.shape[0] * a.shape[1] * b.shape[1])
        return product(a, b)

    monkeypatch.setattr(moments, "gram", counted_gram)
    monkeypatch.setattr(moments, "product", counted_product)
    models = [paper_model("vgg11", 0.125, seed=s) for s in range(3)]
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    collect_statistics(models, build_spec(models[0]), images, batch_size=2)
    shapes = point_shapes(models[0], images[:1])
    assert shapes[0] == (32 * 32, 8)  # the first conv: every pixel, 64 / 8 channels
    assert sum(done) == 2 * product_macs(shapes, 3)


def test_floor_rows_grow_the_forward_with_n_and_the_batchnorm_reset():
    from product_floor import floor_rows, report

    rows = floor_rows(archs=("vgg11", "resnet20"), widths=(0.25,), ns=(2, 4))
    by = {(r["arch"], r["N"]): r for r in rows}
    assert by[("vgg11", 4)]["forward_mmacs"] == pytest.approx(2 * by[("vgg11", 2)]["forward_mmacs"],
                                                              rel=1e-3)
    # ResNet20 counts N passes and the BatchNorm reset: 5 / 3 from N = 2 to 4
    assert by[("resnet20", 4)]["forward_mmacs"] == pytest.approx(
        5 / 3 * by[("resnet20", 2)]["forward_mmacs"], rel=1e-3)
    for row in rows:
        assert 0 < row["triangles_over_forward"] < row["products_over_forward"]
    assert "| vgg11 | 0.25 | 2 |" in report(rows)
