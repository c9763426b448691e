"""Does a merge with its passes on the GPU agree with one on the CPU, and what does it cost there?

    python benchmarks/device_check.py            # a GPU machine: x1..x8 on 50 000 images
    python benchmarks/device_check.py --quick    # any machine, also a CPU: small widths, 512 images
    options: [--device auto] [--widths 1 2 4 8] [--samples 50000] [--check-samples 5000]
             [--archs vgg11 resnet20] [--factorisations 128 256 ... 4096]
             [--out benchmarks/results/device_check.md]

1. Agreement: the CCA merge of two randomly initialised VGG11 and ResNet20 (x1) on
   ``--check-samples`` images, once with the passes on the CPU and once on ``--device``: the
   largest relative difference of the merged weights (per tensor ``max |a - b| / max |b|``;
   must stay below 1e-5) and of the cross-covariances. On a machine without CUDA the device is
   the CPU and the check is only a self-check of the code path (reported as such).
2. Cost: for VGG11 (64-M-128-M-256-256-M-512-512-M-512-512-M, no BatchNorm) and ResNet20 on
   3x32x32 inputs, 10 classes, at every width, on ``--samples`` synthetic CIFAR-shaped images
   (standard normal, fixed seed): the phases of a CCA merge of two models with the passes on the
   device (statistics, solve, transforms and averaging, BatchNorm reset), their total, and the
   bare forward on the device (2 eval passes, plus the train-mode pass for BatchNorm nets, no
   hooks, the same channels-last layout and exact float32, copying models and data there
   included in both), and ``ratio`` = total / bare forward. The solve's eigh and SVD run on the
   device in float64 from :data:`ccamerge.linalg.DEVICE_MIN_SIZE` rows, its products on the host;
   the transforms on the device in float64.
3. Factorisations: float64 ``eigh`` and SVD of ``[n, n]`` matrices (``--factorisations``), numpy
   in and out, on the host and on the device: where the device is faster, hence the size from
   which ccamerge factorises there.

Each phase ends with a device synchronisation. Rows print as JSON lines as they finish and the
Markdown file is rewritten after each row. Models are random (cost does not depend on training;
agreement is a property of the arithmetic).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from cost import markdown
from cost_paper import unavoidable_passes

from ccamerge import linalg
from ccamerge.api import align, aligned_states, place_models
from ccamerge.devices import exact_float32, resolve_device
from ccamerge.distributed import reset_batchnorm_sharded
from ccamerge.models import build_model, count_parameters
from ccamerge.spec import build_spec
from ccamerge.stats import channels_last, collect_statistics
from ccamerge.transform import average_states, with_state

VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
BATCH = 500
TOLERANCE = 1e-5  # merged weights, CPU against device, relative to each tensor's largest entry


def build(arch: str, width: float, seed: int) -> torch.nn.Module:
    """One randomly initialised model of ``arch`` ("vgg11" or "resnet20") for 3x32x32 inputs."""
    torch.manual_seed(seed)
    if arch == "vgg11":
        return build_model("vgg", cfg=VGG11, in_channels=3, image_size=32, width=width).eval()
    return build_model("resnet20", in_channels=3, image_size=32, width=width).eval()


def synthetic_images(n: int, seed: int = 0) -> torch.Tensor:
    """``[n, 3, 32, 32]`` standard normal images (CIFAR-shaped, as if standardised)."""
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Phases:
    """Wall-clock seconds of consecutive phases, each closed by a device synchronisation."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, {}
        sync(device)
        self.last = time.perf_counter()

    def mark(self, name: str) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.times[name], self.last = now - self.last, now


def merge_on(models, x: torch.Tensor, device: torch.device) -> tuple[dict, dict, dict]:
    """A CCA merge with its passes on ``device``: ``(merged state, {point: cov(0, 1)},
    phase seconds)``; what ``ccamerge.api.merge(..., device=...)`` is meant to run."""
    phases = Phases(device)
    models, _ = place_models(models, device)
    spec = build_spec(models[0])
    stats = collect_statistics(models, spec, x, device=device, batch_size=BATCH)
    phases.mark("statistics")
    aligned = align(models, x, "cca", statistics=stats, spec=spec, device=device)
    phases.mark("solve")
    merged = with_state(models[0], average_states(aligned_states(models, aligned)))
    phases.mark("transforms")
    reset_batchnorm_sharded(merged, x, device=device, batch_size=BATCH)
    phases.mark("bn_reset")
    covs = {name: stats[name].cov(0, 1) for name in spec.names}
    return {k: v.cpu() for k, v in merged.state_dict().items()}, covs, phases.times


def seconds_of(run, device: torch.device, repeats: int = 3) -> float:
    """Fastest of ``repeats`` timings of ``run()`` (after one warm-up on a GPU), synchronised."""
    if device.type == "cuda":
        run()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def factorisation_row(n: int, device: torch.device) -> dict:
    """Seconds of a float64 ``eigh`` of an ``[n, n]`` covariance and an SVD of an ``[n, n]``
    cross-covariance, from numpy arrays to numpy arrays, on the host and on ``device`` (copies
    included): the evidence for :data:`ccamerge.linalg.DEVICE_MIN_SIZE`."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((2 * n, 2 * n))
    c = x.T @ x / len(x)
    sym, cross = c[:n, :n], c[:n, n:]
    row = {"n": n}
    for place in dict.fromkeys([torch.device("cpu"), device]):
        label = "host" if place.type == "cpu" else "device"
        repeats = 3 if n < 2048 else 1  # a host SVD of 4096 rows takes tens of seconds
        row[f"eigh_{label}_s"] = round(seconds_of(partial(linalg.eigh, sym, device=place), place,
                                                  repeats), 4)
        row[f"svd_{label}_s"] = round(seconds_of(partial(linalg.svd, cross, device=place), place,
                                                 repeats), 4)
    if device.type == "cuda":
        row["device_faster"] = (row["eigh_device_s"] < row["eigh_host_s"]
                                and row["svd_device_s"] < row["svd_host_s"])
        row["ccamerge_uses"] = "device" if n >= linalg.DEVICE_MIN_SIZE else "host"
    return row


@torch.no_grad()
def bare_forward(models, x: torch.Tensor, device: torch.device) -> float:
    """Seconds for the passes a merge cannot avoid, on ``device``, without hooks."""
    start = Phases(device)
    runners, xd = channels_last(models, x, device)
    with exact_float32():
        unavoidable_passes(runners, xd, BATCH)
    start.mark("forward")
    return start.times["forward"]


def relative_difference(a: dict, b: dict) -> float:
    """Largest ``max |a - b| / max |b|`` over the floating-point entries of ``b``."""
    worst = 0.0
    for key, ref in b.items():
        ref, other = np.asarray(ref, dtype=np.float64), np.asarray(a[key], dtype=np.float64)
        worst = max(worst, float(np.abs(other - ref).max() / max(np.abs(ref).max(), 1e-30)))
    return worst


def floats(state: dict) -> dict:
    return {k: v for k, v in state.items() if v.is_floating_point()}


def agreement_row(arch: str, x: torch.Tensor, device: torch.device) -> dict:
    models = [build(arch, 1, seed) for seed in (0, 1)]
    cpu_state, cpu_covs, _ = merge_on(models, x, torch.device("cpu"))
    dev_state, dev_covs, _ = merge_on(models, x, device)
    weights = relative_difference(floats(dev_state), floats(cpu_state))
    return {"arch": arch, "width": 1, "samples": len(x), "against": str(device),
            "weights_rel_diff": f"{weights:.2e}",
            "covariance_rel_diff": f"{relative_difference(dev_covs, cpu_covs):.2e}",
            "verdict": ("self-check (no CUDA)" if device.type == "cpu"
                        else "agree" if weights <= TOLERANCE else "DISAGREE")}


def cost_row(arch: str, width: float, x: torch.Tensor, device: torch.device) -> dict:
    models = [build(arch, width, seed) for seed in (0, 1)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _state, _covs, phases = merge_on(models, x, device)
    forward = bare_forward(models, x, device)
    total = sum(phases.values())
    row = {"arch": arch, "width": width, "params": count_parameters(models[0]),
           "samples": len(x), **{k: round(v, 3) for k, v in phases.items()},
           "total": round(total, 3), "bare_forward": round(forward, 3),
           "ratio": round(total / forward, 3)}
    if device.type == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def describe(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return (f"device `{device}` ({name or 'CPU'}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} CPU threads")


def report(args, device, agreement, factorisations, cost, seconds: float) -> str:
    """The Markdown file: the command, the machine, the agreement, factorisation and cost
    tables."""
    lines = [f"# Device check{' (--quick)' if args.quick else ''}", "", f"`{args.command}`", "",
             describe(device) + f"; run time {seconds:.0f} s.", ""]
    if device.type == "cpu":
        lines += ["No CUDA device: the agreement rows only check the code path against itself.", ""]
    lines += ["## CPU against device (merged weights must agree to "
              f"{TOLERANCE:g} relative)", "", *markdown(agreement, list(agreement[0])), ""]
    if factorisations:
        lines += ["## Float64 factorisations, host against device (seconds, copies included)", "",
                  f"ccamerge factorises on a CUDA solve device from {linalg.DEVICE_MIN_SIZE} rows "
                  "(`ccamerge.linalg.DEVICE_MIN_SIZE`).", "",
                  *markdown(factorisations, list(factorisations[-1])), ""]
    if cost:
        lines += ["## Cost of a CCA merge of two models (seconds)", "",
                  *markdown(cost, list(dict.fromkeys(k for r in cost for k in r))), ""]
    return "\n".join(lines)


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small widths and data (a CPU)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--archs", nargs="+", default=["vgg11", "resnet20"],
                        choices=["vgg11", "resnet20"])
    parser.add_argument("--widths", nargs="+", type=float, default=None)
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--check-samples", type=int, default=None)
    parser.add_argument("--factorisations", nargs="+", type=int, default=None, metavar="N",
                        help="matrix sizes of the eigh/SVD timings")
    parser.add_argument("--out", default="benchmarks/results/device_check.md")
    args = parser.parse_args(argv)
    args.command = " ".join(["python benchmarks/device_check.py",
                             *(sys.argv[1:] if argv is None else argv)])
    args.widths = args.widths or ([0.25, 0.5] if args.quick else [1, 2, 4, 8])
    args.samples = args.samples or (512 if args.quick else 50_000)
    args.check_samples = args.check_samples or (256 if args.quick else 5000)
    args.factorisations = args.factorisations or ([128, 256, 512] if args.quick
                                                  else [128, 256, 512, 1024, 2048, 4096])
    return args


def main(argv=None) -> None:
    args = parse(argv)
    device = resolve_device(args.device)
    start, out = time.perf_counter(), Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    x_check, x = synthetic_images(args.check_samples, seed=1), synthetic_images(args.samples)
    if device.type == "cuda":  # warm up the context, cuBLAS and cuDNN before timing
        cost_row(args.archs[0], min(args.widths), x[:2 * BATCH], device)
    agreement, cost = [], []
    for arch in args.archs:
        agreement.append(agreement_row(arch, x_check, device))
        print(json.dumps(agreement[-1]), flush=True)
    factorisations = []
    for n in args.factorisations:
        factorisations.append(factorisation_row(n, device))
        print(json.dumps(factorisations[-1]), flush=True)
    for arch in args.archs:
        for width in args.widths:
            cost.append(cost_row(arch, width, x, device))
            print(json.dumps(cost[-1]), flush=True)
            out.write_text(report(args, device, agreement, factorisations, cost,
                                  time.perf_counter() - start))
    out.write_text(report(args, device, agreement, factorisations, cost,
                          time.perf_counter() - start))
    if any(row["verdict"] == "DISAGREE" for row in agreement):
        sys.exit(f"CPU and {device} merges disagree beyond {TOLERANCE:g}; see {out}")


if __name__ == "__main__":
    main()
