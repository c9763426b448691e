"""gcca (one shared space for all models) against cca with every choice of reference.

    python benchmarks/gcca_check.py [--archs vgg resnet20] [--pool 6] [--max-n 5]
        [--results benchmarks/results/default] [--cache benchmarks/cache]
        [--out benchmarks/results/gcca_check.md] [--reuse previous.csv]

Uses the reproduction's pools (``reproduce.py``'s ``default`` profile: Fashion-MNIST at 14x14
px, 4000 training images, each pool trained for the epochs its plateau rule chose, read from
``--results``/pools.csv; reused from ``--cache`` or trained there) and CCA's gamma selected for
each pool on held-out images (``--results``/selected.csv), given to both methods. Every subset of
2..max-n models of the first ``--pool`` seeds is merged with cca and with gcca (the library's
default BatchNorm policy, BatchNorm reset on) once with each member as the reference, from one
set of statistics (1000 training images, every pair). Each merge is scored on the profile's
held-out slice (1000 training images no model saw) and on its 2000 test images.

Per subset: cca's test accuracy averaged over the references (``mean``), with the reference whose
merge scored best on the held-out slice (``best``, the selection a user can make) and the best on
the test set itself (``oracle``, an upper bound that peeks at the test set); gcca's with the
subset's first model as reference (``first``: no selection), ``mean`` and ``best`` likewise.
Reported per architecture and N: paired differences gcca - cca over the subsets, mean and 95% t
interval (subsets share models, so the interval is a guide, not an exact test) and wins.

Reference-free variants, in a second table: ``gcca consensus`` (``consensus_units=True``, merged
once per subset: its result does not depend on the reference) and ``gcca nearest`` (gcca with
the member whose units are nearest the consensus units as reference, a choice made from the
statistics alone; its scores are gcca's rows for that reference). ``--reuse`` keeps a previous
run's rows (same pools and settings) and merges only what is missing.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
import time
from pathlib import Path

import numpy as np
from reproduce import PROFILES, reproduction_settings, split_data
from reproduce import train_pool as reproduction_pool
from scipy import stats as scipy_stats

from ccamerge.api import align, average_aligned, resolve_spec, subsample
from ccamerge.batchnorm import (
    DEFAULT_POLICY,
    mapped_targets,
    moment_batchnorms,
    output_moments,
    set_moments,
    written_points,
)
from ccamerge.evaluate import evaluate_model
from ccamerge.stats import collect_statistics

# name: (method, options, merged once per subset: the construction is reference-free)
METHODS = {"cca": ("cca", {}, False), "gcca": ("gcca", {}, False),
           "gcca consensus": ("gcca", {"consensus_units": True}, True)}
COMPARISONS = [("gcca first", "cca best"), ("gcca best", "cca best"), ("gcca mean", "cca mean"),
               ("gcca first", "cca oracle")]
FREE_COMPARISONS = [("gcca consensus", "cca best"), ("gcca nearest", "cca best"),
                    ("gcca consensus", "gcca first"), ("gcca consensus", "gcca best")]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def merged_scores(models, moments, method, options, stats, spec, x_stats, reference, held,
                  test, weights=None) -> tuple:
    """(held-out accuracy, test accuracy, alignment details) of one merge under the default
    BatchNorm policy, as ``api.merge`` builds it, with the models' BatchNorm-output ``moments``
    measured once per pool model on ``x_stats`` (the same for every merge it takes part in).
    ``weights``: of the average (default 1/N each; one-hot: one model alone in the merged
    basis)."""
    aligned = align(models, x_stats, method, reference=reference, statistics=stats, spec=spec,
                    **options)
    weights = weights or [1.0 / len(models)] * len(models)
    merged = average_aligned(models, aligned, weights, reference, DEFAULT_POLICY)
    if moments:
        bns = list(moments[0])
        targets = mapped_targets(moments, aligned.alignment.transforms,
                                 written_points(aligned.spec, bns), weights)
        set_moments(merged, targets, x_stats)
    return (evaluate_model(merged, *held)["accuracy"], evaluate_model(merged, *test)["accuracy"],
            aligned.alignment.details)


def nearest_model(details: dict, n: int) -> int:
    """The member nearest the consensus units: smallest ``||G_i P_i - G*||^2 / ||G*||^2``
    summed over merge points (from a consensus merge's details; reference 0), computed from
    the statistics alone (no held-out evaluation)."""
    total = np.zeros(n)
    for per_model in details.values():
        total[0] += next(iter(per_model.values()))["reference_distance"]
        for i, d in per_model.items():
            total[i] += d["consensus_distance"]
    return int(np.argmin(total))


def subsets_of(size: int, n: int, limit: int | None) -> list[tuple]:
    """Every subset of ``n`` of ``size`` models, or ``limit`` of them drawn at random (fixed
    seed) for N >= 3; every pair at N = 2."""
    combos = list(itertools.combinations(range(size), n))
    if n == 2 or limit is None or limit >= len(combos):
        return combos
    rng = np.random.default_rng(n)
    return [combos[k] for k in sorted(rng.choice(len(combos), limit, replace=False))]


def run_arch(arch: str, data, held, profile: dict, args) -> list[dict]:
    epochs, options = reproduction_settings(args.results, arch)
    args.settings[arch] = {"epochs": epochs, **options}
    pool = reproduction_pool(arch, 1.0, "same", data, profile, args.cache / "default",
                             range(args.pool), epochs)
    log(f"{arch}: {epochs} epochs, cca options {options}")
    x_stats = subsample(data.x_train, profile["stats"], 0)
    test = (data.x_test, data.y_test)
    bns = moment_batchnorms(pool[0])
    pool_moments = output_moments(pool, bns, x_stats) if bns else [{} for _ in pool]
    rows = []
    for n in range(2, args.max_n + 1):
        for subset in subsets_of(len(pool), n, args.subsets):
            members = [pool[i] for i in subset]
            moments = [pool_moments[i] for i in subset] if bns else []
            key = "-".join(map(str, subset))
            done = [r for r in args.reused if (r["arch"], r["N"], r["subset"]) == (arch, n, key)]
            todo = [name for name in METHODS if not any(r["method"] == name for r in done)]
            rows += done
            if not todo:
                continue
            spec = resolve_spec(members, x_stats)
            stats = collect_statistics(members, spec, x_stats, pairs="all")
            for name in todo:
                method, extra, once = METHODS[name]
                for ref in range(1 if once else n):
                    h, t, details = merged_scores(members, moments, method, options | extra,
                                                  stats, spec, x_stats, ref, held, test)
                    rows.append({"arch": arch, "N": n, "subset": key, "method": name,
                                 "reference": subset[ref], "heldout": round(h, 3),
                                 "test": round(t, 3)})
                if name == "gcca consensus":
                    near = subset[nearest_model(details, n)]
                    pick = next(r for r in rows if (r["arch"], r["N"], r["subset"], r["method"],
                                                    r["reference"]) == (arch, n, key, "gcca", near))
                    rows.append(pick | {"method": "gcca nearest"})
        log(f"  {arch} N={n} done")
    return rows


ALONE = {"cca": ("cca", {}), "gcca": ("gcca", {}),
         "gcca consensus": ("gcca", {"consensus_units": True})}


def run_alone(arch: str, data, held, profile: dict, args) -> list[dict]:
    """Each member alone in the merged basis (one-hot weights, reference: the subset's first):
    test accuracy of model i mapped by its own ``T_i``, for the first ``--alone`` subsets of
    ``--max-n`` models. The reference of cca and gcca is mapped exactly (a check); under
    consensus units every member is mapped. Shows what each basis costs the models before
    any averaging."""
    epochs, options = reproduction_settings(args.results, arch)
    args.settings[arch] = {"epochs": epochs, **options}
    pool = reproduction_pool(arch, 1.0, "same", data, profile, args.cache / "default",
                             range(args.pool), epochs)
    x_stats = subsample(data.x_train, profile["stats"], 0)
    test = (data.x_test, data.y_test)
    bns = moment_batchnorms(pool[0])
    pool_moments = output_moments(pool, bns, x_stats) if bns else [{} for _ in pool]
    rows = []
    n = args.max_n
    for subset in subsets_of(len(pool), n, args.subsets)[:args.alone]:
        members = [pool[i] for i in subset]
        moments = [pool_moments[i] for i in subset] if bns else []
        spec = resolve_spec(members, x_stats)
        stats = collect_statistics(members, spec, x_stats, pairs="all")
        for name, (method, extra) in ALONE.items():
            for i in range(n):
                one = [float(j == i) for j in range(n)]
                _h, t, _d = merged_scores(members, moments, method, options | extra, stats,
                                          spec, x_stats, 0, held, test, one)
                rows.append({"arch": arch, "N": n, "subset": "-".join(map(str, subset)),
                             "method": name, "member": subset[i], "is_reference": i == 0,
                             "test": round(t, 3)})
        log(f"  {arch} alone {subset} done")
    return rows


def alone_report(rows: list[dict], args, seconds: float) -> str:
    lines = ["# Each model alone in the merged basis", "",
             f"`python benchmarks/gcca_check.py --archs {' '.join(args.archs)} --pool "
             f"{args.pool} --max-n {args.max_n}"
             f"{'' if args.subsets is None else f' --subsets {args.subsets}'} --alone "
             f"{args.alone}` ({seconds / 60:.1f} min on this machine's CPU).", "",
             "Each member of a subset alone in the merged basis: the merge with weight 1 on "
             "model i and 0 on the others (its own map T_i, the same BatchNorm policy and "
             "reset), so the loss is what the basis costs that model before any averaging. "
             "The reference of cca and gcca (the subset's first model) is mapped exactly; "
             "under consensus units every member is mapped. Test accuracy in %, mean over "
             "members and subsets; `others`: the members that are not the reference.", "",
             "| arch | N | subsets | method | reference alone | others alone | all alone |",
             "|---|---|---|---|---|---|---|"]
    for arch in args.archs:
        for name in ALONE:
            sel = [r for r in rows if r["arch"] == arch and r["method"] == name]
            ref = [r["test"] for r in sel if r["is_reference"]]
            oth = [r["test"] for r in sel if not r["is_reference"]]
            lines.append(f"| {arch} | {args.max_n} | {len(ref)} | {name} | {np.mean(ref):.2f} | "
                         f"{np.mean(oth):.2f} | {np.mean(ref + oth):.2f} |")
    return "\n".join(lines + [""])


def per_subset(rows: list[dict]) -> dict[tuple, dict[str, float]]:
    """``{(arch, N, subset): {"cca mean": ..., "cca best": ..., ...}}``."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        key = (r["arch"], r["N"], r["subset"])
        groups.setdefault(key, {}).setdefault(r["method"], []).append(r)
    out = {}
    for key, by_method in groups.items():
        scores = {}
        for method, refs in by_method.items():
            test = [r["test"] for r in refs]
            scores[f"{method} mean"] = float(np.mean(test))
            scores[f"{method} best"] = refs[int(np.argmax([r["heldout"] for r in refs]))]["test"]
            scores[f"{method} oracle"] = max(test)
            scores[f"{method} first"] = refs[0]["test"]
            scores[f"{method} first heldout"] = refs[0]["heldout"]
            if len(refs) == 1:  # merged once (reference-free) or one chosen reference
                scores[method] = refs[0]["test"]
        out[key] = scores
    return out


def interval(diffs: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% t interval of paired differences ``[k]``."""
    mean = float(diffs.mean())
    if len(diffs) < 2:
        return mean, float("nan"), float("nan")
    half = float(scipy_stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs)))
    return mean, mean - half, mean + half


PLAIN_COLUMNS = ("cca mean", "cca best", "cca oracle", "gcca first", "gcca best")
FREE_COLUMNS = ("cca best", "gcca first", "gcca best", "gcca consensus", "gcca nearest")
HELDOUT = [("gcca consensus first heldout", "gcca first heldout")]


def summary_table(subsets: dict[tuple, dict[str, float]], columns=PLAIN_COLUMNS,
                  comparisons=COMPARISONS, labels=None) -> list[str]:
    labels = labels or [f"{a} - {b}" for a, b in comparisons]
    lines = [f"| arch | N | subsets | {' | '.join(columns)} | " + " | ".join(labels) + " |",
             "|" + "---|" * (3 + len(columns) + len(comparisons))]
    for arch, n in sorted({(k[0], k[1]) for k in subsets}):
        cells = [v for k, v in subsets.items() if k[:2] == (arch, n)]
        if not all(c in cells[0] for c in columns):
            continue
        means = {c: np.mean([v[c] for v in cells]) for c in cells[0]}
        row = [arch, str(n), str(len(cells))] + [f"{means[c]:.2f}" for c in columns]
        for a, b in comparisons:
            d = np.array([v[a] - v[b] for v in cells])
            mean, low, high = interval(d)
            row.append(f"{mean:+.2f} [{low:+.2f}, {high:+.2f}], {int((d > 0).sum())}/"
                       f"{int((d < 0).sum())}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def free_table(subsets: dict[tuple, dict[str, float]]) -> list[str]:
    """The reference-free variants: consensus units (one merge) and the reference nearest the
    consensus (no held-out evaluation); the last column on the held-out slice (for defaults)."""
    labels = [f"{a} - {b}" for a, b in FREE_COMPARISONS] + ["consensus - gcca first, held-out"]
    return summary_table(subsets, FREE_COLUMNS, FREE_COMPARISONS + HELDOUT, labels)


def report(rows: list[dict], args, profile: dict, seconds: float) -> str:
    subsets = per_subset(rows)
    subsets_text = ("every subset" if args.subsets is None
                    else f"{args.subsets} random subsets per N (every one where fewer)")
    settings = "; ".join(f"{a} {v['epochs']} epochs, gamma {v['gamma']:g}"
                         for a, v in args.settings.items())
    return "\n".join([
        "# gcca vs cca with every reference", "",
        f"`python benchmarks/gcca_check.py --archs {' '.join(args.archs)} --pool {args.pool} "
        f"--max-n {args.max_n}{'' if args.subsets is None else f' --subsets {args.subsets}'}"
        f"{'' if args.reuse is None else f' --reuse {args.reuse}'}` ({seconds / 60:.1f} min on "
        "this machine's CPU" + ("" if args.reuse is None else ", for the merges not reused")
        + ").", "",
        f"Data: {profile['data']} at {28 // profile['downsample']} px, {profile['train']} training "
        f"images, pools of {args.pool} x1 models per architecture (seeds 0..{args.pool - 1}, same "
        f"data, the reproduction's pools: {settings}); every pair and {subsets_text} of "
        f"3..{args.max_n} models; "
        f"statistics and BatchNorm reset on {profile['stats']} training images; both methods at "
        f"the gamma selected for the pool, BatchNorm policy `{DEFAULT_POLICY}`. Accuracy in % on "
        "the 2000 test images. `best`: the reference whose merge scored "
        "best on the 1000 held-out training images; `oracle`: best on the test set (peeks, an "
        "upper bound for cca); `first`: gcca with the subset's first model as reference (no "
        "selection). Differences are paired per subset: mean [95% t interval], wins/losses "
        "(subsets share models: a guide, not an exact test).", "",
        *summary_table(subsets), "",
        "Reference-free variants: `gcca consensus` merges once into consensus units "
        "(`consensus_units=True`: every model's units matched and averaged in the shared space; "
        "no reference, no selection); `gcca nearest` is gcca with the member nearest the "
        "consensus units as reference (smallest `||G_i P_i - G*||^2 / ||G*||^2` summed over "
        "merge points: chosen from the statistics, no held-out evaluation). The last column "
        "compares consensus with gcca first on the held-out slice, where defaults are chosen.", "",
        *free_table(subsets), "",
        f"Per merge rows: `{args.csv.name}`.", ""])


def write_rows(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def reused_rows(path: Path | None) -> list[dict]:
    """The rows of a previous run's CSV, typed as :func:`run_arch` writes them."""
    if path is None:
        return []
    with path.open() as handle:
        return [r | {"N": int(r["N"]), "reference": int(r["reference"]),
                     "heldout": float(r["heldout"]), "test": float(r["test"])}
                for r in csv.DictReader(handle)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", default=["vgg", "resnet20"])
    p.add_argument("--pool", type=int, default=6)
    p.add_argument("--max-n", type=int, default=5)
    p.add_argument("--subsets", type=int, default=None,
                   help="random subsets per N >= 3 (default: every subset)")
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/default"),
                   help="a reproduction's results: its pools' epochs and selected gamma")
    p.add_argument("--cache", type=Path, default=Path("benchmarks/cache"),
                   help="the reproduction's model cache")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gcca_check.md"))
    p.add_argument("--alone", type=int, default=None,
                   help="instead: each member alone in the merged basis, for this many subsets "
                        "of --max-n models (writes --out)")
    p.add_argument("--reuse", type=Path, default=None,
                   help="a previous run's per-merge CSV: its (subset, method) rows are kept and "
                        "only the methods missing there are merged")
    args = p.parse_args()
    args.reused = reused_rows(args.reuse)
    args.csv = args.out.with_suffix(".csv")
    args.settings = {}
    profile = PROFILES["default"]
    data, held = split_data(profile)
    start = time.time()
    if args.alone:
        rows = [r for arch in args.archs for r in run_alone(arch, data, held, profile, args)]
        write_rows(rows, args.csv)
        args.out.write_text(alone_report(rows, args, time.time() - start))
        print(args.out.read_text())
        return
    rows = [r for arch in args.archs for r in run_arch(arch, data, held, profile, args)]
    write_rows(rows, args.csv)
    text = report(rows, args, profile, time.time() - start)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
