"""The README's Results section is generated from benchmark files: check the generator."""

import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from report import END, START, write_report  # noqa: E402


def _write(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_report_counts_wins_ties_losses_and_rewrites_the_readme(tmp_path):
    rows = []
    for n, (cca, permute) in {2: (90.0, 92.0), 3: (88.0, 80.0), 4: (85.0, 84.8)}.items():
        for method, acc in {"base": 97.0, "ensemble": 98.0, "cca": cca, "permute": permute}.items():
            rows.append({"data": "digits", "arch": "vgg", "width": 1.0, "setting": "same", "N": n,
                         "subset": "0-1", "method": method, "accuracy": acc})
    _write(tmp_path / "accuracy.csv", rows)
    _write(tmp_path / "barriers.csv", [{"data": "digits", "arch": "vgg", "width": 1.0,
                                        "setting": "same", "method": "cca", "barrier": 0.2,
                                        "lambdas": "[0, 0.5, 1]", "loss": "[0.1, 0.3, 0.1]",
                                        "accuracy": "[97, 90, 95]"}])
    _write(tmp_path / "selected.csv", [{"arch": "vgg", "width": 1.0, "setting": "same",
                                        "method": "cca", "selected": '{"gamma": 1.0}'}])
    (tmp_path / "run.json").write_text(json.dumps({
        "profile": "quick", "data": "digits", "epochs": {"vgg": 20}, "pool": 6, "subsets": 3,
        "stats": 1000, "seconds": 600, "train_images": 1150, "held_out_images": 287,
        "test_images": 360}))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{START}\nold\n{END}\ntail\n")
    body = write_report(tmp_path, readme)
    assert "ahead by more than 0.5 points in 1, within 0.5 in 1, behind in 1" in body
    assert "| vgg | x1 | same | 0.200 |" in body  # loss barrier: 0.3 above the line at 0.1
    assert "| vgg | x1 | same | 6.0 |" in body  # accuracy: 90 below the line's 96
    assert "N=2: -2.0, N=3: +8.0, N=4: +0.2" in body
    assert "python benchmarks/reproduce.py --quick" in body
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"{END}\ntail\n") and body in text
    assert (tmp_path / "plots.html").stat().st_size > 1000


def test_cost_summary_states_where_the_target_is_met_and_rewrites_its_readme_section(tmp_path):
    from cost import COST_END, COST_START, summary
    from report import rewrite_section

    def row(arch, width, method, total, ratio):
        return {"arch": arch, "width": width, "N": 2, "method": method, "samples": 1000,
                "statistics": 0.9, "solve": 0.01, "transforms": 0.01, "averaging": 0.01,
                "bn_reset": 0.0, "total": total, "forward_standard": 2.0,
                "forward_channels_last": 1.0, "forward_limit": 1.0, "ratio": ratio}

    cost = [row("vgg", 1.0, "cca", 1.2, 1.2), row("vgg", 1.0, "permute", 1.1, 1.1),
            row("vgg", 2.0, "cca", 1.6, 1.6)]
    memory = [{"arch": "vgg", "width": 1, "samples": s, "peak_extra_mb": mb, "process_peak_mb": 0}
              for s, mb in ((500, 100.0), (2000, 105.0), (8000, 110.0))]
    body = summary(cost, [], memory, [], [], 1000)
    assert "CCA ratio at most 1.3: vgg x1; above: vgg x2 (1.6)." in body
    assert "| vgg | x1 | 0.9 | 0.01 | 0.01 | 0.01 | 0.0 | 1.2 | 1.2 | 0.6 |" in body
    assert "largest over smallest peak 1.10" in body
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{COST_START}\nold\n{COST_END}\ntail\n")
    rewrite_section(readme, COST_START, COST_END, body)
    text = readme.read_text()
    assert "old" not in text and body in text and text.endswith(f"{COST_END}\ntail\n")


def test_paired_differences_carry_t_intervals_that_scipy_agrees_with(tmp_path):
    from report import options_table, paired_table
    from scipy import stats

    diffs = [1.0, -0.5, 2.0, 0.5, 1.5]
    rows = []
    for k, d in enumerate(diffs):
        for method, acc in (("permute", 80.0), ("cca", 80.0 + d), ("cca paper", 81.0)):
            rows.append({"arch": "resnet20", "width": "1.0", "setting": "same", "N": "2",
                         "subset": f"0-{k + 1}", "method": method, "accuracy": acc})
    low, high = stats.t.interval(0.95, len(diffs) - 1, loc=np.mean(diffs), scale=stats.sem(diffs))
    table = "\n".join(paired_table(rows))
    assert f"| resnet20 | x1 | same | 2 | 5 | +0.9 [{low:+.1f}, {high:+.1f}] |" in table
    assert "cca - cca paper" in table
    options = [{"arch": "vgg", "width": "1.0", "setting": "same", "subset": f"0-{k}",
                "variant": v, "held_out_accuracy": 70.0 + (k if v == "mapped" else 0)}
               for k in range(1, 4) for v in ("paper", "mapped")]
    assert "| vgg | x1 | same | +2.0 [-0.5, +4.5] |" in "\n".join(options_table(options))
