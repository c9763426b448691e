"""The memory layout of image passes: pinned, remembered, or chosen by timing both."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch

from ccamerge.errors import CcamergeError
from ccamerge.layout import (
    CANDIDATES,
    ENV_VAR,
    TRIAL,
    choose_layout,
    forget_choices,
    pinned,
    pinned_layout,
    weights_in,
)
from ccamerge.models import build_model
from ccamerge.spec import build_spec
from ccamerge.stats import collect_statistics
from ccamerge.transform import reset_batchnorm


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    forget_choices()
    yield
    forget_choices()


def _layout_of(xb: torch.Tensor, model: torch.nn.Module | None = None) -> str:
    """The layout a probe sees: ``xb``'s, and with channels-last images ``model``'s first conv
    weights."""
    if xb.is_contiguous():
        return "standard"
    weight = next(p for p in model.parameters() if p.dim() == 4) if model else None
    if weight is not None and weight.is_contiguous(memory_format=torch.channels_last):
        return "channels_last_weights"
    return "channels_last"


def _vggs(n: int = 2, batch_norm: bool = False) -> list[torch.nn.Module]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(build_model("vgg", cfg=[8, "M", 16, "M"], image_shape=[3, 12, 12],
                               batch_norm=batch_norm).eval())
    return out


def test_the_pin_comes_from_the_context_then_the_environment_then_auto(monkeypatch):
    assert pinned_layout() == "auto"
    monkeypatch.setenv(ENV_VAR, "Channels_Last ")
    assert pinned_layout() == "channels_last"
    with pinned("standard"):
        assert pinned_layout() == "standard"
    assert pinned_layout() == "channels_last"


def test_an_unknown_layout_fails_in_one_line(monkeypatch):
    with pytest.raises(CcamergeError, match="unknown memory layout 'nhwc'"), pinned("nhwc"):
        pass
    monkeypatch.setenv(ENV_VAR, "fast")
    models = _vggs()
    with pytest.raises(CcamergeError, match=f"{ENV_VAR}"):
        collect_statistics(models, build_spec(models[0]), torch.randn(8, 3, 12, 12))


def test_the_probe_tries_each_layout_on_a_sixth_of_the_batch_and_the_fastest_wins():
    model = _vggs(1)[0]
    xb = torch.randn(48, 3, 12, 12)
    for fast in CANDIDATES:
        forget_choices()
        seen = []

        def probe(part, fast=fast, seen=seen):
            seen.append((_layout_of(part, model), len(part)))
            if seen[-1][0] != fast:
                time.sleep(0.02)

        assert choose_layout(model, xb, probe) == fast
        assert seen == [(layout, 8) for layout in TRIAL]
        assert all(p.is_contiguous() for p in model.parameters())  # weights back after


def test_a_long_pass_decides_on_whole_batches_after_warming_up_on_sixths(monkeypatch):
    from ccamerge import layout

    model, xb = _vggs(1)[0], torch.randn(48, 3, 12, 12)
    seen = []

    def probe(part):
        seen.append((_layout_of(part, model), len(part)))
        if seen[-1][0] != "standard" and len(part) == 48:
            time.sleep(0.02)

    forget_choices()
    assert choose_layout(model, xb, probe, whole=True) == "standard"
    assert seen == [*[(layout, 8) for layout in CANDIDATES],
                    *[(layout, 48) for layout in reversed(CANDIDATES)]]
    assert layout.long_pass(96 * 40, 40) and not layout.long_pass(95 * 40, 40)
    assert not layout.long_pass(None, 40)
    monkeypatch.setattr(layout, "LONG_PASS", 2)
    forget_choices()
    sizes = []
    monkeypatch.setattr(layout, "_timed_choice",
                        lambda model, probe, xb, whole=False: sizes.append(whole) or "standard")
    models = _vggs()
    collect_statistics(models, build_spec(models[0]), torch.randn(16, 3, 12, 12), batch_size=8)
    forget_choices()
    collect_statistics(models, build_spec(models[0]), torch.randn(15, 3, 12, 12), batch_size=8)
    assert sizes == [True, False]  # 2 batches: long here; 15 images: under 2 whole batches


def test_a_choice_is_remembered_per_model_structure_and_batch_shape():
    model, calls = _vggs(1)[0], []
    first = choose_layout(model, torch.randn(8, 3, 12, 12), lambda part: calls.append(1))
    assert len(calls) == len(TRIAL)
    assert choose_layout(copy.deepcopy(model), torch.randn(8, 3, 12, 12),
                         lambda part: calls.append(1)) == first
    assert len(calls) == len(TRIAL)  # the same structure and shape: no probe
    choose_layout(model, torch.randn(6, 3, 12, 12), lambda part: calls.append(1))
    assert len(calls) == 2 * len(TRIAL)
    assert choose_layout(model, torch.randn(8, 27), lambda part: calls.append(1)) == "n/a"
    with pinned("standard"):
        assert choose_layout(model, torch.randn(5, 3, 12, 12), lambda p: calls.append(1)) == \
            "standard"
    assert len(calls) == 2 * len(TRIAL)


def test_statistics_in_either_layout_agree_and_one_layout_repeats_bit_for_bit():
    models = _vggs()
    spec, x = build_spec(models[0]), torch.randn(70, 3, 12, 12)
    options = dict(batch_size=32, positions=5, self_only=["features.0"])
    runs = {}
    for layout in CANDIDATES:
        with pinned(layout):
            runs[layout] = collect_statistics(models, spec, x, **options)
            assert runs[layout].collection()["layout"] == layout
    auto = collect_statistics(models, spec, x, **options)
    again = collect_statistics(models, spec, x, **options)
    chosen = auto.collection()["layout"]
    assert chosen in runs and again.collection()["layout"] == chosen
    for name, point in runs["standard"].points.items():
        for block, cov in point.covs.items():
            for layout in CANDIDATES[1:]:
                np.testing.assert_allclose(runs[layout][name].covs[block], cov,
                                           rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(auto[name].covs[block], runs[chosen][name].covs[block])
            np.testing.assert_array_equal(again[name].covs[block], auto[name].covs[block])
    np.testing.assert_array_equal(auto.self_only["features.0"].cov(1, 1),
                                  runs[chosen].self_only["features.0"].cov(1, 1))


def test_a_batchnorm_reset_probes_without_touching_the_running_statistics():
    model = _vggs(1, batch_norm=True)[0]
    x = torch.randn(50, 3, 12, 12)
    auto = reset_batchnorm(copy.deepcopy(model), x, batch_size=20)
    chosen = choose_layout(model, x[:20])  # remembered: the reset's choice
    with pinned(chosen):
        want = reset_batchnorm(copy.deepcopy(model), x, batch_size=20)
    for key, value in want.state_dict().items():
        assert torch.equal(auto.state_dict()[key], value), key
    assert not auto.training
    assert all(p.is_contiguous() for p in auto.parameters())


def test_channels_last_weights_convert_the_callers_parameters_for_the_pass_and_restore_them():
    models = _vggs()
    models[1].to(memory_format=torch.channels_last)  # already channels-last: stays so
    before = [[(p, p.detach().clone(), p.stride()) for p in m.parameters()] for m in models]
    seen = []

    def look(module, _inputs, _out):
        seen.append(module.weight.is_contiguous(memory_format=torch.channels_last))

    hooks = [m.features[0].register_forward_hook(look) for m in models]
    with pinned("channels_last_weights"):
        collect_statistics(models, build_spec(models[0]), torch.randn(20, 3, 12, 12),
                           batch_size=10)
    for hook in hooks:
        hook.remove()
    assert seen and all(seen)  # the runners share the caller's converted parameters
    for model, params in zip(models, before, strict=True):
        for p, (same, value, stride) in zip(model.parameters(), params, strict=True):
            assert p is same and p.stride() == stride and torch.equal(p, value)


def test_nested_weight_conversions_restore_once_the_last_leaves_and_on_errors():
    model = _vggs(1)[0]
    weight = model.features[0].weight
    cl = torch.channels_last
    with weights_in(model, "channels_last_weights"):
        with weights_in([model, model], "channels_last_weights"):
            assert weight.is_contiguous(memory_format=cl)
        assert weight.is_contiguous(memory_format=cl) and not weight.is_contiguous()
    assert weight.is_contiguous()
    with pytest.raises(RuntimeError, match="boom"), weights_in(model, "channels_last_weights"):
        raise RuntimeError("boom")
    assert weight.is_contiguous()
    with weights_in(model, "channels_last"):
        assert weight.is_contiguous()  # only the weights layout converts


def test_a_batchnorm_reset_in_channels_last_weights_keeps_the_parameters_layout():
    model = _vggs(1, batch_norm=True)[0]
    x = torch.randn(40, 3, 12, 12)
    with pinned("standard"):
        want = reset_batchnorm(copy.deepcopy(model), x, batch_size=20)
    with pinned("channels_last_weights"):
        got = reset_batchnorm(model, x, batch_size=20)
    assert all(p.is_contiguous() for p in got.parameters())
    for key, value in want.state_dict().items():
        torch.testing.assert_close(got.state_dict()[key], value, rtol=1e-5, atol=1e-6)
