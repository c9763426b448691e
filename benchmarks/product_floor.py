"""The arithmetic floor of a CCA merge's statistics pass on the paper's shapes.

For VGG11 and ResNet20 (``cost_paper.paper_model``) at each width and N, counts per image:

* ``forward``: the multiply-adds of the bare forward a merge cannot avoid, every convolution and
  linear layer of N eval passes (plus the BatchNorm-reset pass for ResNet20), as
  ``cost_paper.unavoidable_passes`` runs them;
* ``products``: the multiply-adds of the covariance products the statistics pass computes at
  every merge point, ``P`` positions of ``n`` units per image: N self products ``n^2 P`` and
  the N - 1 cross products of the reference with each other model (``pairs="reference"``, the
  default), as whole products; ``triangles``: the same with each self product's upper
  triangle only (``n (n + 1) / 2`` per position).

``products / forward`` is the fraction the statistics pass must add to the forward when its
products run at the convolutions' rate: with exact float32 products on every position it bounds
``total / bare forward`` from below at that fraction plus one, whatever the code. Arithmetic
only (one 1-image forward per model to read the merge points' shapes), a few seconds.

    python benchmarks/product_floor.py [--out benchmarks/results/product_floor.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from cost import markdown
from cost_paper import PAPER_NS, PAPER_WIDTHS, paper_model

ARCHS = ("vgg11", "resnet20")


def forward_macs(model: torch.nn.Module, image: torch.Tensor) -> int:
    """Multiply-adds of one forward of ``model`` on ``image`` ``[1, ...]``: every Conv2d
    (output elements x in-channels per group x kernel area) and Linear (in x out per row)."""
    total = 0

    def count(module, _inputs, out):
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            kernel = module.in_channels // module.groups * module.kernel_size[0] * \
                module.kernel_size[1]
            total += out.numel() * kernel
        else:
            total += out.numel() * module.in_features

    layers = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    handles = [m.register_forward_hook(count) for m in layers]
    try:
        with torch.no_grad():
            model(image)
    finally:
        for handle in handles:
            handle.remove()
    return total


def point_shapes(model: torch.nn.Module, image: torch.Tensor) -> list[tuple[int, int]]:
    """``(positions, units)`` per image of every merge point (``ccamerge.spec.build_spec``):
    the rows and columns of its samples ``[S, n]`` for one image."""
    from ccamerge.spec import build_spec
    from ccamerge.stats import batch_features

    features = batch_features(model, build_spec(model), image)
    return [tuple(samples.shape) for samples in features.values()]


def product_macs(shapes: list[tuple[int, int]], models: int, triangles: bool = False) -> int:
    """Multiply-adds per image of the statistics pass's products: per point of ``P`` positions
    and ``n`` units, ``models`` self products and the pairs ``collect_statistics`` multiplies by
    default (the reference with each other model)."""
    from ccamerge.stats import _pairs_for

    pairs, total = len(_pairs_for(models, 0, "reference")), 0
    for positions, units in shapes:
        own = units * (units + 1) // 2 if triangles else units * units
        total += positions * (models * own + pairs * units * units)
    return total


def floor_rows(archs=ARCHS, widths=PAPER_WIDTHS, ns=PAPER_NS) -> list[dict]:
    """One row per (arch, width, N): per-image multiply-adds and their ratios."""
    from ccamerge.transform import has_batchnorm

    image, rows = torch.zeros(1, 3, 32, 32), []
    for arch in archs:
        for width in widths:
            model = paper_model(arch, width, seed=0)
            per_model, shapes = forward_macs(model, image), point_shapes(model, image)
            for n in ns:
                forward = per_model * (n + has_batchnorm(model))
                whole, half = product_macs(shapes, n), product_macs(shapes, n, triangles=True)
                rows.append({"arch": arch, "width": width, "N": n,
                             "forward_mmacs": round(forward / 1e6, 3),
                             "products_mmacs": round(whole / 1e6, 3),
                             "triangles_mmacs": round(half / 1e6, 3),
                             "products_over_forward": round(whole / forward, 3),
                             "triangles_over_forward": round(half / forward, 3)})
    return rows


def report(rows: list[dict]) -> str:
    """The Markdown page of :func:`floor_rows`."""
    return "\n".join([
        "# The arithmetic floor of the statistics pass", "",
        "`python benchmarks/product_floor.py`: multiply-adds per image (millions) of the bare "
        "forward (N passes, plus the BatchNorm reset for ResNet20) and of the statistics pass's "
        "covariance products (N self products, N - 1 reference pairs, every position), whole "
        "and with triangular self products. `products_over_forward` is what exact products on "
        "every position add to the forward at the convolutions' rate: the ratio total / bare "
        "forward cannot go below one plus it.", "",
        *markdown(rows, list(rows[0]))]) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results"
                        / "product_floor.md")
    args = parser.parse_args(argv)
    text = report(floor_rows())
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
