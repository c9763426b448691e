"""Statistics from a random subset of the positions of each conv feature map."""

import numpy as np
import pytest
import torch

from ccamerge.errors import CcamergeError
from ccamerge.models import build_model
from ccamerge.positions import PositionSampler, check_positions, position_keys, positions_per_image
from ccamerge.spec import build_spec
from ccamerge.stats import capture_features, collect_statistics


def _chosen(sampler: PositionSampler, key, first: int, images: int, hw: int) -> np.ndarray:
    """The positions ``[images, k]`` the sampler keeps of a ``[images, 1, hw, 1]`` map."""
    sampler.start_batch(first, images)
    out = torch.arange(images * hw, dtype=torch.float32).view(images, 1, hw, 1)
    rows = sampler(key, out)[:, 0].long().numpy()  # flat row b * hw + position
    return (rows % hw).reshape(images, -1)


def test_counts_and_fractions_per_image():
    assert positions_per_image(None, 64) == 64
    assert positions_per_image(16, 64) == 16 and positions_per_image(100, 64) == 64
    assert positions_per_image(0.25, 64) == 16 and positions_per_image(0.001, 64) == 1
    for bad in (0, -3, 1.5, 0.0, True, "half"):
        with pytest.raises(CcamergeError, match="positions|fraction"):
            check_positions(bad)


def test_positions_are_distinct_uniform_and_depend_only_on_the_image_and_seed():
    hw, k, images = 64, 8, 4000
    chosen = _chosen(PositionSampler(k, seed=3), ("conv1", 0), 0, images, hw)
    assert chosen.shape == (images, k)
    assert all(len(set(row)) == k for row in chosen)  # without replacement
    counts = np.bincount(chosen.ravel(), minlength=hw)  # expected images * k / hw = 500 each
    chi2 = float(((counts - images * k / hw) ** 2 / (images * k / hw)).sum())
    assert chi2 < 120  # 63 degrees of freedom: p < 1e-5 of exceeding by chance
    assert len({tuple(row) for row in chosen}) > 0.99 * images  # images differ
    again = _chosen(PositionSampler(k, seed=3), ("conv1", 0), 1000, 500, hw)
    np.testing.assert_array_equal(again, chosen[1000:1500])  # any batch boundaries
    other_seed = _chosen(PositionSampler(k, seed=4), ("conv1", 0), 0, 500, hw)
    other_map = _chosen(PositionSampler(k, seed=3), ("conv2", 0), 0, 500, hw)
    assert (other_seed != chosen[:500]).any() and (other_map != chosen[:500]).any()


def test_keys_are_integers_below_two_to_the_31():
    keys = position_keys(torch.arange(10**6, 10**6 + 50), 1024, salt=2**31 - 1)
    assert keys.dtype == torch.int64 and int(keys.min()) >= 0 and int(keys.max()) < 2**31


def _features_at(model, spec, x, sampler_positions, seed):
    """``{point: samples}`` of the positions a fresh sampler keeps, read through the hooks."""
    sampler = PositionSampler(sampler_positions, seed)
    sampler.start_batch(0, len(x))
    with capture_features(model, spec, sampler) as captured, torch.no_grad():
        model(x)
    return {name: torch.cat(chunks).double().numpy() for name, chunks in captured.items()}


@pytest.mark.parametrize("positions", [5, 0.3])
def test_subset_statistics_equal_numpy_cov_of_the_same_positions(digits, positions):
    """A BatchNorm ResNet (stream points pool several maps) and a VGG: every block against
    numpy.cov of the kept samples; the same positions in both models (self-pairs)."""
    torch.manual_seed(0)
    for arch in ("resnet20", "vgg"):
        models = [build_model(arch, width=0.5).eval() for _ in range(2)]
        spec = build_spec(models[0])
        x = digits.x_train[:60]
        stats = collect_statistics(models, spec, x, batch_size=23, positions=positions, seed=7)
        assert stats.positions == positions
        feats = [_features_at(m, spec, x, positions, 7) for m in models]
        for point in spec.points:
            n, p = point.width, stats[point.name]
            joint = np.cov(np.hstack([f[point.name] for f in feats]).T)
            assert p.count == len(feats[0][point.name]) < 60 * 64 * len(point.features)
            for i, j in ((0, 0), (1, 1), (0, 1)):
                np.testing.assert_allclose(p.cov(i, j), joint[i * n:(i + 1) * n,
                                                               j * n:(j + 1) * n], atol=1e-5)


def test_a_model_paired_with_itself_sees_the_same_positions(digits):
    model = build_model("vgg", width=0.5).eval()
    stats = collect_statistics([model, model], build_spec(model), digits.x_train[:40],
                               positions=0.25, batch_size=16)
    for point in stats.points.values():
        np.testing.assert_allclose(point.cov(0, 1), point.cov(0, 0), rtol=1e-6, atol=1e-9)


def test_subset_statistics_do_not_depend_on_the_batch_size(digits):
    model_a, model_b = build_model("vgg", width=0.5).eval(), build_model("vgg", width=0.5).eval()
    spec, x = build_spec(model_a), digits.x_train[:90]
    small = collect_statistics([model_a, model_b], spec, x, batch_size=7, positions=10)
    large = collect_statistics([model_a, model_b], spec, x, batch_size=90, positions=10)
    for name in spec.names:
        assert small[name].count == large[name].count
        np.testing.assert_allclose(small[name].cov(0, 1), large[name].cov(0, 1), atol=1e-6)


def test_all_positions_and_linear_features_pass_whole(digits):
    mlp = build_model("mlp", hidden=[16])
    x = digits.x_train[:30]
    full = collect_statistics([mlp, mlp], build_spec(mlp), x)
    sub = collect_statistics([mlp, mlp], build_spec(mlp), x, positions=1)
    np.testing.assert_array_equal(full["fc1"].cov(0, 1), sub["fc1"].cov(0, 1))
    vgg = build_model("vgg", width=0.5)
    everything = collect_statistics([vgg, vgg], build_spec(vgg), x, positions=1.0)
    assert everything["conv1"].count == 30 * 8 * 8 and everything.positions == 1.0


WORKER = """
import sys, torch
from ccamerge.distributed import init_from_env, shutdown
from ccamerge.models import build_model
from ccamerge.spec import build_spec
from ccamerge.stats import collect_statistics
ctx = init_from_env(device="cpu", timeout_s=60)
torch.set_num_threads(1)
inputs = torch.load(sys.argv[1] + "/inputs.pt", weights_only=False)
models = [build_model("vgg", **inputs["config"]) for _ in inputs["states"]]
for model, state in zip(models, inputs["states"]):
    model.load_state_dict(state)
spec = build_spec(models[0])
stats = collect_statistics([m.eval() for m in models], spec, inputs["x"], batch_size=10,
                           positions=6, seed=5, group=ctx.group)
torch.save({n: stats[n].covs for n in spec.names}, sys.argv[1] + f"/rank{ctx.rank}.pt")
shutdown()
"""


@pytest.mark.slow
def test_sharded_subset_statistics_equal_one_process(pinned_layout, tmp_path, digits):
    """Two gloo ranks read different images; each image keeps the positions it keeps in one
    process (global image indices), so the all-reduced subsets equal the single-process ones."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    torch.manual_seed(1)
    models = [build_model("vgg", width=0.5).eval() for _ in range(2)]
    x = digits.x_train[:70]
    torch.save({"config": models[0].config, "states": [m.state_dict() for m in models], "x": x},
               tmp_path / "inputs.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = str(Path(__file__).resolve().parents[1])
    ranks = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path)], env={
        **os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1", "RANK": str(r),
        "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port)}, stderr=subprocess.PIPE, text=True) for r in range(2)]
    errors = [rank.communicate(timeout=120)[1] for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), "\n".join(errors)[-3000:]
    single = collect_statistics(models, build_spec(models[0]), x, batch_size=10, positions=6,
                                seed=5)
    sharded = torch.load(tmp_path / "rank0.pt", weights_only=False)
    for name, point in single.points.items():
        for block, cov in point.covs.items():
            np.testing.assert_allclose(sharded[name][block], cov, rtol=1e-9, atol=1e-12)
