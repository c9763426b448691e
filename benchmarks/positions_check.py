"""Do cheaper statistics (a subset of each map's positions, bfloat16 products) change CCA merges?

    python benchmarks/positions_check.py [--variants 0.5 0.25 0.125 16 4 bfloat16] [--pool 4]
        [--seeds 0 1 2] [--gammas default selected] [--out benchmarks/results/positions_check.md]

Trains (or reuses from ``benchmarks/cache/positions_check``, with the merges already done)
pools of ``--pool`` VGG and ResNet20 models (x1) on the reproduction's default data
(Fashion-MNIST at 14x14 px, the same 4000 training images, 6 and 3 epochs, seeds 0..pool-1;
``reproduce.py``'s ``default`` profile),
then merges every subset of 2..pool models with CCA (BatchNorm reset on) from statistics of the
same 1000 training images: once with every position of every map in float32 products, once per
variant (a fraction of each map's positions per image, or a count, per position seed; or
``bfloat16``: every position, products in bfloat16, ``collect_statistics(products=...)``, one
run: it has no seed). ``--gammas``: CCA's default
options, and/or the gamma the reproduction selected on held-out data for these pools
(``benchmarks/results/default/selected.csv``, setting "same", x1: the pools' first models are
the reproduction's, trained with the same seeds and data). As a yardstick of how much a merge
moves when its statistics change at all, ``resample`` uses every position of another random
1000-image sample (one per seed). Test accuracy on the profile's fixed 2000 test images.

Reported per gamma, variant and architecture: the paired difference (variant - all positions)
in accuracy points per subset, averaged over the position seeds; its mean over the subsets with
a 95% t interval, the extremes and the standard deviation of single-seed differences (the
speed is measured on the paper's shapes: ``cost_levers.py``, ``cost.py --paper``). Subsets
share models, so the interval is a guide, not an exact test. A variant qualifies as a default
when the lower end of its interval is above -0.2 points for both architectures and both gammas.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from reproduce import PROFILES, epochs_for, split_data
from scipy import stats as scipy_stats

from ccamerge.api import resolve_spec, score_merge, subsample
from ccamerge.io import load_model
from ccamerge.stats import collect_statistics
from ccamerge.train import train_zoo

MARGIN = 0.2  # accuracy points a default may cost at most (lower end of the 95% interval)


PRODUCT_VARIANTS = ("bfloat16",)  # variants that change the products' precision, not positions


def parse_variant(text: str) -> int | float | str:
    """``"0.25"`` -> 0.25 (a fraction), ``"16"`` -> 16 (positions per image), ``"bfloat16"``
    (every position, bfloat16 products)."""
    if text in PRODUCT_VARIANTS:
        return text
    return float(text) if "." in text else int(text)


def variant_runs(variants: list, seeds: list[int]) -> list[tuple]:
    """``(variant, seed)`` of every merge of a subset: every position (None), each positions
    variant per seed, each products variant once, ``resample`` per seed."""
    runs = [(None, 0)]
    for variant in variants:
        runs += [(variant, seeds[0])] if variant in PRODUCT_VARIANTS else \
            [(variant, seed) for seed in seeds]
    return runs + [("resample", seed) for seed in seeds]


def train_pool(arch: str, data, profile: dict, size: int, cache: Path) -> list:
    rows = train_zoo(arch, data, list(range(size)), cache, split="same", width=1.0,
                     epochs=epochs_for(arch, "same", profile), progress=lambda f, m: None)
    print(f"{arch}: test accuracy " + ", ".join(f"{r['accuracy']:.1f}" for r in rows),
          file=sys.stderr, flush=True)
    return [load_model(r["path"]) for r in rows]


def selected_options(arch: str, path: Path) -> dict:
    """CCA options the reproduction selected for ``arch`` x1, setting "same"."""
    with path.open() as f:
        for row in csv.DictReader(f):
            if (row["arch"], float(row["width"]), row["setting"], row["method"]) == \
                    (arch, 1.0, "same", "cca"):
                return json.loads(row["selected"])
    raise SystemExit(f"no selected CCA options for {arch} x1 'same' in {path}")


def merged_accuracy(models, data, x_stats, positions, seed: int, options: dict,
                    products: str = "float32") -> tuple[float, float]:
    """(test accuracy of the CCA merge, seconds of its statistics pass)."""
    spec = resolve_spec(models, x_stats)
    start = time.perf_counter()
    stats = collect_statistics(models, spec, x_stats, positions=positions, seed=seed,
                               products=products)
    seconds = time.perf_counter() - start
    scores = score_merge(models, "cca", options, stats, spec, x_stats, data.x_test, data.y_test,
                         reference=0, bn_reset=True)
    return scores["accuracy"], seconds


class Done:
    """Rows of finished merges in ``cache/rows.jsonl``, so an interrupted run resumes."""

    def __init__(self, folder: Path):
        self.path = folder / "rows.jsonl"
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        self.rows = {self.key(r): r for r in map(json.loads, lines)}

    @staticmethod
    def key(row: dict) -> str:
        return json.dumps([row["arch"], row["gamma"], list(row["subset"]), row["variant"],
                           row["seed"]])

    def get(self, **key):
        return self.rows.get(self.key(key))

    def add(self, row: dict) -> None:
        self.rows[self.key(row)] = row
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def run_arch(arch: str, data, profile: dict, args, samples: dict) -> list[dict]:
    """One row per gamma, subset, variant (``None`` = all positions) and seed."""
    models = train_pool(arch, data, profile, args.pool, Path(args.cache))
    done = Done(Path(args.cache))
    gammas = {g: {} if g == "default" else selected_options(arch, Path(args.selected))
              for g in args.gammas}
    rows = []
    for (label, options), n in itertools.product(gammas.items(), range(2, args.pool + 1)):
        for subset in itertools.combinations(range(args.pool), n):
            members = [models[i] for i in subset]
            for variant, seed in variant_runs(args.variants, args.seeds):
                row = done.get(arch=arch, gamma=label, subset=subset, variant=variant, seed=seed)
                if row is None:
                    x = samples[seed + 1] if variant == "resample" else samples[0]
                    low = variant in PRODUCT_VARIANTS
                    positions = None if variant == "resample" or low else variant
                    accuracy, seconds = merged_accuracy(members, data, x, positions, seed,
                                                        options, variant if low else "float32")
                    row = {"arch": arch, "gamma": label, "options": options, "N": n,
                           "subset": subset, "variant": variant, "seed": seed,
                           "accuracy": accuracy, "seconds": seconds}
                    done.add(row)
                rows.append({**row, "subset": tuple(row["subset"])})
            base = next(r for r in rows[::-1] if r["variant"] is None)
            print(f"{arch} {label} {subset}: all positions {base['accuracy']:.2f}",
                  file=sys.stderr, flush=True)
    return rows


def interval(diffs: np.ndarray) -> tuple[float, float, float]:
    """(mean, low, high) of a 95% t interval of the mean of ``diffs``."""
    mean = float(diffs.mean())
    if len(diffs) < 2:
        return mean, float("nan"), float("nan")
    half = scipy_stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs))
    return mean, mean - float(half), mean + float(half)


def summarise(rows: list[dict], variants: list) -> list[dict]:
    """Per gamma, variant and architecture: differences against all positions, paired by
    subset and averaged over the seeds."""
    base = {(r["arch"], r["gamma"], r["subset"]): r for r in rows if r["variant"] is None}
    out = []
    for gamma, variant in itertools.product(dict.fromkeys(r["gamma"] for r in rows), variants):
        for arch in dict.fromkeys(r["arch"] for r in rows):
            mine = [r for r in rows if (r["gamma"], r["variant"], r["arch"]) == (gamma, variant,
                                                                                arch)]
            single = {r["subset"]: [] for r in mine}
            for r in mine:
                single[r["subset"]].append(r["accuracy"] - base[(arch, gamma,
                                                                 r["subset"])]["accuracy"])
            diffs = np.array([np.mean(d) for d in single.values()])
            mean, low, high = interval(diffs)
            out.append({"gamma": f"{gamma} {json.dumps(mine[0]['options'])}", "variant": variant,
                        "arch": arch, "merges": len(mine), "mean_diff": round(mean, 2),
                        "ci_low": round(low, 2), "ci_high": round(high, 2),
                        "min": round(float(diffs.min()), 2), "max": round(float(diffs.max()), 2),
                        "single_seed_sd": round(float(np.std(np.concatenate(
                            [np.asarray(d) for d in single.values()]), ddof=1)), 2)})
    return out


def verdict(summary: list[dict]) -> str:
    """Which variants qualify (lower interval end above -MARGIN everywhere)."""
    tried = [v for v in dict.fromkeys(r["variant"] for r in summary) if v != "resample"]
    good = [v for v in tried
            if all(r["ci_low"] >= -MARGIN for r in summary if r["variant"] == v)]
    if not good:
        defaults = [text for kinds, text in (
            ([v for v in tried if v not in PRODUCT_VARIANTS], "every position (positions=None)"),
            ([v for v in tried if v in PRODUCT_VARIANTS], 'float32 products (products="float32")'),
        ) if kinds]
        return (f"No variant keeps the lower end of the 95% interval above -{MARGIN} points for "
                "both architectures and gammas: the defaults stay " + " and ".join(defaults)
                + ".")
    return ("Variants within the margin for both architectures and gammas: "
            + ", ".join(map(str, good)) + ".")


def report(rows, summary, args, profile, x_stats, seconds: float) -> str:
    columns = list(summary[0])
    command = " ".join(["python benchmarks/positions_check.py", *sys.argv[1:]])
    lines = ["# Cheaper statistics (a subset of positions, bfloat16 products): effect on CCA "
             "merges", "",
             f"`{command}`", "",
             f"Pools of {args.pool} models per architecture (x1), Fashion-MNIST at 14x14 px, "
             f"{profile['train']} training images (epochs {profile['epochs']}), every subset of "
             f"2..{args.pool} models merged with CCA (BatchNorm reset) from statistics of "
             f"{len(x_stats)} training images; test accuracy on {profile['test']} test images; "
             f"position seeds {args.seeds}. `resample`: every position of another "
             f"{len(x_stats)}-image statistics sample (one per seed), the yardstick. Run time "
             f"{seconds / 60:.0f} min.", "",
             "Difference in test accuracy (points, variant - all positions), per subset averaged "
             "over the seeds, then over the subsets (95% t interval); `single_seed_sd`: spread "
             "of one merge's difference:", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in summary]
    lines += ["", verdict(summary), "", "Accuracy with every position, per subset:", ""]
    lines += [f"- {r['arch']} {r['gamma']} {r['subset']}: {r['accuracy']:.2f}" for r in rows
              if r["variant"] is None]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", type=parse_variant,
                        default=[0.5, 0.25, 0.125, 16, 4])
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--gammas", nargs="+", choices=["default", "selected"],
                        default=["default", "selected"])
    parser.add_argument("--selected", default="benchmarks/results/default/selected.csv")
    parser.add_argument("--archs", nargs="+", default=["vgg", "resnet20"])
    parser.add_argument("--cache", default="benchmarks/cache/positions_check")
    parser.add_argument("--out", default="benchmarks/results/positions_check.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.time()
    profile = dict(PROFILES["default"])
    data, _held = split_data(profile)
    samples = {k: subsample(data.x_train, profile["stats"], k) for k in range(len(args.seeds) + 1)}
    rows = [row for arch in args.archs for row in run_arch(arch, data, profile, args, samples)]
    summary = summarise(rows, [*args.variants, "resample"])
    text = report(rows, summary, args, profile, samples[0], time.time() - started)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
