"""Reproduce the paper's protocol: merged accuracy vs number of models, per method and setting.

    python benchmarks/reproduce.py           # Fashion-MNIST (14 px, subsets), VGG + ResNet20, x1
    python benchmarks/reproduce.py --quick   # digits (minutes)
    python benchmarks/reproduce.py --gpu     # 28 px, all data, on a GPU (about 10 minutes)
    python benchmarks/reproduce.py --full    # widths x1..x8, N up to 8, all data

Pools of models trained from different seeds (cached in ``--cache``; a rerun reuses them) in
three settings: the same data, class-skewed 80/20 halves, Dirichlet(0.5) splits (a model that
sees a fraction of the data gets proportionally more epochs: the same number of steps).

Training length follows a plateau rule (:func:`plateau_epochs`): seed 0 of a pool is trained for
the profile's epochs, then twice as many, and so on, until doubling lowers its training loss by
less than ``PLATEAU_REL`` of it (or by less than ``PLATEAU_ABS``), or ``max_epochs`` is reached;
the pool is trained for the last budget tried. ``pools.csv`` reports each pool's epochs, training
loss and accuracy (on each model's own training part) and the trail of the rule.

N = 2 cells merge every pair of the pool (15 for 6 models); N >= 3 cells several random subsets.
Methods run under the library's default BatchNorm policy (``mapped``); ``cca paper`` and
``permute paper`` under the paper's handling (BatchNorm vectors transformed with the conv rows).
Hyperparameters (CCA's gamma, ZipIt's alpha and beta) are selected on a held-out slice of the
training set that no model trained on, never on the test set: once per pool on two models, or
for each N (``--gamma-per-n``: on the first N models).
``options.csv`` compares the official code's details (BatchNorm policy, stream statistics read
at the last block, base-model BatchNorm reset) for CCA at N = 2 on held-out data, paired over
pairs. Writes to ``--out``: ``accuracy.csv`` (one row per subset and method), ``barriers.csv``
(N = 2 interpolation), ``selected.csv`` (hyperparameters), ``pools.csv``, ``options.csv``,
``summary.md`` (with paired CCA - permutation differences and 95% t intervals) and
``plots.html``.
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
from ccamerge.api import interpolate, reset_base_models, resolve_spec, score_merge, subsample
from ccamerge.batchnorm import DEFAULT_POLICY, moment_batchnorms
from ccamerge.data import load_dataset, split_indices
from ccamerge.evaluate import evaluate_model, metrics_from_logits
from ccamerge.io import load_model
from ccamerge.methods import METHODS
from ccamerge.models import logits
from ccamerge.spec import with_stream_points
from ccamerge.stats import collect_statistics
from ccamerge.train import train_zoo

SETTINGS = ("same", "skewed", "dirichlet")
PLATEAU_REL, PLATEAU_ABS = 0.1, 0.01  # doubling the epochs lowers the training loss by less
PROFILES = {
    # data, image downsampling factor, train images (None = all), held-out images, test images
    # (None = all), starting epochs per arch and the plateau rule's cap, widths, settings, pool,
    # max N, subsets per N >= 3, statistics images, training images beside the held-out ones
    # when selecting hyperparameters, pairs in the held-out comparison of options
    "quick": dict(data="digits", downsample=1, train=None, holdout=0.2, test=None,
                  epochs={"vgg": 5, "resnet20": 3}, max_epochs=12, widths=[1],
                  settings=["same"], pool=3, max_n=3, subsets=1, stats=500,
                  select=500, option_pairs=1),
    # pools trained 10 or 20 epochs (3-7x the former default) within about 60 minutes on 2
    # cores: 14x14 images (2x2 average pooling), a 4000-image training subset, a fixed
    # 2000-image test subset; breadth (widths, split settings) moved to --full
    "default": dict(data="fashion-mnist", downsample=2, train=4000, holdout=1000, test=2000,
                    epochs={"vgg": 10, "resnet20": 10}, max_epochs={"vgg": 40, "resnet20": 20},
                    widths=[1],
                    settings=["same"], pool=6, max_n=4, subsets=3, stats=1000,
                    select=1000, option_pairs=6),
    # one modern GPU, about 10 minutes: 28 px, all data
    "gpu": dict(data="fashion-mnist", downsample=1, train=None, holdout=5000, test=None,
                epochs={"vgg": 10, "resnet20": 10}, max_epochs=40, widths=[1],
                settings=["same", "skewed"], pool=6, max_n=5, subsets=3, stats=5000,
                select=5000, option_pairs=6),
    "full": dict(data="fashion-mnist", downsample=1, train=None, holdout=5000, test=None,
                 epochs={"vgg": 15, "resnet20": 10}, max_epochs=160, widths=[1, 2, 4, 8],
                 settings=list(SETTINGS), pool=8, max_n=8, subsets=3, stats=5000, select=5000,
                 option_pairs=10),
}
OPTION_VARIANTS = {  # the official code's details, one at a time and together (CCA, N = 2)
    "paper": dict(bn_policy="paper"),
    "mapped": dict(bn_policy="mapped"),
    "paper last": dict(bn_policy="paper", stream_points="last"),
    "paper reset": dict(bn_policy="paper", reset_base_bn=True),
    "paper last reset": dict(bn_policy="paper", stream_points="last", reset_base_bn=True),
    "mapped last reset": dict(bn_policy="mapped", stream_points="last", reset_base_bn=True),
}
PAPER_POLICY = ("cca", "permute")  # methods also run under the paper's BatchNorm policy
TRAIN_DEVICE = "cpu"  # set by --device / --gpu


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


def epochs_for(arch: str, setting: str, profile: dict, base: int | None = None) -> int:
    """Each model of a split setting sees a fraction of the data; more epochs give it the same
    number of optimisation steps as a model trained on everything."""
    share = {"same": 1, "skewed": 2, "dirichlet": profile["pool"]}[setting]
    return (base or profile["epochs"][arch]) * share


def own_part(model, data):
    """The training images ``model`` was trained on (its recorded split part)."""
    split = model.info.get("split") or {"kind": "same"}
    if split.get("kind", "same") == "same":
        return data.x_train, data.y_train
    idx = split_indices(data.y_train, split["kind"], parts=split["parts"], part=split["part"],
                        seed=split.get("seed", 0))
    return data.x_train[idx], data.y_train[idx]


def training_scores(model, data) -> dict:
    """``{"loss", "accuracy"}`` on the model's own training part (eval mode)."""
    return evaluate_model(model, *own_part(model, data))


def train_pool(arch, width, setting, data, profile, cache: Path, seeds, base: int) -> list:
    rows = train_zoo(arch, data, list(seeds), cache / f"e{base}", split=setting, width=width,
                     epochs=epochs_for(arch, setting, profile, base), device=TRAIN_DEVICE,
                     progress=lambda f, m: None)
    return [load_model(r["path"]) for r in rows]


def reproduction_settings(results: Path, arch: str) -> tuple[int, dict]:
    """``(epochs, cca options)`` the reproduction in ``results`` chose for the x1 same-data pool
    of ``arch`` (its plateau rule's epochs and the gamma selected on held-out images)."""
    with (results / "pools.csv").open() as handle:
        epochs = next(int(r["epochs"]) for r in csv.DictReader(handle)
                      if r["arch"] == arch and float(r["width"]) == 1.0 and r["setting"] == "same")
    with (results / "selected.csv").open() as handle:
        options = next(json.loads(r["selected"]) for r in csv.DictReader(handle)
                       if r["arch"] == arch and float(r["width"]) == 1.0
                       and r["setting"] == "same" and r["method"] == "cca")
    return epochs, options


def max_epochs(arch: str, profile: dict) -> int:
    """The plateau rule's cap for ``arch``: one number for every arch, or one per arch."""
    cap = profile["max_epochs"]
    return cap[arch] if isinstance(cap, dict) else cap


def plateau_epochs(arch, width, setting, data, profile, cache: Path) -> tuple[int, list]:
    """Epochs (before the split's share) at which seed 0's training loss plateaus: doubling
    from the profile's epochs until it lowers the loss by less than ``PLATEAU_REL`` of it or
    ``PLATEAU_ABS``, at most ``max_epochs``. Returns the budget and ``[(epochs, loss), ...]``."""
    base = profile["epochs"][arch]
    trail = [(base, training_scores(train_pool(arch, width, setting, data, profile, cache, [0],
                                               base)[0], data)["loss"])]
    while 2 * base <= max_epochs(arch, profile):
        loss = training_scores(train_pool(arch, width, setting, data, profile, cache, [0],
                                          2 * base)[0], data)["loss"]
        trail.append((2 * base, loss))
        if trail[-2][1] - loss < max(PLATEAU_REL * trail[-2][1], PLATEAU_ABS):
            break
        base *= 2
    return trail[-1][0], trail


def pool(arch, width, setting, data, profile, cache: Path, pool_writer) -> list:
    base, trail = plateau_epochs(arch, width, setting, data, profile, cache)
    models = train_pool(arch, width, setting, data, profile, cache, range(profile["pool"]), base)
    scores = [training_scores(m, data) for m in models]
    pool_writer.writerow({"arch": arch, "width": width, "setting": setting, "epochs": base,
                          "steps_epochs": epochs_for(arch, setting, profile, base),
                          "train_loss": round(float(np.mean([s["loss"] for s in scores])), 4),
                          "train_accuracy": round(float(np.mean([s["accuracy"]
                                                                 for s in scores])), 2),
                          "trail": json.dumps([[e, round(v, 4)] for e, v in trail])})
    log(f"pool {arch} x{width:g} {setting}: {base} epochs, training loss "
        f"{np.mean([s['loss'] for s in scores]):.3f}, accuracy "
        f"{np.mean([s['accuracy'] for s in scores]):.1f}; trail {trail}")
    return models


def select(models, data, held, method: str, profile: dict) -> dict:
    """Best options for ``method`` on the held-out slice (merging ``models``)."""
    fit = profile["select"]
    selection = dataclasses.replace(data, x_train=data.x_train[:fit], y_train=data.y_train[:fit])
    result = sweep(models, selection, method, validation=held)
    return result["best"]


def merge_subset(models, data, x_stats, methods: dict[str, dict]) -> dict[str, float]:
    """Test accuracy of each method on one subset (statistics collected once, all pairs);
    ``"<method> paper"`` runs ``<method>`` under the paper's BatchNorm policy, the others
    under the library's default (``mapped``)."""
    spec = resolve_spec(models, x_stats)
    stats = collect_statistics(models, spec, x_stats, pairs="all",
                               self_only=moment_batchnorms(models[0]))  # the mapped reset's
    out = {}
    for label, options in methods.items():
        method, _, policy = label.partition(" ")
        out[label] = score_merge(models, method, options, stats, spec, x_stats, data.x_test,
                                 data.y_test, reference=0, bn_reset=True,
                                 bn_policy=policy or DEFAULT_POLICY)["accuracy"]
    return out


def compare_options(models, pairs, held, x_stats, options: dict, key: dict, writer) -> None:
    """CCA at N = 2 under each of ``OPTION_VARIANTS``, scored on the held-out images."""
    reset = None
    for pair in pairs:
        for name, variant in OPTION_VARIANTS.items():
            members = [models[i] for i in pair]
            if variant.get("reset_base_bn"):
                reset = reset or reset_base_models(models, x_stats)
                members = [reset[i] for i in pair]
            spec = resolve_spec(members, x_stats)
            stats = collect_statistics(members, with_stream_points(
                spec, variant.get("stream_points", "pooled")), x_stats, pairs="all",
                self_only=moment_batchnorms(members[0], variant["bn_policy"]))
            score = score_merge(members, "cca", options, stats, spec, x_stats, held[0], held[1],
                                reference=0, bn_reset=True,
                                bn_policy=variant["bn_policy"])["accuracy"]
            writer.writerow({**key, "subset": "-".join(map(str, pair)), "variant": name,
                             "held_out_accuracy": round(score, 3)})


def subsets_for(n: int, size: int, profile: dict, rng: random.Random) -> list[tuple]:
    """Every pair at N = 2; ``subsets`` random subsets for larger N."""
    combos = list(itertools.combinations(range(size), n))
    return combos if n == 2 else rng.sample(combos, min(profile["subsets"], len(combos)))


def run_pool(arch, width, setting, data, held, profile, cache, writers, gamma_per_n=False):
    models = pool(arch, width, setting, data, profile, cache, writers["pools"])
    test_logits = [logits(m, data.x_test) for m in models]
    key = {"data": profile["data"], "arch": arch, "width": width, "setting": setting}

    def chosen_for(n: int) -> dict:
        options = {m: {} for m in METHODS}
        for method in ("cca", "zipit"):
            options[method] = select(models[:n] if gamma_per_n else models[:2], data, held,
                                     method, profile)
            writers["selected"].writerow({**key, "N": n if gamma_per_n else "all",
                                          "method": method,
                                          "selected": json.dumps(options[method])})
        return options | {f"{m} paper": options[m] for m in PAPER_POLICY}

    options = chosen_for(2)
    x_stats = subsample(data.x_train, profile["stats"], 0)
    pairs = list(itertools.combinations(range(len(models)), 2))[:profile["option_pairs"]]
    compare_options(models, pairs, held, x_stats, options["cca"], key, writers["options"])
    rng = random.Random(0)
    for n in range(2, profile["max_n"] + 1):
        if gamma_per_n and n > 2:
            options = chosen_for(n)
        for subset in subsets_for(n, len(models), profile, rng):
            members = [models[i] for i in subset]
            base = [metrics_from_logits(test_logits[i], data.y_test)["accuracy"] for i in subset]
            ensemble = metrics_from_logits(torch.stack([test_logits[i] for i in subset]).mean(0),
                                           data.y_test)["accuracy"]
            scores = {"base": float(np.mean(base)), "ensemble": ensemble,
                      **merge_subset(members, data, x_stats, options)}
            for method, accuracy in scores.items():
                writers["accuracy"].writerow({**key, "N": n, "subset": "-".join(map(str, subset)),
                                              "method": method, "accuracy": round(accuracy, 3)})
        log(f"  N={n} done")
    for method in (m for m in METHODS if not METHODS[m].joint):
        curve = interpolate(models[0], models[1], data, method, steps=6,
                            stats_samples=profile["stats"], **options[method])
        writers["barriers"].writerow({**key, "method": method,
                                      "barrier": round(curve["barrier"], 4),
                                      "lambdas": json.dumps(curve["lambdas"]),
                                      "loss": json.dumps([round(v, 4) for v in curve["loss"]]),
                                      "accuracy": json.dumps([round(v, 2)
                                                              for v in curve["accuracy"]])})


def open_csv(path: Path, fields: list[str]):
    handle = path.open("w", newline="")
    writer = csv.DictWriter(handle, fieldnames=fields)
    writer.writeheader()
    return handle, writer


FIELDS = {
    "accuracy": ["data", "arch", "width", "setting", "N", "subset", "method", "accuracy"],
    "barriers": ["data", "arch", "width", "setting", "method", "barrier", "lambdas", "loss",
                 "accuracy"],
    "selected": ["data", "arch", "width", "setting", "N", "method", "selected"],
    "pools": ["arch", "width", "setting", "epochs", "steps_epochs", "train_loss",
              "train_accuracy", "trail"],
    "options": ["data", "arch", "width", "setting", "subset", "variant", "held_out_accuracy"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    profiles = parser.add_mutually_exclusive_group()
    profiles.add_argument("--quick", action="store_true", help="digits, minutes")
    profiles.add_argument("--gpu", action="store_true", help="28 px, all data, one GPU")
    profiles.add_argument("--full", action="store_true", help="x1..x8, more models, all data")
    parser.add_argument("--archs", nargs="+", default=["vgg", "resnet20"])
    parser.add_argument("--widths", nargs="+", type=float, default=None)
    parser.add_argument("--settings", nargs="+", default=None, choices=SETTINGS)
    parser.add_argument("--gamma-per-n", action="store_true",
                        help="select CCA's gamma (and ZipIt's options) for each N on the first N "
                        "models, as the official code does (default: once per pool at N = 2)")
    parser.add_argument("--device", default=None,
                        help="where the pools train (default: cuda for --gpu, else cpu)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--cache", default="benchmarks/cache")
    args = parser.parse_args()
    name = next((n for n in ("quick", "gpu", "full") if getattr(args, n)), "default")
    profile = dict(PROFILES[name])
    profile["widths"] = args.widths or profile["widths"]
    profile["settings"] = args.settings or profile["settings"]
    global TRAIN_DEVICE
    TRAIN_DEVICE = args.device or ("cuda" if name == "gpu" else "cpu")
    out = Path(args.out or f"benchmarks/results/{name}")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    data, held = split_data(profile)
    log(f"{name}: {profile['data']}, {len(data.y_train)} training images, {len(held[1])} held out, "
        f"{len(data.y_test)} test")
    files = {kind: open_csv(out / f"{kind}.csv", fields) for kind, fields in FIELDS.items()}
    writers = {kind: writer for kind, (_handle, writer) in files.items()}
    started = time.time()
    for arch in args.archs:
        for width in profile["widths"]:
            for setting in profile["settings"]:
                run_pool(arch, float(width), setting, data, held, profile,
                         Path(args.cache) / name, writers, gamma_per_n=args.gamma_per_n)
                for handle, _ in files.values():
                    handle.flush()
    for handle, _ in files.values():
        handle.close()
    (out / "run.json").write_text(json.dumps({
        "profile": name, **profile, "seconds": round(time.time() - started),
        "gamma_per_n": args.gamma_per_n, "plateau": {"rel": PLATEAU_REL, "abs": PLATEAU_ABS},
        "dataset": data.name, "image_size": data.image_size,
        "train_images": len(data.y_train), "held_out_images": len(held[1]),
        "test_images": len(data.y_test), "archs": args.archs}, indent=1))
    from report import write_report  # benchmarks/ is on sys.path when run as a script

    readme = Path("README.md") if name == "default" and not args.out else None
    write_report(out, readme)
    log(f"done in {time.time() - started:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
