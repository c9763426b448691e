"""Data-parallel statistics: sharding, and 2 gloo processes on this CPU against one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from ccamerge.api import merge
from ccamerge.batchnorm import moment_batchnorms, output_moments
from ccamerge.distributed import batch_block, every_nth_batch, launched_by_torchrun
from ccamerge.errors import CcamergeError
from ccamerge.models import build_model
from ccamerge.spec import build_spec
from ccamerge.stats import collect_statistics
from ccamerge.transform import reset_batchnorm

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
BATCH = 100


@pytest.mark.parametrize("n, bs, world", [(0, 4, 2), (1, 4, 3), (10, 3, 2), (1437, 100, 2),
                                          (1437, 100, 3), (7, 1, 7), (5, 2, 4), (8, 4, 1)])
def test_batch_blocks_partition_the_rows_into_whole_batches(n, bs, world):
    blocks = [batch_block(n, bs, r, world) for r in range(world)]
    assert [b.start for b in blocks[1:]] == [b.stop for b in blocks[:-1]]  # contiguous, in order
    assert blocks[0].start == 0 and blocks[-1].stop == n
    assert all(b.start % bs == 0 for b in blocks)  # boundaries are batch boundaries
    batches = [-(-(b.stop - b.start) // bs) for b in blocks]
    assert max(batches) - min(batches) <= 1


def test_bad_shards_are_clear_errors():
    with pytest.raises(CcamergeError, match="rank must be in 0..1"):
        batch_block(10, 2, 2, 2)
    with pytest.raises(CcamergeError, match="batch_size"):
        batch_block(10, 0, 0, 2)


def test_a_single_process_keeps_every_batch_and_is_not_launched(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert list(every_nth_batch(range(5), None)) == [0, 1, 2, 3, 4]
    assert not launched_by_torchrun()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _write_inputs(folder: Path, mlps, digits, rows: int = 1000) -> dict:
    torch.manual_seed(0)
    bn = build_model("vgg", width=0.5, batch_norm=True)
    inputs = {"mlps": [("mlp", m.config, m.state_dict()) for m in mlps[:2]],
              "bn": ("vgg", bn.config, bn.state_dict()), "x": digits.x_train[:rows],
              "x_bn": digits.x_train[:450], "batch_size": BATCH}
    torch.save(inputs, folder / "inputs.pt")
    return inputs


@contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _single_process(inputs) -> dict:
    """The reference: the same work in this process, no process group, one thread like a rank."""
    from dist_worker import load_models

    models = load_models(inputs["mlps"])
    spec = build_spec(models[0])
    with _threads(1):
        stats = collect_statistics(models, spec, inputs["x"], batch_size=BATCH)
        merged = merge(models, inputs["x"], "cca", statistics=stats, batch_size=BATCH)
        [bn] = load_models([inputs["bn"]])
        [moments] = output_moments([bn], moment_batchnorms(bn), inputs["x_bn"], batch_size=BATCH)
        reset_batchnorm(bn, inputs["x_bn"], batch_size=BATCH)
    return {"stats": stats, "merged": merged.model.state_dict(), "bn": bn.state_dict(),
            "bn_moments": moments}


def _relative(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _torchrun(folder: Path, world: int) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER),
               "merge", str(folder)]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def _plain_processes(folder: Path, world: int) -> None:
    ranks = _start_ranks("merge", folder, world, timeout_s=60)
    try:
        errors = [rank.communicate(timeout=120)[1] for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    assert all(rank.returncode == 0 for rank in ranks), "\n".join(errors)[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("launch, world, rows", [(_torchrun, 2, 1000), (_plain_processes, 3, 150)],
                         ids=["torchrun-2-ranks", "3-ranks-one-empty"])
def test_gloo_ranks_equal_one_process(pinned_layout, tmp_path, mlps, digits, launch, world,
                                      rows):
    """CPU ranks (gloo): all-reduced moments equal the single-process ones to float64
    round-off, the CCA merge built from them to 1e-6 relative, the BatchNorm reset to float32
    round-off. With 150 rows in batches of 100 over 3 ranks, rank 0 reads nothing."""
    inputs = _write_inputs(tmp_path, mlps, digits, rows)
    launch(tmp_path, world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    reference = _single_process(inputs)
    stats = reference["stats"]
    cov_diff = max(_relative(ranks[0]["covs"][n][k], c) for n in stats.points
                   for k, c in stats[n].covs.items())
    assert cov_diff < 1e-12
    for name, point in stats.points.items():
        assert ranks[0]["counts"][name] == point.count
        for mine, single in zip(ranks[0]["means"][name], point.mean, strict=True):
            np.testing.assert_allclose(mine, single, rtol=1e-12, atol=1e-12)
    weights_diff = max(_relative(v, reference["merged"][k]) for k, v in ranks[0]["merged"].items())
    assert weights_diff < 1e-6
    blocks = [batch_block(rows, BATCH, r, world) for r in range(world)]
    assert ranks[0]["collection"] == {"device": "cpu", "world_size": world, "samples": rows,
                                      "samples_per_rank": [b.stop - b.start for b in blocks],
                                      "layout": ranks[0]["collection"]["layout"],
                                      "products": "float32",
                                      "threads": ranks[0]["collection"]["threads"]}
    for other in ranks[1:]:  # every rank holds the same merge
        for key, value in other["merged"].items():
            torch.testing.assert_close(value, ranks[0]["merged"][key], rtol=0, atol=0)
    bn_diff = max(_relative(v, reference["bn"][k]) for k, v in ranks[0]["bn"].items()
                  if "running" in k)
    assert bn_diff < 1e-5
    assert ranks[0]["bn"]["features.1.num_batches_tracked"] == 5
    moments_diff = max(_relative(mine, single) for bn, pair in reference["bn_moments"].items()
                       for mine, single in zip(ranks[0]["bn_moments"][bn], pair, strict=True))
    assert moments_diff < 1e-12  # the mapped reset's moments, all-reduced with the statistics
    print(f"{world} ranks, max relative difference: covariances {cov_diff:.2e}, merged weights "
          f"{weights_diff:.2e}, BatchNorm running statistics {bn_diff:.2e}")


def _start_ranks(mode: str, folder: Path, world: int, timeout_s: float) -> list[subprocess.Popen]:
    """``world`` worker processes with the environment torchrun would give them."""
    port = _free_port()
    return [subprocess.Popen([sys.executable, str(WORKER), mode, str(folder)],
                             env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                      TEST_TIMEOUT_S=str(timeout_s)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for r in range(world)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["die", "hang"])
def test_a_rank_that_dies_or_hangs_is_one_error_line_not_a_hang(tmp_path, mlps, digits, mode):
    _write_inputs(tmp_path, mlps, digits)
    timeout_s = 5.0
    ranks = _start_ranks(mode, tmp_path, 2, timeout_s)
    start = time.monotonic()
    try:
        _out, err = ranks[0].communicate(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        for rank in ranks:
            rank.kill()
    assert ranks[0].returncode == 2, err[-3000:]
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "rank 0 of 2" in lines[-1], err[-3000:]
    assert "statistics" in lines[-1]  # failed in the reduction, not while joining
    assert elapsed < 40


@pytest.mark.slow
def test_ccamerge_merge_under_torchrun_reports_once_and_matches_one_process(
        pinned_layout, tmp_path, mlps):
    """`torchrun --nproc_per_node=2 -m ccamerge merge ... --json`: one JSON object (rank 0)
    with world_size 2 and each rank's statistics samples, one file written, and the weights of
    the single-process CLI merge."""
    from ccamerge.io import load_model, save_model

    paths = [tmp_path / f"m{i}.safetensors" for i in range(2)]
    for model, path in zip(mlps[:2], paths, strict=True):
        save_model(model, path)
    args = ["merge", *map(str, paths), "--method", "cca", "--json", "--quiet", "--device", "cpu"]
    alone = subprocess.run([sys.executable, "-m", "ccamerge", *args, "--out",
                            str(tmp_path / "alone.safetensors")],
                           env=_env(), capture_output=True, text=True, timeout=120)
    assert alone.returncode == 0, alone.stderr
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "ccamerge",
               *args, "--out", str(tmp_path / "ranks.safetensors")]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    report = json.loads(line)
    single = json.loads(alone.stdout)
    assert report["world_size"] == 2 and single["world_size"] == 1
    assert len(report["samples_per_rank"]) == 2 and min(report["samples_per_rank"]) > 0
    assert sum(report["samples_per_rank"]) == single["samples"] == report["samples"]
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "alone.safetensors", "m0.safetensors", "m1.safetensors", "ranks.safetensors"]
    a = load_model(tmp_path / "alone.safetensors").state_dict()
    b = load_model(tmp_path / "ranks.safetensors").state_dict()
    assert max(_relative(b[k], a[k]) for k in a) < 1e-6
