"""Reproduce the paper's protocol: merged accuracy vs number of models, per method and setting.

    python benchmarks/reproduce.py           # Fashion-MNIST (14 px, subsets), VGG + ResNet20, x1 x2
    python benchmarks/reproduce.py --quick   # digits (minutes)
    python benchmarks/reproduce.py --full    # widths x1..x8, N up to 6, more data and epochs

Pools of models trained from different seeds (cached in ``--cache``; a rerun reuses them) in
three settings: the same data, class-skewed 80/20 halves, Dirichlet(0.5) splits (a model that
sees a fraction of the data gets proportionally more epochs: the same number of steps). For each
N = 2..max, several random subsets of the pool are merged with every method. Hyperparameters
(CCA's gamma, ZipIt's alpha and beta) are selected once per pool on a held-out slice of the
training set that no model trained on, never on the test set. Writes to ``--out``:
``accuracy.csv`` (one row per subset and method), ``barriers.csv`` (N = 2 interpolation),
``selected.csv`` (hyperparameters), ``summary.md`` and ``plots.html``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ccamerge.analysis.diagnose import sweep
from ccamerge.api import interpolate, resolve_spec, score_merge, subsample
from ccamerge.data import load_dataset
from ccamerge.evaluate import metrics_from_logits
from ccamerge.io import load_model
from ccamerge.methods import METHODS
from ccamerge.models import logits
from ccamerge.stats import collect_statistics
from ccamerge.train import train_zoo

SETTINGS = ("same", "skewed", "dirichlet")
PROFILES = {
    # data, image downsampling factor, train images (None = all), held-out images, test images
    # (None = all), epochs per arch, widths, pool, max N, subsets per N, statistics images,
    # training images beside the held-out ones when selecting hyperparameters
    "quick": dict(data="digits", downsample=1, train=None, holdout=0.2, test=None,
                  epochs={"vgg": 20, "resnet20": 10}, widths=[1, 2], pool=6, max_n=5, subsets=3,
                  stats=1000, select=2000),
    # sized to finish in under 30 minutes on 2 cores: 14x14 images (2x2 average pooling), a
    # 4000-image training subset, a fixed 2000-image test subset
    "default": dict(data="fashion-mnist", downsample=2, train=4000, holdout=1000, test=2000,
                    epochs={"vgg": 6, "resnet20": 3}, widths=[1, 2], pool=6, max_n=5, subsets=2,
                    stats=1000, select=1000),
    "full": dict(data="fashion-mnist", downsample=1, train=None, holdout=5000, test=None,
                 epochs={"vgg": 15, "resnet20": 10}, widths=[1, 2, 4, 8], pool=8, max_n=8,
                 subsets=3, stats=5000, select=5000),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def split_data(profile: dict):
    """(training dataset the models see, held-out inputs and labels for selection), after the
    profile's downsampling and test subset."""
    data = load_dataset(profile["data"])
    if profile["downsample"] > 1:
        k = profile["downsample"]
        data = dataclasses.replace(data, name=f"{data.name}-{data.image_size // k}px",
                                   x_train=F.avg_pool2d(data.x_train, k),
                                   x_test=F.avg_pool2d(data.x_test, k))
    if profile["test"] is not None:
        keep = np.sort(np.random.default_rng(1).permutation(len(data.y_test))[:profile["test"]])
        data = dataclasses.replace(data, x_test=data.x_test[keep], y_test=data.y_test[keep])
    n = len(data.y_train)
    order = np.random.default_rng(0).permutation(n)
    holdout = profile["holdout"]
    n_hold = int(round(holdout * n)) if isinstance(holdout, float) else holdout
    hold, rest = order[:n_hold], order[n_hold:]
    train = np.sort(rest if profile["train"] is None else rest[:profile["train"]])
    seen = dataclasses.replace(data, x_train=data.x_train[train], y_train=data.y_train[train])
    return seen, (data.x_train[hold], data.y_train[hold])


def epochs_for(arch: str, setting: str, profile: dict) -> int:
    """Each model of a split setting sees a fraction of the data; more epochs give it the same
    number of optimisation steps as a model trained on everything."""
    share = {"same": 1, "skewed": 2, "dirichlet": profile["pool"]}[setting]
    return profile["epochs"][arch] * share


def pool(arch: str, width: float, setting: str, data, profile: dict, cache: Path) -> list:
    rows = train_zoo(arch, data, list(range(profile["pool"])), cache,
                     split=setting, width=width, epochs=epochs_for(arch, setting, profile),
                     progress=lambda f, m: None)
    log(f"pool {arch} x{width:g} {setting}: " + ", ".join(f"{r['accuracy']:.1f}" for r in rows))
    return [load_model(r["path"]) for r in rows]


def select(models, data, held, method: str, profile: dict) -> dict:
    """Best options for ``method`` on the held-out slice (first two models of the pool)."""
    fit = profile["select"]
    selection = dataclasses.replace(data, x_train=data.x_train[:fit], y_train=data.y_train[:fit])
    result = sweep(models[:2], selection, method, validation=held)
    return result["best"]


def merge_subset(models, data, x_stats, methods: dict[str, dict]) -> dict[str, float]:
    """Test accuracy of each method on one subset (statistics collected once, all pairs)."""
    spec = resolve_spec(models, x_stats)
    stats = collect_statistics(models, spec, x_stats, pairs="all")
    out = {}
    for method, options in methods.items():
        out[method] = score_merge(models, method, options, stats, spec, x_stats, data.x_test,
                                  data.y_test, reference=0, bn_reset=True)["accuracy"]
    return out


def run_pool(arch, width, setting, data, held, profile, cache, writer, barrier_writer, chosen):
    models = pool(arch, width, setting, data, profile, cache)
    test_logits = [logits(m, data.x_test) for m in models]
    options = {m: {} for m in METHODS}
    for method in ("cca", "zipit"):
        options[method] = select(models, data, held, method, profile)
        chosen.writerow({"arch": arch, "width": width, "setting": setting, "method": method,
                         "selected": json.dumps(options[method])})
    x_stats = subsample(data.x_train, profile["stats"], 0)
    rng = random.Random(0)
    key = {"data": profile["data"], "arch": arch, "width": width, "setting": setting}
    for n in range(2, profile["max_n"] + 1):
        combos = list(itertools.combinations(range(len(models)), n))
        for subset in rng.sample(combos, min(profile["subsets"], len(combos))):
            members = [models[i] for i in subset]
            base = [metrics_from_logits(test_logits[i], data.y_test)["accuracy"] for i in subset]
            ensemble = metrics_from_logits(torch.stack([test_logits[i] for i in subset]).mean(0),
                                           data.y_test)["accuracy"]
            scores = {"base": float(np.mean(base)), "ensemble": ensemble,
                      **merge_subset(members, data, x_stats, options)}
            for method, accuracy in scores.items():
                writer.writerow({**key, "N": n, "subset": "-".join(map(str, subset)),
                                 "method": method, "accuracy": round(accuracy, 3)})
        log(f"  N={n} done")
    for method in (m for m in METHODS if not METHODS[m].joint):
        curve = interpolate(models[0], models[1], data, method, steps=6,
                            stats_samples=profile["stats"], **options[method])
        barrier_writer.writerow({**key, "method": method, "barrier": round(curve["barrier"], 4),
                                 "lambdas": json.dumps(curve["lambdas"]),
                                 "loss": json.dumps([round(v, 4) for v in curve["loss"]]),
                                 "accuracy": json.dumps([round(v, 2) for v in curve["accuracy"]])})


def open_csv(path: Path, fields: list[str]):
    handle = path.open("w", newline="")
    writer = csv.DictWriter(handle, fieldnames=fields)
    writer.writeheader()
    return handle, writer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, minutes")
    parser.add_argument("--full", action="store_true", help="x1..x8, more models, all data")
    parser.add_argument("--archs", nargs="+", default=["vgg", "resnet20"])
    parser.add_argument("--widths", nargs="+", type=float, default=None)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--out", default=None)
    parser.add_argument("--cache", default="benchmarks/cache")
    args = parser.parse_args()
    name = "quick" if args.quick else "full" if args.full else "default"
    profile = dict(PROFILES[name])
    profile["widths"] = args.widths or profile["widths"]
    out = Path(args.out or f"benchmarks/results/{name}")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    data, held = split_data(profile)
    log(f"{name}: {profile['data']}, {len(data.y_train)} training images, {len(held[1])} held out, "
        f"{len(data.y_test)} test")
    files = [open_csv(out / "accuracy.csv", ["data", "arch", "width", "setting", "N", "subset",
                                             "method", "accuracy"]),
             open_csv(out / "barriers.csv", ["data", "arch", "width", "setting", "method",
                                             "barrier", "lambdas", "loss", "accuracy"]),
             open_csv(out / "selected.csv", ["arch", "width", "setting", "method", "selected"])]
    started = time.time()
    for arch in args.archs:
        for width in profile["widths"]:
            for setting in args.settings:
                run_pool(arch, float(width), setting, data, held, profile, Path(args.cache) / name,
                         files[0][1], files[1][1], files[2][1])
                for handle, _ in files:
                    handle.flush()
    for handle, _ in files:
        handle.close()
    (out / "run.json").write_text(json.dumps({
        "profile": name, **profile, "seconds": round(time.time() - started),
        "dataset": data.name, "image_size": data.image_size,
        "train_images": len(data.y_train), "held_out_images": len(held[1]),
        "test_images": len(data.y_test), "archs": args.archs, "settings": args.settings},
        indent=1))
    from report import write_report  # benchmarks/ is on sys.path when run as a script

    readme = Path("README.md") if name == "default" and not args.out else None
    write_report(out, readme)
    log(f"done in {time.time() - started:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
