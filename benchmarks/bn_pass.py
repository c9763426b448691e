"""What the mapped BatchNorm policy costs over the paper's, with its moments taken from the
statistics pass (now) or from a pass per model of their own (before).

    python benchmarks/bn_pass.py [--images 2048] [--width 1] [--repeats 5] [--out DIR]

Times ``api.merge`` (cca, BatchNorm reset, statistics on every image) of 2 random ResNet20 on
random CIFAR-shaped inputs ``[images, 3, 32, 32]`` under three variants, interleaved round by
round so that the machine's other load spreads over all of them:

* ``paper``: BatchNorm vectors transformed with the conv rows, one reset pass;
* ``mapped``: the default; the folded BatchNorms' output moments measured in the statistics
  pass (``collect_statistics(self_only=...)``), then one train-mode pass;
* ``mapped_before``: the same merge on statistics collected without the moments, so that
  ``finish_batchnorm`` measures them in one more eval pass per model (the code before).

Each is reported as the median of ``--repeats`` rounds and as ``ratio`` = merge time / the
bare forward (N eval passes + one train-mode pass over the same images, no hooks, the faster of
the standard and the channels-last layout; median of its rounds too). Writes ``bn_pass.md``
(and prints it). Results are random-weight timings: cost does not depend on training.
"""

from __future__ import annotations

import argparse
import statistics as stat
import time
from pathlib import Path

import torch
from cost import bare_forward

import ccamerge.api as api
from ccamerge.models import build_model
from ccamerge.stats import channels_last

VARIANTS = ("paper", "mapped", "mapped_before")
BATCH = 256


def resnets(n: int, width: float) -> list[torch.nn.Module]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(build_model("resnet20", image_shape=[3, 32, 32], width=width).eval())
    return out


def without_moments(collect):
    """``collect_statistics`` as the merge called it before: no ``self_only`` moments."""
    def collect_before(*args, **kwargs):
        kwargs.pop("self_only", None)
        return collect(*args, **kwargs)
    return collect_before


def timed_merge(models, x: torch.Tensor, variant: str) -> float:
    """Seconds of one ``api.merge`` (cca, BatchNorm reset) under ``variant``."""
    policy = "paper" if variant == "paper" else "mapped"
    real = api.collect_statistics
    if variant == "mapped_before":
        api.collect_statistics = without_moments(real)
    try:
        start = time.perf_counter()
        api.merge(models, x, "cca", bn_policy=policy, batch_size=BATCH)
        return time.perf_counter() - start
    finally:
        api.collect_statistics = real


def forward_limit(models, x: torch.Tensor) -> float:
    """The faster of the standard and the channels-last bare forward (seconds)."""
    runners, x_cl = channels_last(models, x)
    return min(bare_forward(models, x), bare_forward(runners, x_cl))


def measure(images: int, width: float, repeats: int) -> dict[str, list[float]]:
    """``{variant or "forward": [seconds per round]}``, variants interleaved in each round."""
    torch.manual_seed(100)
    models, x = resnets(2, width), torch.randn(images, 3, 32, 32)
    timed_merge(models, x[:BATCH], "mapped")  # warm-up
    times: dict[str, list[float]] = {v: [] for v in ("forward", *VARIANTS)}
    for _ in range(repeats):
        times["forward"].append(forward_limit(models, x))
        for variant in VARIANTS:
            times[variant].append(timed_merge(models, x, variant))
    return times


def report(times: dict[str, list[float]], images: int, width: float) -> str:
    forward = stat.median(times["forward"])
    lines = [f"2 random ResNet20 (width {width:g}), {images} random 3x32x32 images, statistics "
             f"on all, cca with BatchNorm reset, {torch.get_num_threads()} threads; medians of "
             f"{len(times['forward'])} interleaved rounds", "",
             "| variant | merge s | ratio to bare forward | rounds (s) |",
             "|---|---:|---:|---|",
             f"| bare forward (2 eval + 1 train pass) | {forward:.2f} | 1.00 | "
             f"{', '.join(f'{t:.2f}' for t in times['forward'])} |"]
    for variant in VARIANTS:
        median = stat.median(times[variant])
        lines.append(f"| {variant} | {median:.2f} | {median / forward:.2f} | "
                     f"{', '.join(f'{t:.2f}' for t in times[variant])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    text = report(measure(args.images, args.width, args.repeats), args.images, args.width)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bn_pass.md").write_text("# Mapped BatchNorm: moments from the statistics pass\n\n"
                                         "    python benchmarks/bn_pass.py\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
