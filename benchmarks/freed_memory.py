"""What keeping freed memory for reuse (``ccamerge.allocator.keep_freed_memory``, which the CLI
asks for) does to the bare forward and to the statistics pass.

    python benchmarks/freed_memory.py [--arch vgg11] [--width 4] [--images 500] [--rounds 2]

Two random models of the paper's shapes (``cost_paper.paper_model``) on CIFAR-shaped images in
batches of 250, the standard layout pinned. Each round runs two fresh processes, one with
glibc's defaults and one after ``keep_freed_memory()`` (then each pass keeps freed memory
while it runs: ``ccamerge.allocator.for_a_pass``, which ``cost_paper.bare_forward`` enters too), in
alternating order so that load on the machine spreads over both; each process warms up on one
batch, then times the bare forward (N eval passes, no hooks) and the statistics pass twice and
keeps the faster of each. Prints the medians over rounds and writes ``freed_memory.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics as stat
import subprocess
import sys
from pathlib import Path

BATCH = 250
CHILD = """
import json, sys
sys.path.insert(0, 'benchmarks')
import torch
from ccamerge.allocator import keep_freed_memory
from ccamerge.layout import pinned
from cost_paper import bare_forward, paper_images, paper_model, statistics, timed_statistics
kept = keep_freed_memory() if {keep} else False
torch.set_num_threads(2)
models = [paper_model({arch!r}, {width}, seed) for seed in range(2)]
x = paper_images({images})
best = {{"forward": float("inf"), "statistics": float("inf")}}
with pinned("standard"):
    bare_forward(models, x[:{batch}], {batch}, "standard")
    statistics(models, x[:{batch}], {batch}, None)
    for _ in range(2):
        best["forward"] = min(best["forward"], sum(bare_forward(models, x, {batch}, "standard")))
        best["statistics"] = min(best["statistics"], timed_statistics(models, x, {batch}, None)[1])
print(json.dumps(best | {{"kept": kept}}))
"""


def run(keep: bool, arch: str, width: float, images: int) -> dict:
    code = CHILD.format(keep=keep, arch=arch, width=width, images=images, batch=BATCH)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(rows: list[dict], args) -> str:
    def median(keep: bool, key: str) -> float:
        return stat.median(r[key] for r in rows if r["keep"] == keep)

    lines = ["# Keeping freed memory for reuse", "",
             f"`python benchmarks/freed_memory.py --arch {args.arch} --width {args.width:g} "
             f"--images {args.images} --rounds {args.rounds}`", "",
             f"Two random {args.arch} x{args.width:g} models, {args.images} images in batches of "
             f"{BATCH}, standard layout, 2 threads; seconds, median over {args.rounds} rounds "
             "of fresh processes (glibc's defaults / after `keep_freed_memory()`).", "",
             "| pass | defaults | kept | kept / defaults |", "|---|---|---|---|"]
    for key in ("forward", "statistics"):
        before, after = median(False, key), median(True, key)
        lines.append(f"| {key} | {before:.2f} | {after:.2f} | {after / before:.3f} |")
    lines += ["", "Statistics over the bare forward: defaults "
              f"{median(False, 'statistics') / median(False, 'forward'):.3f}, kept "
              f"{median(True, 'statistics') / median(True, 'forward'):.3f}.",
              f"Took effect in the kept processes: {all(r['kept'] for r in rows if r['keep'])}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vgg11", choices=["vgg11", "resnet20"])
    parser.add_argument("--width", type=float, default=4)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    rows = []
    for i in range(args.rounds):
        for keep in ((False, True) if i % 2 == 0 else (True, False)):
            rows.append(run(keep, args.arch, args.width, args.images) | {"keep": keep})
            print(json.dumps(rows[-1]), flush=True)
    text = report(rows, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "freed_memory.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
