"""Peak memory of a CCA merge whose statistics stream an image folder, as the sample grows.

    python benchmarks/stream_memory.py [--base 1000] [--arch vgg] [--width 1] [--folder DIR]
                                       [--out benchmarks/results]

Writes Fashion-MNIST (the Debian package ``dataset-fashion-mnist``) as PNG files to a temporary
image folder (``train/<class>/*.png``: 16x ``--base`` training images, ``test/<class>/*.png``:
``--base`` test images), then, in a fresh process per size, loads the folder with
``load_dataset`` and merges two randomly initialised models (VGG with BatchNorm by default) with
CCA on ``stats_samples`` = 1x, 4x and 16x ``--base`` images; the BatchNorm reset streams the
whole training folder every time. Each process first runs a warm-up merge (kernels, buffers),
resets its peak resident set (Linux ``VmHWM`` through ``/proc/self/clear_refs``, as
``benchmarks/cost.py`` does) and reports the peak the measured merge adds. Streaming keeps the
three peaks within 10% of each other (target max/min <= 1.1); the result goes to
``stream_memory.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from ccamerge.api import merge
from ccamerge.data import FASHION_MNIST_FILES, find_fashion_dir, load_dataset, read_idx
from ccamerge.data.builtin import idx_file
from ccamerge.errors import CcamergeError
from ccamerge.models import build_model

FACTORS = (1, 4, 16)
BATCH = 256
TARGET = 1.1  # largest over smallest peak


def write_folder(root: Path, train: int, test: int) -> None:
    """The first ``train`` training and ``test`` test images of Fashion-MNIST as PNG files."""
    folder = find_fashion_dir(None)
    if folder is None:
        raise CcamergeError("Fashion-MNIST not found; run `apt-get install -y "
                            "dataset-fashion-mnist`")
    for split, count, (x_key, y_key) in (("train", train, ("x_train", "y_train")),
                                         ("test", test, ("x_test", "y_test"))):
        images = read_idx(idx_file(folder, FASHION_MNIST_FILES[x_key]))  # uint8 [N, 28, 28]
        labels = read_idx(idx_file(folder, FASHION_MNIST_FILES[y_key]))  # [N]
        if count > len(images):
            raise CcamergeError(f"Fashion-MNIST has {len(images)} {split} images, {count} asked")
        for i in range(count):
            path = root / split / f"class{labels[i]}" / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(path)


def status_mb(key: str) -> float:
    """A ``/proc/self/status`` memory entry (e.g. ``VmHWM``, the peak resident set) in MB."""
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure(folder: str, samples: int, arch: str, width: float) -> dict:
    """In this process: load the folder, warm up, then the peak a merge on ``samples`` adds."""
    data = load_dataset(folder)
    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        models.append(build_model(arch, image_shape=list(data.input_shape), width=width,
                                  num_classes=data.num_classes,
                                  **({"batch_norm": True} if arch == "vgg" else {})).eval())
    merge(models, data, "cca", stats_samples=2 * BATCH, batch_size=BATCH)  # one-time allocations
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak (VmHWM) to the current resident set
    before = status_mb("VmRSS")
    start = time.perf_counter()
    result = merge(models, data, "cca", stats_samples=samples, batch_size=BATCH)
    seconds = time.perf_counter() - start
    assert result.statistics.summary()[result.spec.names[0]]["samples"] >= samples
    return {"samples": samples, "peak_extra_mb": round(status_mb("VmHWM") - before, 1),
            "process_peak_mb": round(status_mb("VmHWM"), 1), "merge_s": round(seconds, 1)}


def run_child(folder: Path, samples: int, arch: str, width: float) -> dict:
    """:func:`measure` in a fresh process; glibc's mmap threshold is fixed so that freed
    tensors leave the resident set (its sliding threshold varies the peak from run to run)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run([sys.executable, __file__, "--measure", str(folder), str(samples),
                           "--arch", arch, "--width", str(width)], capture_output=True,
                          text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(rows: list[dict], args, train_images: int) -> str:
    """The Markdown summary written to ``stream_memory.md``."""
    peaks = [r["peak_extra_mb"] for r in rows]
    ratio = max(peaks) / min(peaks)
    lines = [f"Peak memory a CCA merge adds (MB) when its statistics stream an image folder of "
             f"{train_images} Fashion-MNIST PNGs (28x28 grey), two randomly initialised "
             f"{args.arch} x{args.width:g} models{' with BatchNorm' if args.arch == 'vgg' else ''}"
             f", batches of {BATCH}, {torch.get_num_threads()} threads; the BatchNorm reset "
             "streams the whole folder each time.", "",
             "| stats samples | peak added (MB) | process peak (MB) | merge (s) |",
             "|---|---|---|---|"]
    lines += [f"| {r['samples']} | {r['peak_extra_mb']} | {r['process_peak_mb']} | "
              f"{r['merge_s']} |" for r in rows]
    held = train_images * 28 * 28 * 4 / 2**20
    lines += ["", f"Largest over smallest peak: {ratio:.3f} (target at most {TARGET}: "
              f"{'met' if ratio <= TARGET else 'missed'}). Held in memory as float32, the "
              f"{train_images} images alone would take {held:.0f} MB. Times are wall-clock with "
              f"a load average of {args.load:.1f} on {os.cpu_count()} cores (other processes "
              "shared the machine); the peaks do not depend on it.", "",
              f"Regenerate with `python benchmarks/stream_memory.py --base {args.base} --arch "
              f"{args.arch} --width {args.width:g}`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, default=1000, help="statistics samples at 1x")
    parser.add_argument("--arch", default="vgg", choices=["vgg", "resnet20", "mlp"])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--folder", default=None, help="write the PNGs here (default: a temp dir)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "SAMPLES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], int(args.measure[1]), args.arch, args.width)))
        return
    train_images = max(FACTORS) * args.base
    with tempfile.TemporaryDirectory(prefix="ccamerge-stream-") as scratch:
        folder = Path(args.folder or scratch) / "fashion-png"
        start = time.perf_counter()
        write_folder(folder, train_images, args.base)
        print(f"wrote {train_images} + {args.base} PNGs to {folder} in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        rows, loads = [], []
        for factor in FACTORS:
            loads.append(os.getloadavg()[0])
            rows.append(run_child(folder, factor * args.base, args.arch, args.width))
            print(json.dumps(rows[-1]), flush=True)
    args.load = sum(loads) / len(loads)
    body = report(rows, args, train_images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stream_memory.md").write_text(body)
    print(body)


if __name__ == "__main__":
    main()
