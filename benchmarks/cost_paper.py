"""``cost.py --paper``: a CCA merge on the paper's architectures against the bare forward.

VGG11 (64-M-128-M-256-256-M-512-512-M-512-512-M times the width, no BatchNorm, one Linear
classifier) and ResNet20 (16/32/64 times the width) on 3x32x32 inputs, 10 classes, widths x1, x2,
x4, x8, N = 2 and 4 randomly initialised models, synthetic CIFAR-shaped images (standard normal,
seed 0). The sample shrinks with the width, ``--paper-images / width^2`` images (at least 8), so
that every setting's passes cost about the same time; equal batches of at most 500, at least two
of them.

Each setting runs in a fresh process (its peak memory is its own). Timed, interleaved:

* the bare forward: N eval passes (plus one train-mode pass, the BatchNorm reset, for ResNet20)
  over the same images without hooks, in three layouts: standard, channels-last images with the
  weights as they are (how the merge runs) and channels-last images and weights; the fastest
  counts;
* the merge's phases as ``ccamerge.api.merge`` runs them: the memory-layout probe (once per
  process: model 0 on one batch in each layout as a pass over 50 000 images probes,
  :mod:`ccamerge.layout`; counted as a one-time phase), statistics, solve, transforms (every
  model's aligned entries, summed as they are made: :mod:`ccamerge.average`; rows before the
  entry-at-a-time average held every aligned state dict here), averaging (the merged model
  carrying the sums), BatchNorm reset.

Per-image phases (the forwards, statistics, BatchNorm reset) are the best of ``--repeats`` runs;
the solve, transforms and averaging, which do not depend on the data, are the best of
``--repeats`` at x1 and x2 and one run at x4 and x8 (minutes each on this CPU). ``ratio`` = total
/ bare forward at the sample measured; ``ratio_50k`` projects both to the paper's 50 000
statistics images in batches of the same size: the statistics pass and the bare forward as what
each costs once (its first batch over its later ones, finishing) plus the mean of its later
batches for every batch (:func:`projected`), the BatchNorm reset scaled per image, the
solve and transforms stay. Peak memory: the whole process's VmHWM, and what the merge adds to the
process holding the models and images (VmHWM reset before it, glibc's mmap threshold fixed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from ccamerge.allocator import for_a_pass
from ccamerge.layout import CANDIDATES, in_layout, weights_in

VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
PAPER_WIDTHS, PAPER_NS, PAPER_IMAGES, PAPER_TARGET = (1, 2, 4, 8), (2, 4), 512, 50_000
MIN_IMAGES, MAX_BATCH, MIN_BATCHES = 8, 500, 2
FIXED_PHASES = ("layout_probe", "solve", "transforms", "averaging")  # do not grow with the images


def paper_model(arch: str, width: float, seed: int, init: str = "default") -> torch.nn.Module:
    """A randomly initialised VGG11 (``"vgg11"``) or ResNet20 for 3x32x32 inputs, eval mode.
    ``init="kaiming"``: He-normal weights and zero biases instead of torch's defaults, so the
    features keep their scale through the depth like a trained net's (torch's default init
    shrinks them, and deep VGG features become nearly constant offsets)."""
    from ccamerge.models import build_model

    torch.manual_seed(seed)
    if arch == "vgg11":
        model = build_model("vgg", cfg=VGG11, image_shape=[3, 32, 32], width=width).eval()
    elif arch == "resnet20":
        model = build_model("resnet20", image_shape=[3, 32, 32], width=width).eval()
    else:
        raise ValueError(f"no paper architecture {arch!r}: vgg11 or resnet20")
    if init == "kaiming":
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
    return model


def paper_images(count: int) -> torch.Tensor:
    """``[count, 3, 32, 32]`` standard normal images (CIFAR-shaped, as if standardised)."""
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def images_for(width: float, base: int = PAPER_IMAGES) -> int:
    return max(MIN_IMAGES, round(base / width**2))


@torch.no_grad()
def unavoidable_passes(models, x: torch.Tensor, batch: int) -> list[float]:
    """What a merge cannot avoid: every model's eval pass over ``x`` ``[B, ...]`` in batches of
    ``batch``, plus one train-mode pass of model 0 (the BatchNorm reset) for BatchNorm nets,
    which is left in eval mode again. No hooks. Batch by batch, each through every model (as the
    statistics pass runs); returns each batch's seconds."""
    from ccamerge.transform import has_batchnorm

    batchnorm, seconds = has_batchnorm(models[0]), []
    for i in range(0, len(x), batch):
        start, xb = time.perf_counter(), x[i:i + batch]
        for m in models:
            m(xb)
        if batchnorm:
            models[0].train()
            models[0](xb)
            models[0].eval()
        seconds.append(time.perf_counter() - start)
    return seconds


@torch.no_grad()
def bare_forward(models, x: torch.Tensor, batch: int, layout: str) -> list[float]:
    """Seconds per batch of N eval passes (plus one train-mode pass for BatchNorm nets) over
    ``x`` in ``layout`` (one of :data:`ccamerge.layout.CANDIDATES`, the weights converted as
    the merge's passes convert them)."""
    with weights_in(models, layout), for_a_pass():  # as the merge's passes run
        return unavoidable_passes(models, in_layout(x, layout), batch)


def paper_batches(images: int) -> tuple[int, int]:
    """``(images, batch)``: the sample cut into equal batches of at most :data:`MAX_BATCH`, at
    least :data:`MIN_BATCHES` of them (``images`` rounded down to their multiple)."""
    batches = max(MIN_BATCHES, -(-images // MAX_BATCH))
    batch = max(1, images // batches)
    return batch * batches, batch


def projected(total: float, per_batch: list[float], batches: float) -> float:
    """A pass's seconds over ``batches`` batches from one pass over ``len(per_batch)`` of them
    (``total`` seconds, ``per_batch`` seconds each): the steady cost of a batch is the mean of
    all but the first, and what the pass costs once (the first batch's extra: allocations,
    kernel choices, each point's first look; and finishing) is ``total`` less that many steady
    batches."""
    steady = sum(per_batch[1:]) / (len(per_batch) - 1)
    return total - len(per_batch) * steady + batches * steady


def statistics(models, x, batch: int, positions, marks: list | None = None,
               products: str = "float32"):
    """The statistics pass as ``api.merge`` runs it (its products in ``products``); ``marks``
    gets the clock at each batch's end (its progress reports)."""
    from ccamerge.spec import build_spec
    from ccamerge.stats import collect_statistics

    report = None if marks is None else (lambda _done: marks.append(time.perf_counter()))
    return collect_statistics(models, build_spec(models[0]), x, batch_size=batch,
                              positions=positions, progress=report, products=products)


def timed_statistics(models, x, batch: int, positions, products: str = "float32"):
    """``(statistics, total seconds, seconds per batch)`` of one statistics pass."""
    marks = [time.perf_counter()]
    stats = statistics(models, x, batch, positions, marks, products)
    end = time.perf_counter()
    return stats, end - marks[0], [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def fixed_phases(models, stats) -> tuple[torch.nn.Module, dict]:
    """Solve, transforms and averaging as ``api.merge`` runs them: ``(merged, seconds)``."""
    from ccamerge.api import AlignResult
    from ccamerge.average import average_aligned_state
    from ccamerge.methods import get_method
    from ccamerge.methods.base import AlignContext
    from ccamerge.spec import build_spec
    from ccamerge.transform import with_state

    info, spec = get_method("cca"), build_spec(models[0])
    ctx = AlignContext([m.state_dict() for m in models], spec, stats)
    options = info.resolve({})
    aligned, solve = timed(lambda: AlignResult(info.solve(ctx, **options), stats, spec, options))
    weights = [1.0 / len(models)] * len(models)
    state, transforms = timed(average_aligned_state, models, aligned.alignment, spec, weights)
    merged, averaging = timed(with_state, models[0], state)
    return merged, {"solve": solve, "transforms": transforms, "averaging": averaging}


def status_mb(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(arch: str, width: float, n: int, images: int, repeats: int,
            positions=None, products: str = "float32", allocator: str = "fixed") -> dict:
    """One setting's row (run it in a fresh process: see :func:`run_setting`), the statistics
    pass's products in ``products``, under ``allocator`` (:data:`ALLOCATORS`)."""
    if allocator == "kept":
        from ccamerge.allocator import keep_freed_memory

        keep_freed_memory()
    from ccamerge.layout import choose_layout, forget_choices, long_pass
    from ccamerge.transform import reset_batchnorm

    models = [paper_model(arch, width, seed) for seed in range(n)]
    images, batch = paper_batches(images)
    x, target_batches = paper_images(images), PAPER_TARGET / batch
    for layout in CANDIDATES:  # one-time allocations and kernel choices go first
        bare_forward(models, x[:2], 2, layout)
    statistics(models, x[:2], 2, positions, products=products)
    best: dict[str, float] = {}

    def keep(name: str, seconds: float) -> None:
        best[name] = min(best.get(name, float("inf")), seconds)

    def keep_statistics() -> tuple:
        stats, total, per_batch = timed_statistics(models, x, batch, positions, products)
        at_50k = projected(total, per_batch, target_batches)
        keep("statistics", total)
        keep("statistics_50k", at_50k)
        return stats, at_50k

    forget_choices()  # the merge's layout probe, once per process: a one-time phase of its own
    chosen, probe = timed(choose_layout, models[0], x[:batch], None,
                          long_pass(PAPER_TARGET, batch))  # as a 50k-image pass probes
    keep("layout_probe", probe)

    adjacent = []  # statistics / bare forward of one repeat, both at 50k: under the same load
    for _ in range(repeats):
        forwards_50k = []
        for layout in CANDIDATES:
            per_batch = bare_forward(models, x, batch, layout)
            forwards_50k.append(projected(sum(per_batch), per_batch, target_batches))
            keep(f"forward_{layout}", sum(per_batch))
            keep(f"forward_{layout}_50k", forwards_50k[-1])
        adjacent.append(keep_statistics()[1] / min(forwards_50k))
    open("/proc/self/clear_refs", "w").write("5")  # the merge's own peak from here
    before = status_mb("VmRSS")
    stats = keep_statistics()[0]
    for _ in range(repeats if width <= 2 else 1):
        merged, phases = fixed_phases(models, stats)
        for name, value in phases.items():
            keep(name, value)
    for _ in range(repeats):
        reset = timed(lambda: reset_batchnorm(merged, x, batch_size=batch))[1]
        keep("bn_reset", reset if arch == "resnet20" else 0.0)
    out = row(arch, width, n, images, batch, best, status_mb("VmHWM"), before, positions)
    return (out | adjacent_ratio(out, sorted(adjacent)[len(adjacent) // 2])
            | {"layout": chosen, "products": products, "allocator": allocator})


def adjacent_ratio(out: dict, statistics_ratio: float) -> dict:
    """``ratio_50k`` again with the statistics pass taken as the median over repeats of its
    projection over the bare forward's projection measured just before it (robust to load
    that changes between phases, which best-of-repeats per phase is not)."""
    scale = PAPER_TARGET / out["images"]
    fixed = sum(out.get(k, 0.0) for k in FIXED_PHASES)
    rest = (out["bn_reset"] * scale + fixed) / out["forward_50k"]
    return {"statistics_ratio_median": round(statistics_ratio, 3),
            "ratio_50k_adjacent": round(statistics_ratio + rest, 3),
            "load_1min": round(os.getloadavg()[0], 2)}


def row(arch, width, n, images, batch, best, peak, before, positions) -> dict:
    """The row of one setting from its best times: ``ratio`` at the sample, ``ratio_50k``
    with the statistics pass and the bare forward projected from their steady batches
    (:func:`projected`), the BatchNorm reset scaled per image, the fixed phases as measured."""
    forward = min(best[f"forward_{layout}"] for layout in CANDIDATES)
    forward_50k = min(best[f"forward_{layout}_50k"] for layout in CANDIDATES)
    fixed = sum(best.get(k, 0.0) for k in FIXED_PHASES)
    per_image = best["statistics"] + best["bn_reset"]
    scale = PAPER_TARGET / images
    at_50k = best["statistics_50k"] + best["bn_reset"] * scale + fixed
    return {"arch": arch, "width": width, "N": n, "images": images, "batch": batch,
            "positions": "all" if positions is None else positions,
            **{k: round(v, 6) for k, v in best.items()},
            "forward": round(forward, 6), "forward_50k": round(forward_50k, 3),
            "total": round(per_image + fixed, 6),
            "ratio": round((per_image + fixed) / forward, 3),
            "ratio_50k": round(at_50k / forward_50k, 3),
            "per_image_ratio": round(per_image / forward, 3),
            "projection": "steady batches",
            "peak_gb": round(peak / 1024, 2),
            "merge_peak_extra_gb": round((peak - before) / 1024, 2),
            "threads": torch.get_num_threads(), "cpu": cpu_name()}


def cpu_name() -> str:
    """The CPU's model name and the vector instructions torch uses on it, e.g. ``AMD EPYC
    (AVX2)``: rows measured on different machines say so (two VMs both called "AMD EPYC" ran
    the same GEMM at 0.8x and 1.25x their convolutions' rate)."""
    model = "unknown"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{model} ({torch.backends.cpu.get_cpu_capability()})"


def setting_key(row: dict) -> tuple:
    """``(arch, width, N, cpu, products, allocator)``: a row is one setting on one machine
    (rows from before the products and allocator choices: float32 under the fixed
    threshold)."""
    return (row["arch"], float(row["width"]), int(row["N"]), row.get("cpu") or "",
            row.get("products") or "float32", row.get("allocator") or "fixed")


CODE = """
import json, sys
sys.path.insert(0, 'benchmarks')
from cost_paper import measure
print(json.dumps(measure({arch!r}, {width}, {n}, {images}, {repeats}, {positions!r},
                         {products!r}, {allocator!r})))
"""
# How the setting's process allocates memory: "fixed": glibc's mmap threshold fixed at 128 KiB
# (freed maps go back to the system at once: VmHWM is the live peak); "kept": freed memory kept
# for reuse during each pass and handed back after it, as the CLI runs
# (ccamerge.allocator.keep_freed_memory, for_a_pass; VmHWM is what the process holds).
ALLOCATORS = ("fixed", "kept")


def run_setting(arch: str, width: float, n: int, images: int, repeats: int,
                positions=None, products: str = "float32", allocator: str = "fixed") -> dict:
    """:func:`measure` in a fresh Python process (a failure, e.g. out of memory, is a row)."""
    code = CODE.format(arch=arch, width=width, n=n, images=images, repeats=repeats,
                       positions=positions, products=products, allocator=allocator)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if allocator == "fixed":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"arch": arch, "width": width, "N": n, "images": images,
                "positions": "all" if positions is None else positions,
                "products": products, "allocator": allocator, "cpu": cpu_name(),
                "error": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def paper_rows(archs, widths, ns, base: int, repeats: int, done: list[dict],
               on_row, products: str = "float32", allocator: str = "fixed") -> list[dict]:
    """Every setting not in ``done`` on this machine with these ``products`` and ``allocator``
    (rows of an earlier, interrupted run; rows of other machines and conditions are kept
    beside), ``on_row(rows)`` after each."""
    rows, here = list(done), cpu_name()
    have = {setting_key(r) for r in done}
    for arch in archs:
        for width in widths:
            for n in ns:
                if (arch, float(width), n, here, products, allocator) in have:
                    continue
                rows.append(run_setting(arch, width, n, images_for(width, base), repeats,
                                        products=products, allocator=allocator))
                print(json.dumps(rows[-1]), flush=True)
                on_row(rows)
    return rows


def paper_summary(rows: list[dict], base: int) -> str:
    """The Markdown section for ``cost_paper.md`` and the README."""
    from cost import markdown

    cols = ["arch", "width", "N", "images", "batch", "layout", "forward", "layout_probe",
            "statistics", "solve", "transforms", "averaging", "bn_reset", "total", "ratio",
            "projection", "ratio_50k", "ratio_50k_adjacent", "peak_gb", "merge_peak_extra_gb",
            "load_1min", "products", "allocator", "cpu"]
    good = sorted((r for r in rows if not r.get("error")), key=machine_order)
    failed = [f"{r['arch']} x{r['width']:g} N={r['N']}: {r['error']}" for r in rows
              if r.get("error")]
    threads = good[0]["threads"] if good else torch.get_num_threads()
    text = [f"Paper shapes (`python benchmarks/cost.py --paper`): VGG11 and ResNet20 on 3x32x32 "
            f"synthetic images, random models, {threads} threads, the `images` of each row "
            f"(`--paper-images` at x1, that / width^2 above, at least {MIN_IMAGES}; rows are "
            "kept between runs, so each says its own) in equal batches of "
            f"`batch` (at most {MAX_BATCH}, at least {MIN_BATCHES} batches); seconds; `layout`: "
            "the memory layout the merge's passes chose (ccamerge/layout.py; empty: a row "
            "measured before that choice existed, when the passes ran channels-last), "
            "`layout_probe` its one-time probe; `forward` = the bare forward in its fastest "
            "layout; `ratio` = total / forward at these images; "
            f"`ratio_50k` = the same projected to {PAPER_TARGET} statistics images (solve and "
            "transforms as measured) as `projection` says: `steady batches`: the statistics "
            "pass and the bare forward as what each cost once (its first batch's extra, "
            "finishing) plus the mean of their later batches per batch; `per image` (older rows, "
            "one batch or more): every pass scaled with the images, what a pass costs once "
            "counted per image, which overstates settings of one batch; "
            "`ratio_50k_adjacent` = the same "
            "with the statistics pass as the median over repeats of its time over the bare "
            "forward measured just before it (the headline: robust to load that changes between "
            "phases); peak memory in GB (whole process, and added by the merge); `load_1min`: "
            "the machine's load average when the setting finished; `cpu`: the machine, its model "
            "name and the vector instructions torch used on it (blank: the first machine, not "
            "recorded; a row is one setting on one machine, grouped by machine); `products`: "
            "the precision of the statistics pass's products (`--paper-products`; "
            "`collect_statistics(products=...)`); `allocator`: `fixed`: glibc's mmap threshold "
            "fixed at 128 KiB, so freed feature maps go back to the system and the peak is the "
            "live peak; `kept`: freed memory kept for reuse during each pass, as the CLI runs "
            "(`--paper-allocator`; ccamerge/allocator.py), forward and merge alike.", "",
            *markdown([{"projection": "per image", "batch": "", "cpu": "",
                        "products": "float32", "allocator": "fixed"} | r for r in good],
                      cols), "",
            *target_lines(good)]
    text += ["", "Peak memory is the whole process at the largest setting (the models, their "
             "copies, the merged model and the solves)."]
    if failed:
        text += ["", "Did not complete: " + "; ".join(failed) + "."]
    return "\n".join(text) + "\n"


def machine_order(row: dict) -> tuple:
    """Rows grouped by machine (the newest, with a named CPU, first), then by condition
    (products, allocator), then by setting."""
    arch, width, n, cpu, products, allocator = setting_key(row)
    return not cpu, cpu, products, allocator, arch, width, n


def target_lines(rows: list[dict]) -> list[str]:
    """One line per machine and condition (products, allocator): the settings whose
    ``ratio_50k_adjacent`` is at most 1.3, and the others with theirs."""
    lines = []
    for group in dict.fromkeys(setting_key(r)[3:] for r in rows):
        cpu, products, allocator = group
        mine = [(r, r.get("ratio_50k_adjacent", r["ratio_50k"])) for r in rows
                if setting_key(r)[3:] == group]
        met = [f"{r['arch']} x{r['width']:g} N={r['N']}" for r, ratio in mine if ratio <= 1.3]
        missed = [f"{r['arch']} x{r['width']:g} N={r['N']} ({ratio})" for r, ratio in mine
                  if ratio > 1.3]
        lines += [f"- {cpu or 'earlier machine (cpu not recorded)'}, {products} products, "
                  f"{allocator} allocator: ratio_50k_adjacent at "
                  f"most 1.3: {', '.join(met) or 'nowhere'}; above: "
                  f"{', '.join(missed) or 'nowhere'}."]
    return lines


def write_paper(rows: list[dict], out: Path, base: int) -> str:
    from cost import write

    write(rows, out / "cost_paper")
    body = paper_summary(rows, base)
    (out / "cost_paper.md").write_text(body)
    return body
