"""What a merge costs, against the limit of the forward passes it cannot avoid.

    python benchmarks/cost.py [--widths 1 2 4] [--samples 1000] [--repeats 2] [--x8]
                              [--parts widths n memory x8] [--out DIR] [--readme README.md]
    python benchmarks/cost.py --paper [--paper-images 512] [--fresh] [--readme README.md]

The unavoidable work of an activation-based merge is N forward passes over the statistics data
and one BatchNorm-reset pass; everything else (covariance products, the solve, applying
transforms, averaging) is overhead. For each architecture, width and method this prints and
writes (``cost.csv``, ``cost.md``):

* the time of each phase: statistics, solve, transforms, averaging, BatchNorm reset;
* ``ratio`` = total merge time / bare forward time over the same data (target <= 1.3 for cca);
  the bare forward is timed in the standard and in channels-last memory and the faster counts;
* every time is the fastest of ``--repeats`` runs (the machine's other load only adds time);
* how time grows with the width and with N;
* peak memory (resident set of a fresh process after a warm-up merge, glibc's mmap threshold
  fixed so that freed tensors leave the resident set) as the
  statistics data grows 1x, 4x, 16x from 1000 images: statistics are streamed, so it should stay
  flat;
* with ``--x8``, whether a VGG x8 merge of two models fits in this machine's memory, and its time.

Models are randomly initialised (cost does not depend on training); inputs are Fashion-MNIST
training images when the Debian package is installed, else digits.

``--paper`` measures the paper's architectures instead (VGG11 and ResNet20 on 3x32x32 images,
x1..x8, N = 2 and 4; see ``cost_paper.py``), writing ``cost_paper.csv`` / ``cost_paper.md``; a
rerun continues an interrupted one (settings already in the CSV for this machine are kept)
unless ``--fresh``. A row is one setting on one machine (``cpu``: its model name and the vector
instructions torch uses there): a run on another machine adds its rows beside the others, and
``--paper-redo`` replaces only this machine's. ``--paper-products bfloat16`` and
``--paper-allocator kept`` measure the statistics pass's bfloat16 products and the CLI's way of
keeping freed memory (rows of their own beside the float32 / fixed-threshold ones). The README's
cost section gets both reports.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from cost_paper import (
    ALLOCATORS,
    PAPER_IMAGES,
    PAPER_NS,
    PAPER_WIDTHS,
    cpu_name,
    paper_rows,
    paper_summary,
    setting_key,
    unavoidable_passes,
    write_paper,
)
from report import rewrite_section

from ccamerge.api import AlignResult
from ccamerge.average import average_aligned_state
from ccamerge.data import available_datasets, load_dataset
from ccamerge.methods import get_method
from ccamerge.methods.base import AlignContext
from ccamerge.models import build_model
from ccamerge.moments import PRODUCTS
from ccamerge.spec import build_spec
from ccamerge.stats import channels_last, collect_statistics
from ccamerge.transform import reset_batchnorm, with_state

BATCH = 500
COST_START, COST_END = "<!-- cost:start -->", "<!-- cost:end -->"


def inputs(samples: int) -> torch.Tensor:
    name = "fashion-mnist" if "fashion-mnist" in available_datasets() else "digits"
    x = load_dataset(name).x_train
    reps = -(-samples // len(x))
    return torch.cat([x] * reps)[:samples]


def models_for(arch: str, width: float, n: int, image_size: int) -> list[torch.nn.Module]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(build_model(arch, width=width, image_size=image_size).eval())
    return out


@torch.no_grad()
def bare_forward(models, x) -> float:
    """N eval passes plus one train-mode pass (the BatchNorm reset) over ``x``, no hooks."""
    start = time.perf_counter()
    unavoidable_passes(models, x, BATCH)
    return time.perf_counter() - start


def forward_limits(models, x, repeats: int = 2) -> dict[str, float]:
    """Best bare-forward time in the standard layout and in channels-last memory (the layout
    the merge itself runs in); the limit is the faster of the two."""
    standard = min(bare_forward(models, x) for _ in range(repeats))
    runners, x_cl = channels_last(models, x)
    fast = min(bare_forward(runners, x_cl) for _ in range(repeats))
    return {"forward_standard": standard, "forward_channels_last": fast,
            "forward_limit": min(standard, fast)}


def timed_merge(models, x, method: str) -> dict[str, float]:
    info = get_method(method)
    spec = build_spec(models[0])
    phases = {}
    t = time.perf_counter()
    stats = None
    if info.statistics:
        stats = collect_statistics(models, spec, x, pairs=info.statistics, batch_size=BATCH)
    phases["statistics"] = time.perf_counter() - t
    t = time.perf_counter()
    ctx = AlignContext([m.state_dict() for m in models], spec, stats)
    options = info.resolve({})
    aligned = AlignResult(info.solve(ctx, **options), stats, spec, options, method)
    phases["solve"] = time.perf_counter() - t
    t = time.perf_counter()
    weights = [1.0 / len(models)] * len(models)
    state = average_aligned_state(models, aligned.alignment, spec, weights)
    phases["transforms"] = time.perf_counter() - t  # and the sums: one entry at a time
    t = time.perf_counter()
    merged = with_state(models[0], state)
    phases["averaging"] = time.perf_counter() - t
    t = time.perf_counter()
    reset_batchnorm(merged, x, batch_size=BATCH)
    phases["bn_reset"] = time.perf_counter() - t
    phases["total"] = sum(phases.values())
    return phases


def time_rows(archs, widths, methods, ns, samples, repeats: int = 2) -> list[dict]:
    """One row per setting and method: the phases of the fastest of ``repeats`` merges."""
    rows = []
    for arch in archs:
        for width in widths:
            for n in ns:
                x = inputs(samples)
                models = models_for(arch, width, n, x.shape[-1])
                limits = forward_limits(models, x, repeats)
                for method in methods:
                    phases = min((timed_merge(models, x, method) for _ in range(repeats)),
                                 key=lambda p: p["total"])
                    rows.append({"arch": arch, "width": width, "N": n, "method": method,
                                 "samples": samples,
                                 **{k: round(v, 4) for k, v in {**phases, **limits}.items()},
                                 "ratio": round(phases["total"] / limits["forward_limit"], 3)})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


PEAK_CODE = """
import sys
sys.path.insert(0, 'benchmarks')
from cost import inputs, models_for, timed_merge

def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

x = inputs({samples}).clone()
models = models_for({arch!r}, {width}, 2, x.shape[-1])
timed_merge(models, x[:{batch}], {method!r})  # one-time allocations (kernels, buffers) go first
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current size
before = status('VmRSS')
timed_merge(models, x, {method!r})
print(status('VmHWM') - before, status('VmHWM'))
"""


def peak_memory_mb(arch: str, width: float, samples: int, method: str) -> tuple[float, float]:
    """(peak resident memory a merge of two models on ``samples`` inputs adds to a fresh process
    that already holds the data and the models, that process's whole peak), in MB (Linux: the
    peak, VmHWM, is reset through clear_refs)."""
    code = PEAK_CODE.format(samples=samples, arch=arch, width=width, method=method, batch=BATCH)
    # a fixed mmap threshold returns every large tensor to the system when it is freed, so the
    # resident set tracks live memory (glibc's sliding threshold varies the peak ~20% per run)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=env)
    extra, total = done.stdout.strip().splitlines()[-1].split()
    return float(extra), float(total)


def memory_rows(arch: str, width: float, base_samples: int) -> list[dict]:
    rows = []
    for factor in (1, 4, 16):
        extra, total = peak_memory_mb(arch, width, base_samples * factor, "cca")
        rows.append({"arch": arch, "width": width, "samples": base_samples * factor,
                     "peak_extra_mb": round(extra, 1), "process_peak_mb": round(total, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def write(rows: list[dict], path: Path) -> None:
    """``rows`` as ``path`` with a ``.csv`` and a ``.md`` suffix; the columns are every key, in
    order of first appearance (a row without one leaves its cell empty)."""
    if not rows:
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    path.with_suffix(".md").write_text("\n".join(markdown(rows, columns)) + "\n")


def markdown(rows: list[dict], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]


def summary(cost: list[dict], by_n: list[dict], memory: list[dict], x8: list[dict],
            x8_memory: list[dict], samples: int) -> str:
    """The Markdown report (``cost_summary.md`` and the README's cost section)."""
    settings = sorted({(r["arch"], r["width"]) for r in cost})
    ratios, phases = [], []
    for arch, width in settings:
        rows = {r["method"]: r for r in cost if (r["arch"], r["width"]) == (arch, width)}
        any_row = next(iter(rows.values()))
        ratios.append({"arch": arch, "width": f"x{width:g}",
                       "forward standard (s)": any_row["forward_standard"],
                       "forward channels-last (s)": any_row["forward_channels_last"],
                       **{m: r["ratio"] for m, r in rows.items()}})
        if "cca" in rows:
            r = rows["cca"]
            phases.append({"arch": arch, "width": f"x{width:g}",
                           **{k: r[k] for k in ("statistics", "solve", "transforms", "averaging",
                                                "bn_reset", "total", "ratio")},
                           "ratio vs standard layout":
                               round(r["total"] / r["forward_standard"], 3)})
    methods = [m for m in ("average", "permute", "weight_matching", "zipit", "ot", "cca")
               if any(m in r for r in ratios)]
    met = [f"{p['arch']} {p['width']}" for p in phases if p["ratio"] <= 1.3]
    missed = [f"{p['arch']} {p['width']} ({p['ratio']})" for p in phases if p["ratio"] > 1.3]
    text = [f"Two randomly initialised models merged on {samples} Fashion-MNIST training images "
            f"(28x28), batches of {BATCH}, {torch.get_num_threads()} threads; every time is the "
            "fastest of the repeats. `ratio` = total merge time / bare forward time over the same "
            "data (N eval passes, plus the BatchNorm-reset pass for nets with BatchNorm), with the "
            "bare forward timed in the standard and in channels-last memory and the faster "
            "counted; the merge itself runs its passes channels-last.", "",
            "Ratio to the bare forward, per method:", "",
            *markdown(ratios, ["arch", "width", "forward standard (s)",
                               "forward channels-last (s)", *methods])]
    if phases:
        text += ["", "CCA Merge, seconds per phase:", "", *markdown(phases, list(phases[0])), "",
                 f"CCA ratio at most 1.3: {', '.join(met) or 'nowhere'}; above: "
                 f"{', '.join(missed) or 'nowhere'}."]
    if by_n:
        text += ["", "Growth with the number of models (width x1):", "",
                 *markdown(by_n, ["arch", "N", "method", "statistics", "solve", "total",
                                  "forward_limit", "ratio"])]
    if memory:
        text += ["", "Peak memory a CCA merge adds (MB) as the statistics data grows:", "",
                 *markdown(memory, ["arch", "width", "samples", "peak_extra_mb"])]
        for arch in sorted({r["arch"] for r in memory}):
            peaks = [r["peak_extra_mb"] for r in memory if r["arch"] == arch]
            text.append(f"\n{arch}: largest over smallest peak {max(peaks) / min(peaks):.2f}")
    if x8:
        r = {row["method"]: row for row in x8}
        text += ["", "VGG x8 (two models): " + "; ".join(
            f"{m} {row['total']} s total (statistics {row['statistics']} s, "
            f"solve {row['solve']} s, "
            f"ratio {row['ratio']})" for m, row in r.items())
            + (f"; whole-process peak memory {x8_memory[0]['process_peak_mb'] / 1024:.1f} GB of "
               "this machine's 24 GB." if x8_memory else ".")]
    return "\n".join(text) + "\n"


def read_rows(path: Path) -> list[dict]:
    """Rows of a CSV this script wrote, numbers as floats (``[]`` when the file is missing)."""
    if not path.exists():
        return []
    with path.open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key, value in row.items():
            for kind in (int, float):
                try:
                    row[key] = kind(value)
                    break
                except ValueError:
                    pass
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["vgg", "resnet20"])
    parser.add_argument("--widths", nargs="+", type=float, default=[1, 2, 4])
    parser.add_argument("--methods", nargs="+",
                        default=["average", "permute", "weight_matching", "zipit", "ot", "cca"])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--x8", action="store_true", help="also merge two VGG x8 models")
    parser.add_argument("--parts", nargs="+", choices=["widths", "n", "memory", "x8"],
                        default=["widths", "n", "memory"],
                        help="what to measure now; the summary reads every part's file in --out")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--readme", default=None, help="rewrite this README's cost section")
    parser.add_argument("--paper", action="store_true", help="the paper's shapes (cost_paper.py)")
    parser.add_argument("--paper-images", type=int, default=PAPER_IMAGES)
    parser.add_argument("--fresh", action="store_true", help="--paper: forget an earlier run")
    parser.add_argument("--paper-widths", nargs="+", type=float, default=list(PAPER_WIDTHS),
                        help="--paper: the widths to measure now (a rerun adds the rest)")
    parser.add_argument("--paper-ns", nargs="+", type=int, default=list(PAPER_NS))
    parser.add_argument("--paper-archs", nargs="+", default=["vgg11", "resnet20"],
                        choices=["vgg11", "resnet20"], help="--paper: the architectures to "
                        "measure now")
    parser.add_argument("--paper-products", choices=list(PRODUCTS), default="float32",
                        help="--paper: the statistics pass's products (collect_statistics)")
    parser.add_argument("--paper-allocator", choices=list(ALLOCATORS), default="fixed",
                        help="--paper: fixed (glibc's mmap threshold at 128 KiB: the live peak) "
                        "or kept (freed memory kept for reuse during each pass, as the CLI runs)")
    parser.add_argument("--paper-redo", action="store_true",
                        help="--paper: measure --paper-widths x --paper-ns again on this machine "
                        "(e.g. with more --paper-images), keeping the other rows")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.paper:
        return paper(args, out)
    parts = set(args.parts) | ({"x8"} if args.x8 else set())
    if "widths" in parts:
        write(time_rows(args.archs, args.widths, args.methods, [2], args.samples, args.repeats),
              out / "cost")
    if "n" in parts:
        write(time_rows(args.archs, [1], ["cca", "permute"], [2, 3, 4, 5], args.samples,
                        args.repeats), out / "cost_n")
    if "memory" in parts:
        # from two batches up: after the first large free glibc raises its mmap threshold, so a
        # one-batch run keeps less memory than any longer run whatever the statistics do
        write(memory_rows("vgg", 1, 2 * BATCH) + memory_rows("resnet20", 1, 2 * BATCH),
              out / "cost_memory")
    if "x8" in parts:
        write(time_rows(["vgg"], [8], ["cca", "permute"], [2], args.samples, 1), out / "cost_x8")
        extra, total = peak_memory_mb("vgg", 8, args.samples, "cca")
        write([{"arch": "vgg", "width": 8, "samples": args.samples,
                "peak_extra_mb": round(extra, 1), "process_peak_mb": round(total, 1)}],
              out / "cost_x8_memory")
    body = summary(*(read_rows(out / f"{name}.csv") for name in
                     ("cost", "cost_n", "cost_memory", "cost_x8", "cost_x8_memory")), args.samples)
    (out / "cost_summary.md").write_text(body)
    write_readme(args, out, body)
    print(body)
    print(f"peak RSS of this run: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def paper(args, out: Path) -> None:
    done = [] if args.fresh else read_rows(out / "cost_paper.csv")
    if args.paper_redo:  # measure the named settings again, keep the others
        here = cpu_name()
        named = {(a, float(w), n, here, args.paper_products, args.paper_allocator)
                 for a in args.paper_archs for w in args.paper_widths for n in args.paper_ns}
        done = [r for r in done if setting_key(r) not in named]
    rows = paper_rows(args.paper_archs, args.paper_widths, args.paper_ns, args.paper_images,
                      args.repeats, done, lambda rows: write_paper(rows, out, args.paper_images),
                      products=args.paper_products, allocator=args.paper_allocator)
    print(write_paper(rows, out, args.paper_images))
    write_readme(args, out, (out / "cost_summary.md").read_text()
                 if (out / "cost_summary.md").exists() else "")


def write_readme(args, out: Path, body: str) -> None:
    """The README's cost section: the paper shapes first (when measured), then the rest."""
    if not args.readme:
        return
    paper_rows_done = read_rows(out / "cost_paper.csv")
    paper_text = paper_summary(paper_rows_done, args.paper_images) if paper_rows_done else ""
    rewrite_section(Path(args.readme), COST_START, COST_END,
                    paper_text + ("\n" if paper_text and body else "") + body)


if __name__ == "__main__":
    main()
