"""Turn a reproduction run's CSV files into ``summary.md``, ``plots.html`` and the README's
"Results" section.

    python benchmarks/report.py benchmarks/results/default [--readme README.md]
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats

from ccamerge.evaluate import barrier

METHOD_ORDER = ["base", "ensemble", "average", "permute", "weight_matching", "zipit", "ot", "cca"]
TIE = 0.5  # accuracy points within which CCA and permutation matching are called even
START, END = "<!-- results:start -->", "<!-- results:end -->"


def read(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def grouped(rows: list[dict]) -> dict[tuple, dict[str, list[float]]]:
    """(arch, width, setting, N) -> method -> accuracies over subsets."""
    table: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        key = (r["arch"], float(r["width"]), r["setting"], int(r["N"]))
        table[key][r["method"]].append(float(r["accuracy"]))
    return table


def accuracy_table(table) -> list[str]:
    methods = [m for m in METHOD_ORDER if any(m in v for v in table.values())]
    lines = ["| arch | width | setting | N | " + " | ".join(methods) + " |",
             "|" + "---|" * (4 + len(methods))]
    for (arch, width, setting, n), scores in sorted(table.items()):
        cells = [f"{np.mean(scores[m]):.1f} ± {np.std(scores[m]):.1f}" if m in scores else ""
                 for m in methods]
        lines.append(f"| {arch} | x{width:g} | {setting} | {n} | " + " | ".join(cells) + " |")
    return lines


def verdict(table) -> list[str]:
    """Where CCA wins, ties or loses against permutation matching, and by how much."""
    diffs = {key: np.mean(s["cca"]) - np.mean(s["permute"]) for key, s in table.items()
             if "cca" in s and "permute" in s}
    if not diffs:
        return []
    wins = [k for k, d in diffs.items() if d > TIE]
    losses = [k for k, d in diffs.items() if d < -TIE]
    by_n = defaultdict(list)
    for (_a, _w, _s, n), d in diffs.items():
        by_n[n].append(d)
    lines = [f"CCA Merge against permutation matching over {len(diffs)} settings "
             f"(arch x width x split x N): ahead by more than {TIE} points in {len(wins)}, "
             f"within {TIE} in {len(diffs) - len(wins) - len(losses)}, behind in {len(losses)}.",
             "Mean difference (CCA - permute, accuracy points) by number of merged models: "
             + ", ".join(f"N={n}: {np.mean(v):+.1f}" for n, v in sorted(by_n.items())) + "."]
    if losses:
        worst = min(losses, key=lambda k: diffs[k])
        lines.append(f"Largest loss: {diffs[worst]:+.1f} points ({worst[0]} x{worst[1]:g}, "
                     f"{worst[2]}, N={worst[3]}).")
    if wins:
        best = max(wins, key=lambda k: diffs[k])
        lines.append(f"Largest win: {diffs[best]:+.1f} points ({best[0]} x{best[1]:g}, "
                     f"{best[2]}, N={best[3]}).")
    return lines


def interval(diffs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t interval (nan for fewer than two values)."""
    d = np.asarray(diffs, float)
    if len(d) < 2:
        return float(d.mean()) if len(d) else float("nan"), float("nan")
    return float(d.mean()), float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))


def _cell(diffs: list[float]) -> str:
    """``+1.2 [+0.3, +2.1]``: mean and 95% t interval (the mean alone for one value)."""
    mean, half = interval(diffs)
    return f"{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}]" if np.isfinite(half) \
        else f"{mean:+.1f}"


def paired(rows: list[dict], a: str, b: str, group: tuple[str, ...], unit: str = "subset",
           value: str = "accuracy", label: str = "method") -> dict[tuple, list[float]]:
    """``group`` values -> ``a - b`` per ``unit`` where both were measured."""
    found: dict[tuple, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        found[tuple(r[g] for g in group)][r[unit]][r[label]] = float(r[value])
    return {key: [v[a] - v[b] for v in units.values() if a in v and b in v]
            for key, units in found.items() if any(a in v and b in v for v in units.values())}


def paired_table(rows: list[dict]) -> list[str]:
    """CCA minus permutation matching per cell under the default (mapped) and the paper's
    BatchNorm policies, and the policy's own effect on CCA, paired over the same subsets, with
    95% t intervals."""
    group = ("arch", "width", "setting", "N")
    columns = [(a, b) for a, b in (("cca", "permute"), ("cca paper", "permute paper"),
                                   ("cca", "cca paper"))
               if paired(rows, a, b, group)]
    if not columns:
        return []
    tables = {c: paired(rows, *c, group) for c in columns}
    keys = sorted(set().union(*tables.values()), key=lambda k: (k[0], float(k[1]), k[2], int(k[3])))
    lines = ["| arch | width | setting | N | subsets | "
             + " | ".join(f"{a} - {b}" for a, b in columns) + " |",
             "|" + "---|" * (5 + len(columns))]
    for key in keys:
        cells = [_cell(tables[c].get(key, [])) for c in columns]
        count = max(len(t.get(key, [])) for t in tables.values())
        lines.append(f"| {key[0]} | x{float(key[1]):g} | {key[2]} | {key[3]} | {count} | "
                     + " | ".join(cells) + " |")
    return lines


def options_table(rows: list[dict]) -> list[str]:
    """Held-out accuracy of each option variant (CCA, N = 2) minus the paper's handling, paired
    over pairs, 95% t intervals."""
    if not rows:
        return []
    variants = list(dict.fromkeys(r["variant"] for r in rows if r["variant"] != "paper"))
    group = ("arch", "width", "setting")
    tables = {v: paired(rows, v, "paper", group, value="held_out_accuracy", label="variant")
              for v in variants}
    lines = ["| arch | width | setting | " + " | ".join(f"{v} - paper" for v in variants) + " |",
             "|" + "---|" * (3 + len(variants))]
    for key in sorted(set().union(*tables.values())):
        cells = [_cell(tables[v].get(key, [])) for v in variants]
        lines.append(f"| {key[0]} | x{float(key[1]):g} | {key[2]} | " + " | ".join(cells) + " |")
    return lines


def pools_table(rows: list[dict]) -> list[str]:
    lines = ["| arch | width | setting | epochs (plateau rule) | training loss | training accuracy "
             "| trail (epochs, loss) |", "|---|---|---|---|---|---|---|"]
    return lines + [f"| {r['arch']} | x{float(r['width']):g} | {r['setting']} | {r['epochs']} "
                    f"({r['steps_epochs']} with the split's share) | {float(r['train_loss']):.3f} "
                    f"| {float(r['train_accuracy']):.1f} | {r['trail']} |" for r in rows]


def barrier_table(rows: list[dict], key: str) -> list[str]:
    """Per pool and method: the loss barrier (``key="loss"``) or the accuracy barrier, the
    accuracy points lost below the straight line between the two endpoints (``"accuracy"``)."""
    table: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        values = json.loads(r[key])
        if key == "accuracy":  # a dip in accuracy is a barrier: measure it on -accuracy
            values = [-v for v in values]
        table[(r["arch"], float(r["width"]), r["setting"])][r["method"]] = barrier(
            json.loads(r["lambdas"]), values)
    methods = [m for m in METHOD_ORDER if any(m in v for v in table.values())]
    digits = 3 if key == "loss" else 1
    lines = ["| arch | width | setting | " + " | ".join(methods) + " |",
             "|" + "---|" * (3 + len(methods))]
    for (arch, width, setting), b in sorted(table.items()):
        lines.append(f"| {arch} | x{width:g} | {setting} | "
                     + " | ".join(f"{b[m]:.{digits}f}" if m in b else "" for m in methods) + " |")
    return lines


def plots(table, barrier_rows: list[dict], path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    pools = sorted({k[:3] for k in table})
    fig = make_subplots(rows=len(pools), cols=1, subplot_titles=[
        f"{a} x{w:g}, {s}: test accuracy vs number of merged models" for a, w, s in pools])
    for row, pool in enumerate(pools, start=1):
        ns = sorted(k[3] for k in table if k[:3] == pool)
        for method in METHOD_ORDER:
            ys = [np.mean(table[(*pool, n)][method]) for n in ns if method in table[(*pool, n)]]
            if ys:
                fig.add_trace(go.Scatter(x=ns, y=ys, mode="lines+markers", name=method,
                                         legendgroup=method, showlegend=row == 1), row=row, col=1)
    fig.update_layout(height=320 * len(pools), title="CCA Merge reproduction")
    curves = go.Figure()
    for r in barrier_rows:
        curves.add_trace(go.Scatter(x=json.loads(r["lambdas"]), y=json.loads(r["loss"]),
                                    mode="lines+markers",
                                    name=f"{r['arch']} x{float(r['width']):g} "
                                         f"{r['setting']} {r['method']}"))
    curves.update_layout(title="Interpolation loss between two models (N = 2)",
                         xaxis_title="lambda", yaxis_title="test loss", height=600)
    path.write_text(fig.to_html(include_plotlyjs="cdn", full_html=True)
                    + curves.to_html(include_plotlyjs=False, full_html=False))


def rewrite_section(readme: Path, start: str, end: str, body: str) -> None:
    """Replace what stands between the ``start`` and ``end`` markers of ``readme`` with ``body``
    (nothing happens when a marker is missing)."""
    content = readme.read_text()
    if start in content and end in content:
        head, rest = content.split(start, 1)
        tail = rest.split(end, 1)[1]
        readme.write_text(f"{head}{start}\n{body}{end}{tail}")


def _optional(path: Path) -> list[dict]:
    return read(path) if path.exists() else []


def _section(title: str, lines: list[str]) -> list[str]:
    return [title, "", *lines, ""] if lines else []


def write_report(out: Path, readme: Path | None = None) -> str:
    run = json.loads((out / "run.json").read_text())
    accuracy_rows = read(out / "accuracy.csv")
    table = grouped(accuracy_rows)
    barriers = read(out / "barriers.csv")
    selected = read(out / "selected.csv")
    command = "python benchmarks/reproduce.py" + {"quick": " --quick", "gpu": " --gpu",
                                                  "full": " --full"}.get(run["profile"], "")
    epochs = ", ".join(f"{arch} {e}" for arch, e in run["epochs"].items())
    size = run.get("image_size")
    data = run["data"] + (f" at {size}x{size} px ({run['downsample']}x{run['downsample']} average "
                          "pooling)" if run.get("downsample", 1) > 1 else "")
    test = (f"a fixed random subset of {run['test_images']} test images" if run.get("test")
            else f"{run['test_images']} test images")
    text = [f"Profile `{run['profile']}` on {data}: models trained on {run['train_images']} "
            f"training images (epochs: {epochs}), {run['held_out_images']} more held out for "
            f"selecting hyperparameters, {test}; pools of {run['pool']}, {run['subsets']} random "
            f"subsets per N, statistics on {run['stats']} training images; hyperparameters "
            f"selected on a held-out slice of the training set; test accuracy (%) mean ± std over "
            f"subsets. Run time {run['seconds'] / 60:.0f} min. Regenerate with `{command}`.", "",
            *verdict(table), "", *accuracy_table(table), "",
            *_section("Paired differences in test accuracy (points), mean and 95% t interval over "
                      "the same subsets (every pair at N = 2):", paired_table(accuracy_rows)),
            *_section("Pools (training loss and accuracy on each model's own training part, "
                      "mean over the pool):", pools_table(_optional(out / "pools.csv"))),
            *_section("The official code's details for CCA at N = 2, held-out accuracy minus the "
                      "paper's handling (pooled stream statistics, no base reset), paired over "
                      "pairs, 95% t intervals:", options_table(_optional(out / "options.csv"))),
            "Interpolation barriers between two models of each pool (N = 2, 6 points on the "
            "path), in test loss:", "", *barrier_table(barriers, "loss"), "",
            "and in test accuracy (points below the straight line between the endpoints; models "
            "trained on Dirichlet splits are so overconfident on classes they rarely saw that "
            "every merge has a lower loss than the endpoints, so only this one shows their "
            "barrier):", "", *barrier_table(barriers, "accuracy"), "",
            "Selected hyperparameters: " + "; ".join(
                f"{r['arch']} x{float(r['width']):g} {r['setting']} {r['method']} {r['selected']}"
                for r in selected) + "."]
    body = "\n".join(text) + "\n"
    (out / "summary.md").write_text(body)
    plots(table, barriers, out / "plots.html")
    if readme is not None and readme.exists():
        rewrite_section(readme, START, END, body)
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a results folder written by reproduce.py")
    parser.add_argument("--readme", default=None, help="update this README's Results section")
    args = parser.parse_args()
    print(write_report(Path(args.run), Path(args.readme) if args.readme else None))


if __name__ == "__main__":
    main()
