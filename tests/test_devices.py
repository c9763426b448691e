"""Device names, moving models, exact float32; CPU/CUDA agreement where CUDA is present."""

import numpy as np
import pytest
import torch

from ccamerge.api import align, aligned_states
from ccamerge.devices import (
    exact_float32,
    model_to,
    models_to,
    module_device,
    resolve_device,
    to_device,
)
from ccamerge.distributed import reset_batchnorm_sharded
from ccamerge.errors import CcamergeError
from ccamerge.models import build_model
from ccamerge.spec import build_spec
from ccamerge.stats import collect_statistics
from ccamerge.transform import average_states, with_state

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _fake_cuda(monkeypatch, count: int, current: int = 0):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)


def test_names_resolve_to_devices_with_an_index(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    _fake_cuda(monkeypatch, count=2, current=1)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("CUDA:0") == torch.device("cuda", 0)


def test_missing_cuda_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0", "cuda:7"):
        with pytest.raises(CcamergeError, match="CUDA is not available") as info:
            resolve_device(name)
        assert "\n" not in str(info.value) and name in str(info.value)


def test_a_cuda_index_that_does_not_exist_names_the_ones_that_do(monkeypatch):
    _fake_cuda(monkeypatch, count=2)
    with pytest.raises(CcamergeError, match=r"'cuda:7' does not exist.*2 CUDA.*cuda:0 to cuda:1"):
        resolve_device("cuda:7")


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "tpu", "cuda:-1"])
def test_unknown_names_list_the_valid_ones(name):
    with pytest.raises(CcamergeError, match="auto, cpu, cuda, cuda:N"):
        resolve_device(name)


def test_models_move_as_copies_and_the_callers_stay():
    models = [build_model("mlp", hidden=[8]) for _ in range(2)]
    assert models_to(models, torch.device("cpu"))[0] is models[0]  # already there: no copy
    moved = models_to(models, torch.device("meta"))  # a device every build has
    for original, copy in zip(models, moved, strict=True):
        assert copy is not original
        assert module_device(copy) == torch.device("meta")
        assert module_device(original) == torch.device("cpu")
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")
    assert model_to(models[0], torch.device("cpu"), dtype=torch.float64) is not models[0]


def test_batches_move_as_tensors_or_tuples():
    x, y = torch.zeros(3, 2), torch.arange(3)
    moved = to_device((x, y), torch.device("meta"))
    assert isinstance(moved, tuple) and all(t.device.type == "meta" for t in moved)
    with pytest.raises(CcamergeError, match="expected tensors"):
        to_device({"x": x}, torch.device("cpu"))


def _precisions():
    b = torch.backends
    return (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision,
            b.mkldnn.matmul.fp32_precision)


def test_exact_float32_switches_tf32_off_and_restores_it_also_on_errors():
    before = _precisions()
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    try:
        with exact_float32():
            assert _precisions() == ("ieee", "ieee", "ieee")
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        with pytest.raises(KeyError), exact_float32():
            raise KeyError("boom")
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        outer, inner = exact_float32(), exact_float32()  # closed in the other order (threads)
        outer.__enter__()
        inner.__enter__()
        outer.__exit__(None, None, None)
        assert _precisions() == ("ieee", "ieee", "ieee")  # a block is still open
        inner.__exit__(None, None, None)
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    finally:
        torch.backends.cudnn.conv.fp32_precision = before[1]
    assert _precisions() == before


def test_statistics_on_an_explicit_cpu_device_equal_the_default(digits):
    torch.manual_seed(0)
    models = [build_model("vgg", width=0.5) for _ in range(2)]
    spec = build_spec(models[0])
    x = digits.x_train[:60]
    default = collect_statistics(models, spec, x, batch_size=25)
    explicit = collect_statistics(models, spec, x, batch_size=25, device="cpu")
    assert explicit.device == "cpu" and explicit.collection()["samples_per_rank"] == [60]
    for name in spec.names:
        np.testing.assert_array_equal(explicit[name].cov(0, 1), default[name].cov(0, 1))


def _merge_on(models, x, device) -> tuple[dict, dict]:
    """Statistics, CCA solve, average and BatchNorm reset with the passes on ``device``."""
    spec = build_spec(models[0])
    stats = collect_statistics(models, spec, x, device=device, batch_size=100)
    aligned = align(models, x, "cca", statistics=stats, spec=spec)
    merged = with_state(models[0], average_states(aligned_states(models, aligned)))
    reset_batchnorm_sharded(merged, x, device=device, batch_size=100)
    return merged.state_dict(), {n: stats[n].cov(0, 1) for n in spec.names}


def max_relative_difference(a: dict, b: dict) -> float:
    """Largest ``max |a - b| / max |b|`` over the float entries of two state dicts."""
    out = 0.0
    for key, value in b.items():
        if value.is_floating_point():
            scale = float(value.abs().max()) or 1.0
            out = max(out, float((a[key] - value).abs().max()) / scale)
    return out


@CUDA
def test_cuda_and_cpu_merges_agree(digits, resnets):
    """The same merge of two trained BatchNorm ResNets with the passes on CUDA and on the CPU:
    weights to 1e-5 relative (trained nets: no near-zero canonical correlations to amplify
    float32 round-off)."""
    models = resnets
    x = digits.x_train[:600]
    cpu_state, cpu_covs = _merge_on(models, x, "cpu")
    cuda_state, cuda_covs = _merge_on(models, x, "cuda")
    for name, cov in cpu_covs.items():
        np.testing.assert_allclose(cuda_covs[name], cov, rtol=1e-5, atol=1e-5 * np.abs(cov).max())
    assert max_relative_difference(cuda_state, cpu_state) < 1e-5
    assert all(v.device.type == "cpu" for v in cuda_state.values())  # the model came back
