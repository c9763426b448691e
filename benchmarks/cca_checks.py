"""Why CCA Merge trails permutation matching where it does: checks on the default profile's pools.

    python benchmarks/cca_checks.py [--results benchmarks/results/default]
        [--cache benchmarks/cache]      # after benchmarks/reproduce.py (reuses its checkpoints)

For fixed subsets of the reproduction's pools (trained for the epochs its plateau rule chose,
``--results``/pools.csv), merges with permutation matching, ZipIt! and CCA Merge over the whole
relative-gamma grid under the default ``mapped`` BatchNorm policy (folded into the convolutions,
each merged unit given the mapped moments of the original models' features), and on BatchNorm
nets also under the paper's handling (``paper``). Accuracy is on the test
subset: this is a diagnosis of the gap (is it the selected gamma? the BatchNorm handling?), never
a selection. Writes ``cca_checks.csv`` and ``cca_checks.md`` beside the reproduction's results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cost import write
from reproduce import PROFILES, reproduction_settings, split_data

from ccamerge.api import merge
from ccamerge.evaluate import evaluate_model
from ccamerge.io import load_model

CASES = [("resnet20", 1, "same", [0, 1]), ("resnet20", 1, "same", [0, 1, 2, 3]),
         ("vgg", 1, "same", [0, 1]), ("vgg", 1, "same", [0, 1, 2])]
GAMMAS = [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]


def checks(arch, width, setting, subset, data, cache: Path, stats: int) -> dict:
    models = [load_model(cache / f"{arch}_w{width}_{setting}_s{i}.safetensors") for i in subset]

    def accuracy(method, **options):
        merged = merge(models, data, method, stats_samples=stats, **options).model
        return round(evaluate_model(merged, data.x_test, data.y_test)["accuracy"], 1)

    row = {"arch": arch, "width": width, "setting": setting, "subset": "-".join(map(str, subset)),
           "permute": accuracy("permute"), "zipit": accuracy("zipit")}
    for gamma in GAMMAS:
        row[f"cca gamma={gamma:g}"] = accuracy("cca", gamma=gamma, relative=True)
    if arch == "resnet20":
        row["permute paper"] = accuracy("permute", bn_policy="paper")
        for gamma in GAMMAS:
            row[f"cca gamma={gamma:g} paper"] = accuracy("cca", gamma=gamma, relative=True,
                                                         bn_policy="paper")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/default"))
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/cache"))
    args = parser.parse_args()
    profile = PROFILES["default"]
    data, _held = split_data(profile)
    out = args.results
    rows = []
    for case in CASES:
        epochs, _options = reproduction_settings(args.results, case[0])
        cache = args.cache / "default" / f"e{epochs}"
        rows.append(checks(*case, data, cache, profile["stats"]))
        print(json.dumps(rows[-1]), flush=True)
    write(rows, out / "cca_checks")
    print((out / "cca_checks.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
