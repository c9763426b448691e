"""Peak memory of averaging N aligned models: every aligned state dict held, then averaged (the
path before ``ccamerge.average``), against the entry-at-a-time average the merge now runs.

Paper-shape VGG11 models (random, ``cost_paper.paper_model``) and dense random orthogonal maps at
every merge point of every model but the reference (what CCA produces, in size), each path in a
fresh process; the peak is the process's VmHWM over its resident set just before the average
(the models and maps already built), in GB, glibc's mmap threshold fixed at 128 KiB so that freed
tensors leave it (the live peak). Both results are checked equal bit for bit.

    python benchmarks/average_memory.py --width 4 --n 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PATHS = ("held", "streamed")


def random_alignment(models, spec, seed: int = 0):
    """Identity maps for model 0, dense orthogonal ``T`` (``T_inv = T^T``) for the others."""
    from ccamerge.methods import Alignment
    from ccamerge.transform import Transform

    gen = torch.Generator().manual_seed(seed)
    transforms = [{p.name: Transform.identity(p.width) for p in spec.points}]
    for _ in models[1:]:
        maps = {}
        for p in spec.points:
            q, _r = torch.linalg.qr(torch.randn(p.width, p.width, generator=gen,
                                                dtype=torch.float64))
            maps[p.name] = Transform(q.numpy(), q.T.contiguous().numpy())
        transforms.append(maps)
    return Alignment(transforms)


def measure(path: str, width: float, n: int) -> dict:
    """One path's peak over the models and maps, in this process."""
    from cost_paper import paper_model, status_mb

    from ccamerge.api import AlignResult, aligned_states
    from ccamerge.average import average_aligned_state
    from ccamerge.spec import build_spec
    from ccamerge.transform import average_states

    models = [paper_model("vgg11", width, seed) for seed in range(n)]
    spec = build_spec(models[0])
    alignment = random_alignment(models, spec)
    weights = [1.0 / n] * n
    before = status_mb("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here
    start = time.perf_counter()
    if path == "held":
        aligned = AlignResult(alignment, None, spec, {})
        state = average_states(aligned_states(models, aligned), weights)
    else:
        state = average_aligned_state(models, alignment, spec, weights)
    seconds = time.perf_counter() - start
    peak = status_mb("VmHWM")
    digest = sum(float(v.double().sum()) for v in state.values() if v.is_floating_point())
    model_gb = sum(v.numel() * v.element_size() for v in models[0].state_dict().values()) / 2**30
    return {"path": path, "width": width, "n": n, "model_gb": round(model_gb, 3),
            "peak_extra_gb": round((peak - before) / 1024, 3), "seconds": round(seconds, 2),
            "digest": digest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=4.0)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--path", choices=PATHS, help="measure one path in this process")
    parser.add_argument("--out", default=None, help="append the Markdown report to this file")
    args = parser.parse_args()
    if args.path:
        print(json.dumps(measure(args.path, args.width, args.n)))
        return
    rows = []
    for path in PATHS:
        out = subprocess.run([sys.executable, __file__, "--path", path, "--width",
                              str(args.width), "--n", str(args.n)],
                             check=True, capture_output=True, text=True,
                             env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    held, streamed = rows
    same = held["digest"] == streamed["digest"]
    report = (f"VGG11 x{args.width:g}, N = {args.n} (one model {held['model_gb']} GB): peak added "
              f"by the average, held {held['peak_extra_gb']} GB in {held['seconds']} s, "
              f"entry at a time {streamed['peak_extra_gb']} GB in {streamed['seconds']} s "
              f"({held['peak_extra_gb'] / streamed['peak_extra_gb']:.2f}x less); "
              f"sums {'equal' if same else 'DIFFERENT'}.")
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"- {report}\n")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
