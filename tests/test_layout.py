"""The memory layout of image passes: pinned, remembered, or chosen by timing both."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch

from ccamerge.errors import CcamergeError
from ccamerge.layout import (
    ENV_VAR,
    TRIAL,
    choose_layout,
    forget_choices,
    pinned,
    pinned_layout,
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


def _layout_of(xb: torch.Tensor) -> str:
    return "standard" if xb.is_contiguous() else "channels_last"


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


def test_the_probe_tries_each_layout_on_a_quarter_of_the_batch_and_the_faster_wins():
    model = _vggs(1)[0]
    xb = torch.randn(40, 3, 12, 12)
    for slow in ("standard", "channels_last"):
        forget_choices()
        seen = []

        def probe(part, slow=slow, seen=seen):
            seen.append((_layout_of(part), len(part)))
            if _layout_of(part) == slow:
                time.sleep(0.02)

        chosen = choose_layout(model, xb, probe)
        assert seen == [(layout, 10) for layout in TRIAL]
        assert chosen == ("channels_last" if slow == "standard" else "standard")


def test_a_long_pass_decides_on_whole_batches_after_warming_up_on_quarters(monkeypatch):
    from ccamerge import layout

    model, xb = _vggs(1)[0], torch.randn(40, 3, 12, 12)
    seen = []

    def probe(part):
        seen.append((_layout_of(part), len(part)))
        if _layout_of(part) == "channels_last" and len(part) == 40:
            time.sleep(0.02)

    forget_choices()
    assert choose_layout(model, xb, probe, whole=True) == "standard"
    assert seen == [("standard", 10), ("channels_last", 10), ("channels_last", 40),
                    ("standard", 40)]
    assert layout.long_pass(64 * 40, 40) and not layout.long_pass(63 * 40, 40)
    assert not layout.long_pass(None, 40)
    monkeypatch.setattr(layout, "LONG_PASS", 2)
    forget_choices()
    sizes = []
    monkeypatch.setattr(layout, "_timed_choice",
                        lambda probe, xb, whole=False: sizes.append(whole) or "standard")
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
    for layout in ("standard", "channels_last"):
        with pinned(layout):
            runs[layout] = collect_statistics(models, spec, x, **options)
            assert runs[layout].collection()["layout"] == layout
    auto = collect_statistics(models, spec, x, **options)
    again = collect_statistics(models, spec, x, **options)
    chosen = auto.collection()["layout"]
    assert chosen in runs and again.collection()["layout"] == chosen
    for name, point in runs["standard"].points.items():
        for block, cov in point.covs.items():
            np.testing.assert_allclose(runs["channels_last"][name].covs[block], cov,
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
