"""Each speed lever of a CCA merge measured before and after, in one run.

    python benchmarks/cost_levers.py [--base 77baf0d] [--images 256] [--repeats 3]
                                     [--out benchmarks/results/cost_levers.md]

"Before" is the code at git commit ``--base`` (the statistics pass, the CCA solve and
``apply_transforms`` as they were, loaded from ``git show``), "after" this tree. On the paper's
VGG11 and ResNet20 (3x32x32, random models, ``cost_paper.py``) at x1 and x2 with N = 2 and 4,
``--images`` synthetic images at x1 (a quarter at x2), He-initialised random models by default
(features with a trained net's scale; ``--init default``: torch's init, whose deep VGG features
are offsets that the statistics pass centres), every variant is run in turn ``--repeats``
times and the fastest of each counts (other load on the machine only adds time), so the ratios
compare runs under the same conditions:

* statistics pass: before; after; after with every model centred (the products as before, on
  only the blocks asked for); after with the callers' models deep-copied to channels-last as
  before (instead of copies sharing their tensors); after with a subset of positions (a
  quarter; 16 per image). ``forward``: the bare forward of the N models (channels-last images);
* the solve of the same statistics (before / after), and applying the transforms of the same
  alignment to every model's state dict (before / after);
* peak memory a statistics pass adds, before / after (VmHWM reset before each call, glibc's mmap
  threshold fixed by re-executing with ``MALLOC_MMAP_THRESHOLD_``).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from cost import markdown
from cost_paper import paper_images, paper_model

import ccamerge.moments
import ccamerge.stats
from ccamerge.api import AlignResult
from ccamerge.methods import get_method
from ccamerge.methods.base import AlignContext
from ccamerge.spec import build_spec
from ccamerge.stats import collect_statistics
from ccamerge.transform import apply_transforms

BATCH = 250


def old_module(name: str, path: str, base: str):
    """Module ``name`` from ``path`` at git commit ``base``."""
    source = subprocess.run(["git", "show", f"{base}:{path}"], capture_output=True, text=True,
                            check=True).stdout
    folder = Path("/tmp/ccamerge_levers")
    folder.mkdir(exist_ok=True)
    file = folder / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def status_mb(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb(fn) -> float:
    """Resident memory ``fn()`` adds at its peak (MB)."""
    open("/proc/self/clear_refs", "w").write("5")
    before = status_mb("VmRSS")
    fn()
    return status_mb("VmHWM") - before


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Patched:
    """Run the statistics pass with one module attribute replaced."""

    def __init__(self, module, name: str, value):
        self.module, self.name, self.value = module, name, value

    def __call__(self, fn):
        saved = getattr(self.module, self.name)
        setattr(self.module, self.name, self.value)
        try:
            return fn()
        finally:
            setattr(self.module, self.name, saved)


def channels_last_copy(model):
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


@torch.no_grad()
def forward(models, x) -> None:
    xs = x.contiguous(memory_format=torch.channels_last)
    for m in models:
        for i in range(0, len(xs), BATCH):
            m(xs[i:i + BATCH])


def stats_variants(old_stats, models, spec, x) -> dict:
    """Name -> a call running that variant of the statistics pass."""
    def new(**kw):
        return lambda: collect_statistics(models, spec, x, batch_size=BATCH, **kw)
    centred = Patched(ccamerge.moments, "UNCENTRED_LIMIT", -1.0)
    copies = Patched(ccamerge.stats, "_shared_copy", channels_last_copy)
    return {"forward": lambda: forward(models, x),
            "stats_before": lambda: old_stats.collect_statistics(models, spec, x,
                                                                 batch_size=BATCH),
            "stats_after": new(), "stats_after_centred": lambda: centred(new()),
            "stats_after_deep_copies": lambda: copies(new()),
            "stats_positions_0.25": new(positions=0.25), "stats_positions_16": new(positions=16)}


def solve(cca_module, models, spec, stats):
    ctx = AlignContext([m.state_dict() for m in models], spec, stats)
    return AlignResult(cca_module.align_cca(ctx, gamma=0.1, relative=True), stats, spec, {})


def setting(arch, width, n, images, repeats, old, init: str) -> dict:
    models = [paper_model(arch, width, seed, init) for seed in range(n)]
    spec, x = build_spec(models[0]), paper_images(images)
    variants = stats_variants(old["stats"], models, spec, x)
    for call in variants.values():  # warm-up: kernels, allocator
        call()
    best: dict[str, float] = {}
    for _ in range(repeats):
        for name, call in variants.items():
            best[name] = min(best.get(name, float("inf")), timed(call))
    stats = collect_statistics(models, spec, x, batch_size=BATCH)
    new_cca = sys.modules[get_method("cca").solve.__module__]
    for _ in range(repeats):
        for name, module in (("solve_before", old["cca"]), ("solve_after", new_cca)):
            best[name] = min(best.get(name, float("inf")), timed(
                lambda module=module: solve(module, models, spec, stats)))
    aligned = solve(new_cca, models, spec, stats)
    for _ in range(repeats):
        for name, apply in (("transforms_before", old["transform"].apply_transforms),
                            ("transforms_after", apply_transforms)):
            best[name] = min(best.get(name, float("inf")), timed(lambda apply=apply: [
                apply(m.state_dict(), spec, t) for m, t in
                zip(models, aligned.alignment.transforms, strict=True)]))
    peaks = {"peak_stats_before_mb": peak_mb(variants["stats_before"]),
             "peak_stats_after_mb": peak_mb(variants["stats_after"])}
    return {"arch": arch, "width": width, "N": n, "images": images, "init": init,
            **{k: round(v, 4) for k, v in best.items()},
            **{k: round(v, 1) for k, v in peaks.items()}}


def ratios(row: dict) -> dict:
    """after / before per lever, and the statistics pass over the bare forward."""
    s = row["stats_before"]
    return {"arch": row["arch"], "width": f"x{row['width']:g}", "N": row["N"],
            "init": row["init"],
            "stats/forward before": round(s / row["forward"], 3),
            "stats/forward after": round(row["stats_after"] / row["forward"], 3),
            "after / before": round(row["stats_after"] / s, 3),
            "centring (uncentred / centred)": round(row["stats_after"]
                                                    / row["stats_after_centred"], 3),
            "blocks (centred after / before)": round(row["stats_after_centred"] / s, 3),
            "copies (shared / deep)": round(row["stats_after"] / row["stats_after_deep_copies"],
                                            3),
            "positions 0.25 / all": round(row["stats_positions_0.25"] / row["stats_after"], 3),
            "positions 16 / all": round(row["stats_positions_16"] / row["stats_after"], 3),
            "solve after / before": round(row["solve_after"] / row["solve_before"], 3),
            "transforms after / before": round(row["transforms_after"]
                                               / row["transforms_before"], 3),
            "stats peak MB before / after": f"{row['peak_stats_before_mb']:.0f} / "
                                            f"{row['peak_stats_after_mb']:.0f}"}


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "131072":  # freed tensors leave the RSS
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="77baf0d")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--init", default="kaiming", choices=["kaiming", "default"],
                        help="the models' random init (see cost_paper.paper_model)")
    parser.add_argument("--out", default="benchmarks/results/cost_levers.md")
    args = parser.parse_args()
    old = {"stats": old_module("stats_before", "ccamerge/stats.py", args.base),
           "cca": old_module("cca_before", "ccamerge/methods/cca.py", args.base),
           "transform": old_module("transform_before", "ccamerge/transform.py", args.base)}
    rows = []
    for arch in ("vgg11", "resnet20"):
        for width in (1, 2):
            for n in (2, 4):
                rows.append(setting(arch, width, n, args.images // width**2, args.repeats, old,
                                    args.init))
                print(rows[-1], flush=True)
    table = [ratios(r) for r in rows]
    command = " ".join(["python benchmarks/cost_levers.py", *sys.argv[1:]])
    text = ["# Speed levers of a CCA merge, before and after", "", f"`{command}`", "",
            f"{torch.get_num_threads()} threads; before = commit {args.base}. Ratios of the "
            "fastest of the interleaved repeats (below 1: faster).", "",
            *markdown(table, list(table[0])), "", "Seconds:", "",
            *markdown(rows, list(rows[0]))]
    Path(args.out).write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
