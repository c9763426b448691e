"""Accuracy of base models, the ensemble and every merge method on digits, driven through the CLI.

    python benchmarks/core_table.py [--out runs/core] [--archs mlp vgg] [--seeds 0 1 2 3]

Trains (or reuses) one model per seed with `ccamerge train`, then runs `ccamerge evaluate
--ensemble` and `ccamerge merge` for every method at N = 2 (seeds 0, 1) and N = all seeds, and
prints a Markdown table and the commands it ran.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

METHODS = ["average", "permute", "weight_matching", "zipit", "ot", "cca"]


def ccamerge(*args: str) -> dict:
    cmd = [sys.executable, "-m", "ccamerge", *args, "--json", "--quiet"]
    print("$ ccamerge " + " ".join(args), file=sys.stderr)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr.strip())
    return json.loads(done.stdout)


def table_for(arch: str, seeds: list[str], out: Path) -> list[str]:
    trained = ccamerge("train", "--arch", arch, "--data", "digits", "--seeds", *seeds,
                       "--out", str(out / arch))
    paths = [m["path"] for m in trained["models"]]
    rows = []
    for n in (2, len(paths)):
        chosen = paths[:n]
        scores = ccamerge("evaluate", *chosen, "--data", "digits", "--ensemble")
        base = [m["accuracy"] for m in scores["models"]]
        row = {"arch": arch, "N": n, "base": " / ".join(f"{a:.1f}" for a in base),
               "ensemble": scores["ensemble"]["accuracy"]}
        for method in METHODS:
            merged = ccamerge("merge", *chosen, "--method", method, "--data", "digits",
                              "--out", str(out / f"{arch}_n{n}_{method}.safetensors"))
            row[method] = merged["accuracy"]
        rows.append(row)
    header = ["arch", "N", "base", "ensemble", *METHODS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(v if isinstance(v, str)
                                       else (f"{v:.1f}" if isinstance(v, float) else str(v))
                                       for v in (row[h] for h in header)) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/core")
    parser.add_argument("--archs", nargs="+", default=["mlp", "vgg"])
    parser.add_argument("--seeds", nargs="+", default=["0", "1", "2", "3"])
    args = parser.parse_args()
    lines = []
    for arch in args.archs:
        lines += table_for(arch, args.seeds, Path(args.out))
    print("\n".join(dict.fromkeys(lines)))


if __name__ == "__main__":
    main()
