"""Merging through a depthwise conv, or leaving its channels unmerged: MobileNet-style digits nets.

    python benchmarks/depthwise_check.py [--pairs 3] [--epochs 25] [--width 16]
        [--out benchmarks/results/depthwise_check.md]

Trains ``2 * --pairs`` nets (stem -> pointwise ``w -> 2w`` -> depthwise 3x3 -> pointwise
``2w -> w``, BatchNorm and ReLU after each conv, average pool, Linear; seeds 0..) with Adam on
the digits training set and merges pair k (seeds 2k, 2k + 1) with each method at its defaults
twice: with the traced spec, whose merge point runs through the depthwise conv (its kernels
mapped along axis 0, statistics pooled from both sides), and with that point left out (the
channels around the depthwise conv averaged unaligned, the tracer's former behaviour). Also cca
into ``target_width`` 0.5 (half of every merge point). Reports mean test accuracies over the
pairs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ccamerge import api
from ccamerge.data import load_dataset
from ccamerge.evaluate import evaluate_model
from ccamerge.spec import AlignmentSpec

METHODS = ("average", "permute", "weight_matching", "zipit", "cca", "gcca")


class MobileBlock(nn.Module):
    """The net described in the module docstring, input ``[B, 1, 8, 8]``."""

    def __init__(self, width: int):
        super().__init__()

        def unit(conv: nn.Conv2d) -> nn.Sequential:
            return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU())

        self.stem = unit(nn.Conv2d(1, width, 3, padding=1))
        self.expand = unit(nn.Conv2d(width, 2 * width, 1))
        self.depthwise = unit(nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width))
        self.project = unit(nn.Conv2d(2 * width, width, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))

    def forward(self, x):
        return self.head(self.project(self.depthwise(self.expand(self.stem(x)))))


def train(data, seed: int, width: int, epochs: int) -> nn.Module:
    torch.manual_seed(seed)
    model = MobileBlock(width)
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.y_train), generator=generator)
        for start in range(0, len(order), 64):
            batch = order[start:start + 64]
            loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def without_depthwise(spec: AlignmentSpec) -> AlignmentSpec:
    """``spec`` minus the points whose producers include a depthwise conv's kernels."""
    return AlignmentSpec(tuple(p for p in spec.points
                               if not any(a.param == "depthwise.0.weight" for a in p.producers)))


def accuracy(models, data, method: str, **kwargs) -> float:
    return evaluate_model(api.merge(models, data, method, **kwargs).model, data.test)["accuracy"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/depthwise_check.md")
    args = parser.parse_args(argv)
    data = load_dataset("digits")
    rows: dict[str, list[float]] = {}
    for k in range(args.pairs):
        models = [train(data, seed, args.width, args.epochs) for seed in (2 * k, 2 * k + 1)]
        rows.setdefault("base models", []).extend(
            evaluate_model(m, data.test)["accuracy"] for m in models)
        spec = api.resolve_spec(models, data.train)
        for method in METHODS:
            rows.setdefault(f"{method}, through", []).append(accuracy(models, data, method))
            rows.setdefault(f"{method}, unmerged", []).append(
                accuracy(models, data, method, spec=without_depthwise(spec)))
        rows.setdefault("cca, through, target_width 0.5", []).append(
            accuracy(models, data, "cca", target_width=0.5))
    lines = [f"# Depthwise convs: merged through or left unmerged ({args.pairs} pairs, width "
             f"{args.width}, {args.epochs} epochs, digits)", "",
             f"`python benchmarks/depthwise_check.py --pairs {args.pairs} --epochs "
             f"{args.epochs} --width {args.width}`", "",
             "| merge | mean test accuracy (%) |", "|---|---|"]
    lines += [f"| {name} | {np.mean(values):.1f} |" for name, values in rows.items()]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
