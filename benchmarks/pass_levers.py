"""The statistics pass's latest levers, each on and off, in one run.

    python benchmarks/pass_levers.py [--images 1000] [--repeats 3]
                                     [--out benchmarks/results/pass_levers.md]

On the paper's VGG11 and ResNet20 (3x32x32, random models, ``cost_paper.py``), N = 2, batches of
250, ``--images`` synthetic images at x1 (that / width^2 above, at least one batch), every
variant of :func:`ccamerge.stats.collect_statistics` runs in turn ``--repeats`` times and the
fastest of each counts (other load on the machine only adds time):

* ``before``: images channels-last (what every pass did before :mod:`ccamerge.layout`), each
  self block one GEMM (``ccamerge.moments.GRAM_BLOCKS`` emptied) and every product through
  ``torch.mm`` (no oneDNN: :func:`ccamerge.moments.onednn_nt` and ``onednn_tn`` answering
  None);
* ``layout``: the layout :func:`ccamerge.layout.choose_layout` picks, self blocks one GEMM;
* ``gram``: channels-last, self blocks as the row blocks of their upper triangle;
* ``copy``: both, but every standard-layout map copied to channels-last (no
  :class:`ccamerge.moments.ChannelMaps`: ``MAP_MIN_POSITIONS`` out of reach; where oneDNN is
  there, standard-layout maps are unit rows either way, so this lever only acts without it);
* ``mkl``: the code as it is but every product through ``torch.mm`` (MKL on x86): maps read as
  channels-last samples ``[S, n]``, no unit rows (:class:`ccamerge.moments.UnitRows`);
* ``mkl_samples``: the code as it is but samples ``[S, n]`` (channels-last maps) multiplied by
  ``torch.mm`` rather than oneDNN's weight gradient (:func:`ccamerge.moments.tn_product`);
* ``after``: all four (the code as it is);
* the bare forward of the two models in either layout (no hooks), for statistics / forward.

``probe_s``: the one-time layout probe (model 0 on the quarters of one batch in each layout).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from cost import markdown
from cost_paper import cpu_name, paper_images, paper_model

import ccamerge.moments
import ccamerge.stats
from ccamerge.layout import choose_layout, forget_choices, in_layout, pinned
from ccamerge.spec import build_spec
from ccamerge.stats import collect_statistics

BATCH = 250
SETTINGS = (("vgg11", 1), ("vgg11", 2), ("vgg11", 4), ("resnet20", 1), ("resnet20", 4))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def forward(models, x, layout: str) -> None:
    for m in models:
        for i in range(0, len(x), BATCH):
            m(in_layout(x[i:i + BATCH], layout))


def variants(models, spec, x) -> dict:
    """Name -> a call running that variant."""
    def stats(layout: str, gram: bool, in_place: bool = True, without: tuple = ()):
        def call():
            blocks, least = ccamerge.moments.GRAM_BLOCKS, ccamerge.stats.MAP_MIN_POSITIONS
            checked = {form: ccamerge.moments._onednn(form) for form in ("nt", "tn")}
            ccamerge.moments.GRAM_BLOCKS = blocks if gram else ()
            ccamerge.stats.MAP_MIN_POSITIONS = least if in_place else 2**62
            ccamerge.moments._ONEDNN.update(dict.fromkeys(without))
            try:
                with pinned(layout):
                    collect_statistics(models, spec, x, batch_size=BATCH)
            finally:
                ccamerge.moments.GRAM_BLOCKS = blocks
                ccamerge.stats.MAP_MIN_POSITIONS = least
                ccamerge.moments._ONEDNN.update(checked)
        return call
    return {"forward_standard": lambda: forward(models, x, "standard"),
            "forward_channels_last": lambda: forward(models, x, "channels_last"),
            "before": stats("channels_last", False, False, ("nt", "tn")),
            "layout": stats("auto", False), "gram": stats("channels_last", True),
            "copy": stats("auto", True, False), "mkl": stats("auto", True, True, ("nt", "tn")),
            "mkl_samples": stats("auto", True, True, ("tn",)),
            "after": stats("auto", True)}


def setting(arch: str, width: float, images: int, repeats: int) -> dict:
    models = [paper_model(arch, width, seed) for seed in range(2)]
    spec, x = build_spec(models[0]), paper_images(images)
    forget_choices()
    probe = timed(lambda: choose_layout(models[0], x[:BATCH]))
    chosen = choose_layout(models[0], x[:BATCH])
    calls = variants(models, spec, x)
    for call in calls.values():  # warm-up: kernels, allocator
        call()
    best: dict[str, float] = {}
    for _ in range(repeats):
        for name, call in calls.items():
            best[name] = min(best.get(name, float("inf")), timed(call))
    return {"arch": arch, "width": width, "images": images, "layout_chosen": chosen,
            "probe_s": round(probe, 3), **{k: round(v, 3) for k, v in best.items()}}


def ratios(row: dict) -> dict:
    forward = min(row["forward_standard"], row["forward_channels_last"])
    return {"arch": row["arch"], "width": f"x{row['width']:g}", "layout": row["layout_chosen"],
            "forward channels-last / standard": round(row["forward_channels_last"]
                                                      / row["forward_standard"], 3),
            "stats/forward before": round(row["before"] / forward, 3),
            "stats/forward after": round(row["after"] / forward, 3),
            "layout lever (auto / channels-last)": round(row["after"] / row["gram"], 3),
            "gram lever (triangle / one GEMM)": round(row["after"] / row["layout"], 3),
            "maps lever (in place / copied)": round(row["after"] / row["copy"], 3),
            "oneDNN lever (oneDNN / torch.mm)": round(row["after"] / row["mkl"], 3),
            "oneDNN samples lever (oneDNN / torch.mm for [S, n])":
                round(row["after"] / row["mkl_samples"], 3),
            "after / before": round(row["after"] / row["before"], 3),
            "probe / after": round(row["probe_s"] / row["after"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--widths", nargs="+", type=float, default=None,
                        help="only these widths (default: the settings above)")
    parser.add_argument("--out", default="benchmarks/results/pass_levers.md")
    args = parser.parse_args()
    rows = []
    for arch, width in SETTINGS:
        if args.widths and width not in args.widths:
            continue
        images = max(BATCH, round(args.images / width**2))
        rows.append(setting(arch, width, images, args.repeats))
        print(rows[-1], flush=True)
    command = " ".join(["python benchmarks/pass_levers.py", *sys.argv[1:]])
    print(write(rows, Path(args.out), command))


def write(rows: list[dict], out: Path, command: str) -> str:
    """The levers' table of the measured ``rows`` (:func:`setting`) written to ``out``."""
    table = [ratios(r) for r in rows]
    text = ["# The statistics pass's memory layout, symmetric self blocks, in-place maps and "
            "oneDNN products, on and off", "",
            f"cpu: {cpu_name()}", "",
            f"`{command}`", "", f"{torch.get_num_threads()} threads, N = 2, batches of {BATCH}; "
            "ratios of the fastest of the interleaved repeats (below 1: faster). stats/forward: "
            "over the bare forward in its faster layout.", "",
            *markdown(table, list(table[0])), "", "Seconds:", "",
            *markdown(rows, list(rows[0]))]
    out.write_text("\n".join(text) + "\n")
    return "\n".join(text)


if __name__ == "__main__":
    main()
