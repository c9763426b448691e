"""Merging models of two widths: an x1 and an x2 MLP merged into either width with cca, gcca, ot.

    python benchmarks/width_check.py [--pairs 6] [--epochs 10] [--data digits]
        [--out benchmarks/results/width_check.md]
    python benchmarks/width_check.py --target-widths 1 0.75 0.5 0.25 [--pairs 3]
        [--out benchmarks/results/target_width.md]
    python benchmarks/width_check.py --arch vgg [--pairs 3] [--results benchmarks/results/default]
        [--cache benchmarks/cache]

``--arch vgg`` (or ``resnet20``): the reproduction's x1 pool (seeds 0..) on its default data
(Fashion-MNIST at 14 px, 4000 training images, 2000 test images), trained for the epochs its
plateau rule chose (``--results``/pools.csv), against x2 models (seeds 100..) trained as long,
both in the reproduction's cache; otherwise as below.

Trains (or reuses from ``benchmarks/cache/width_check``) ``--pairs`` MLPs at x1 (hidden
[128, 128], seeds 0..) and as many at x2 (hidden [256, 256], seeds 100..), all on the whole
training set. Pair k is (x1 seed k, x2 seed 100 + k); each pair is merged into the x1 width
(``target_model=0``) and into the x2 width (``target_model=1``) with every method that merges
different widths, at its defaults (statistics on the whole training set), and scored on the test
set. Reported per target: mean test accuracy of the endpoints and each merge, and paired
differences over the pairs (mean and 95% t interval): each method against the target model
itself, and the methods against each other.

With ``--target-widths``: pairs of x1 MLPs (seeds 2k, 2k + 1) merged into each width multiplier
(``target_width``) with every method that takes one, against the trivial baseline of the
full-width cca merge with the units beyond the target width dropped (truncation).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
from reproduce import PROFILES, reproduction_settings, split_data
from reproduce import train_pool as reproduction_pool
from scipy import stats as scipy_stats

from ccamerge import api
from ccamerge import target as targets
from ccamerge.data import load_dataset
from ccamerge.evaluate import evaluate_model
from ccamerge.io import load_model
from ccamerge.methods.registry import mixed_width_methods
from ccamerge.train import train_zoo

ROOT = Path(__file__).resolve().parent
READING = {True: "Reading: the test set is small (one image is 0.28 points on digits) and easy, "
                 "so this shows that mixed-width merges work and how they rank, not large gaps.",
           False: "Reading: 2000 test images (one image is 0.05 points) and only a few pairs: "
                  "the intervals are wide, the per-pair rows show how consistent the ranking is."}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def train(data, width: float, seeds: list[int], epochs: int, cache: Path) -> list:
    """Models of ``width`` trained from ``seeds`` (reused from ``cache`` when there)."""
    rows = train_zoo("mlp", data, seeds, cache / f"x{width:g}", split="same", width=width,
                     epochs=epochs, progress=lambda f, m: None)
    return [load_model(r["path"]) for r in rows]


def interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t interval of paired differences ``[pairs]``."""
    d = np.asarray(diffs)
    half = scipy_stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def pools(args) -> tuple:
    """``(dataset, x1 models, x2 models)``: MLPs trained here, or (``--arch vgg|resnet20``) the
    reproduction's x1 pool on its default data with x2 models trained as long (its cache)."""
    seeds = list(range(args.pairs))
    if args.arch == "mlp":
        data = load_dataset(args.data)
        cache = ROOT / "cache" / "width_check"
        return (data, train(data, 1.0, seeds, args.epochs, cache),
                train(data, 2.0, [100 + k for k in seeds], args.epochs, cache))
    profile = PROFILES["default"]
    data, _held = split_data(profile)
    args.data = data.name
    args.epochs, _options = reproduction_settings(args.results, args.arch)
    cache = args.cache / "default"
    return (data, reproduction_pool(args.arch, 1.0, "same", data, profile, cache, seeds,
                                    args.epochs),
            reproduction_pool(args.arch, 2.0, "same", data, profile, cache,
                              [100 + k for k in seeds], args.epochs))


def run(args) -> list[dict]:
    """One row per pair and target: endpoint accuracies and each method's merged accuracy."""
    data, narrow, wide = pools(args)
    rows = []
    for k, pair in enumerate(zip(narrow, wide, strict=True)):
        ends = [evaluate_model(m, data.test)["accuracy"] for m in pair]
        for target in (0, 1):
            row = {"pair": k, "target": f"x{target + 1}", "x1": ends[0], "x2": ends[1],
                   "target model": ends[target]}
            for method in mixed_width_methods():
                merged = api.merge(list(pair), data, method, target_model=target)
                row[method] = evaluate_model(merged.model, data.test)["accuracy"]
            log(f"pair {k} into x{target + 1}: " + ", ".join(f"{m} {row[m]:.1f}"
                                                           for m in mixed_width_methods()))
            rows.append(row)
    return rows


def run_targets(args) -> list[dict]:
    """One row per pair of x1 models and target width: endpoint accuracies, each method's
    merged accuracy and the truncated full-width cca merge."""
    data = load_dataset(args.data)
    models = train(data, 1.0, list(range(2 * args.pairs)), args.epochs,
                   ROOT / "cache" / "width_check")
    rows = []
    for k in range(args.pairs):
        pair = models[2 * k:2 * k + 2]
        ends = [evaluate_model(m, data.test)["accuracy"] for m in pair]
        full = api.merge(pair, data, "cca").model
        for width in args.target_widths:
            row = {"pair": k, "width": width, "a": ends[0], "b": ends[1],
                   "truncated cca": evaluate_model(targets.truncated(full, width),
                                                   data.test)["accuracy"]}
            for method in targets.target_width_methods():
                merged = api.merge(pair, data, method, target_width=width).model
                row[method] = evaluate_model(merged, data.test)["accuracy"]
                row["hidden"] = merged.layers[1].out_features
            log(f"pair {k} into {width:g}: " + ", ".join(
                f"{m} {row[m]:.1f}" for m in [*targets.target_width_methods(), "truncated cca"]))
            rows.append(row)
    return rows


def report_targets(rows: list[dict], args, seconds: float) -> str:
    columns = [*targets.target_width_methods(), "truncated cca"]
    widths = " ".join(f"{w:g}" for w in args.target_widths)
    lines = [f"# Merging two x1 MLPs into narrower widths ({args.data})", "",
             f"Regenerate: `python benchmarks/width_check.py --target-widths {widths} --pairs "
             f"{args.pairs} --epochs {args.epochs} --data {args.data} --out "
             f"benchmarks/results/target_width.md` ({seconds / 60:.1f} min on this machine).", "",
             f"{args.pairs} pairs of x1 MLPs (hidden [128, 128], seeds 2k and 2k + 1), merged "
             "into each width multiplier (`target_width`, hidden = round(128 w)) at the "
             "methods' defaults; *truncated cca*: the full-width cca merge with the units beyond "
             "the target width dropped (the trivial baseline). Mean test accuracy (%) over the "
             "pairs; the endpoints average "
             f"{np.mean([r[c] for r in rows for c in ('a', 'b')]):.2f}. At N = 2 gcca's maps "
             "and loadings are cca's, so their columns agree.", "",
             "| width | hidden | " + " | ".join(columns) + " |", "|---" * (2 + len(columns)) + "|"]
    for width in args.target_widths:
        part = [r for r in rows if r["width"] == width]
        lines.append(f"| {width:g} | {part[0]['hidden']} | " + " | ".join(
            f"{np.mean([r[c] for r in part]):.2f}" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def report(rows: list[dict], args, seconds: float) -> str:
    methods = mixed_width_methods()
    if args.arch == "mlp":
        command = f"--pairs {args.pairs} --epochs {args.epochs} --data {args.data}"
        models = ("MLPs", "x1 hidden [128, 128] seed k, x2 hidden [256, 256] seed 100 + k",
                  "BatchNorm-free MLPs")
    else:
        command = f"--arch {args.arch} --pairs {args.pairs}"
        models = (args.arch, f"the reproduction's x1 {args.arch} seed k and an x2 seed 100 + k, "
                  f"both {args.epochs} epochs on its default data", "the default BatchNorm "
                  "policy")
    lines = [f"# Merging x1 and x2 {models[0]} into either width ({args.data})", "",
             f"Regenerate: `python benchmarks/width_check.py {command}` ({seconds / 60:.1f} min "
             "on this machine).", "",
             f"{args.pairs} pairs ({models[1]}), every method at its defaults, {models[2]}; "
             "test accuracy (%).",
             "", READING[args.arch == "mlp"] + " "
             "At N = 2 gcca's maps are cca's exactly (ccamerge/methods/gcca.py), so their rows "
             "agree to the image; the comparison between them is only a check.", ""]
    for target in ("x1", "x2"):
        part = [r for r in rows if r["target"] == target]
        lines += [f"## Merged into {target}", "",
                  "| | " + " | ".join(["x1", "x2", *methods]) + " |",
                  "|---" * (3 + len(methods)) + "|",
                  "| mean accuracy | " + " | ".join(f"{np.mean([r[c] for r in part]):.2f}"
                                                   for c in ["x1", "x2", *methods]) + " |", "",
                  "| paired difference | mean | 95% interval | wins |", "|---|---|---|---|"]
        comparisons = [(m, "target model") for m in methods] + list(itertools.combinations(
            methods, 2))
        for a, b in comparisons:
            diffs = [r[a] - r[b] for r in part]
            mean, low, high = interval(diffs)
            wins = sum(d > 0 for d in diffs)
            lines.append(f"| {a} - {b} | {mean:+.2f} | [{low:+.2f}, {high:+.2f}] | "
                         f"{wins}/{len(diffs)} |")
        lines.append("")
    lines += ["Per pair:", "", "| pair | target | x1 | x2 | " + " | ".join(methods) + " |",
              "|---" * (4 + len(methods)) + "|"]
    lines += [f"| {r['pair']} | {r['target']} | {r['x1']:.2f} | {r['x2']:.2f} | "
              + " | ".join(f"{r[m]:.2f}" for m in methods) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--data", default="digits")
    parser.add_argument("--arch", choices=["mlp", "vgg", "resnet20"], default="mlp",
                        help="vgg/resnet20: the reproduction's pools and data (--results, --cache)")
    parser.add_argument("--results", type=Path, default=ROOT / "results" / "default")
    parser.add_argument("--cache", type=Path, default=ROOT / "cache")
    parser.add_argument("--target-widths", type=float, nargs="+", default=None,
                        help="merge pairs of x1 models into these width multipliers instead")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    start = time.time()
    name = ("target_width.md" if args.target_widths else
            "width_check.md" if args.arch == "mlp" else f"width_check_{args.arch}.md")
    args.out = args.out or ROOT / "results" / name
    if args.target_widths:
        text = report_targets(run_targets(args), args, time.time() - start)
    else:
        text = report(run(args), args, time.time() - start)
    args.out.write_text(text)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
