"""Derived alignment specs: equal to the hand-written ones for the built-in families, verified
for architectures outside them; unsupported operations reported."""

from __future__ import annotations

import pytest
from torch import nn
from traced_nets import (
    BUILT_IN,
    EXPECTED_POINTS,
    SUPPORTED,
    TOL,
    WITH_UNSUPPORTED,
    AttentionNet,
    DenseNet,
    DepthwiseNet,
    FunctionalNet,
    Inception,
    ProjResNet,
    SiluTanhNet,
    SqueezeExcite,
    key,
    make,
)

from ccamerge.errors import CcamergeError
from ccamerge.models import build_model
from ccamerge.spec import AlignmentSpec, Axis, MergePoint, build_spec
from ccamerge.trace.derive import (
    derive_and_verify,
    derive_spec,
    has_offsets,
    verify,
)


@pytest.mark.parametrize(("arch", "config"), BUILT_IN)
def test_derived_spec_equals_hand_written(arch, config, x):
    model = build_model(arch, **config).eval()
    derived = derive_and_verify(model, x[:16])
    assert key(derived.spec) == key(build_spec(model))
    assert derived.verified and not derived.unsupported


# custom architectures: trace, verify, merge ---------------------------------------------------
@pytest.mark.parametrize("cls", SUPPORTED + WITH_UNSUPPORTED)
def test_derive_and_verify(cls, x):
    derived = derive_and_verify(make(cls), x[:32])
    assert len(derived.spec.points) == EXPECTED_POINTS[cls]
    assert derived.verified, derived.verification
    assert max(derived.verification.values()) < TOL
    assert bool(derived.unsupported) == (cls in WITH_UNSUPPORTED)


def test_concatenation_consumers_have_offsets(x):
    spec = derive_spec(make(Inception), x[:8]).spec
    mix = {a.offset: a for p in spec.points for a in p.consumers
           if a.param == "mix.0.weight"}
    assert sorted(mix) == [0, 6, 12] and has_offsets(spec)
    branch = {p.features: p for p in spec.points}
    assert branch[("b3.2",)].consumers == (mix[12],)


def test_dense_block_norm_over_concatenation(x):
    spec = derive_spec(make(DenseNet), x[:8]).spec
    stem = next(p for p in spec.points if "stem" in p.features)
    assert set(stem.features) == {"stem", "dense.0.relu"}  # before and after dense.0's BN-ReLU
    offsets = {(a.param, getattr(a, "offset", 0)) for a in stem.producers}
    assert {("dense.1.bn.weight", 0), ("transition.0.running_var", 0)} <= offsets
    layer2 = next(p for p in spec.points if p.features == ("dense.1.conv",))
    assert ("transition.2.weight", 12) in {(a.param, getattr(a, "offset", 0))
                                          for a in layer2.consumers}


def test_residual_stream_is_one_point(x):
    spec = derive_spec(make(ProjResNet), x[:8]).spec
    stream = next(p for p in spec.points if "blocks.1.relu2" in p.features)
    assert set(stream.features) == {"blocks.1.relu2"}
    params = {a.param for a in stream.producers}
    assert {"blocks.1.conv2.weight", "blocks.1.shortcut.0.weight", "blocks.1.bn2.bias",
            "blocks.1.shortcut.1.running_mean"} <= params
    assert {a.param for a in stream.consumers} == {"blocks.2.conv1.weight",
                                                  "blocks.2.shortcut.0.weight"}


def test_functional_activation_falls_back_to_nearest_module(x):
    derived = derive_spec(make(FunctionalNet), x[:8])
    (point,) = derived.spec.points
    assert set(point.features) == {"bn1", "pool"}
    assert any("before relu" in n for n in derived.notes)
    assert any("after relu" in n for n in derived.notes)


def test_flatten_gives_repeat(x):
    spec = derive_spec(make(SiluTanhNet), x[:8]).spec
    consumer = next(a for p in spec.points for a in p.consumers if a.param == "head.1.weight")
    assert consumer.repeat == 4


def test_gate_joins_the_gated_space(x):
    spec = derive_spec(make(SqueezeExcite), x[:8]).spec
    gated = next(p for p in spec.points if p.features == ("act1",))
    assert {"conv1.weight", "gate.3.weight", "gate.3.bias"} <= {a.param for a in gated.producers}


def test_depthwise_keeps_its_channels_space(x):
    """Stem, depthwise conv and its BatchNorm write one space (the kernels along axis 0),
    read by the pointwise conv; its features are pooled from both sides of the depthwise conv."""
    derived = derive_and_verify(make(DepthwiseNet), x[:32])
    assert not derived.unsupported and derived.verified
    point = derived.spec.point("stem.2")
    assert point.features == ("stem.2", "dw.2")
    assert {("stem.0.weight", 0), ("dw.0.weight", 0), ("dw.0.bias", 0), ("dw.1.weight", 0)} <= \
        {(a.param, a.axis) for a in point.producers}
    assert {(a.param, a.axis) for a in point.consumers} == {("pw.0.weight", 1)}


class ChannelMultiplier(nn.Module):
    """A depthwise conv with two outputs per channel: its output holds each channel twice."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8),
                                nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(8, 6, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(6, 10))

    def forward(self, x):
        return self.head(self.dw(self.stem(x)))


def test_a_channel_multiplier_repeats_each_channel(x):
    derived = derive_and_verify(make(ChannelMultiplier), x[:32])
    assert derived.verified and not derived.unsupported
    point = derived.spec.point("stem.1")
    assert point.width == 4 and point.features == ("stem.1",)
    repeats = {(a.param, a.axis): a.repeat for a in point.producers + point.consumers}
    assert repeats[("dw.0.weight", 0)] == repeats[("head.0.weight", 1)] == 2
    assert repeats[("stem.0.weight", 0)] == 1


class GroupedNet(nn.Module):
    """A conv of two groups: a permutation across its groups changes the function."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        return self.head(self.grouped(self.stem(x)))


def test_a_grouped_conv_is_reported_and_neighbours_unmerged(x):
    derived = derive_spec(make(GroupedNet), x[:8])
    (report,) = derived.unsupported
    assert report["location"] == "grouped.0" and "grouped (groups=2)" in report["reason"]
    axes = {(a.param, a.axis) for p in derived.spec.points for a in p.producers + p.consumers}
    assert not axes & {("stem.0.weight", 0), ("grouped.0.weight", 0), ("head.2.weight", 1)}


def test_attention_is_reported(x):
    derived = derive_spec(make(AttentionNet), x[:8])
    ops = {u["op"]: u for u in derived.unsupported}
    assert "MultiheadAttention" in ops and ops["MultiheadAttention"]["location"] == "attn"
    assert "transpose" in ops
    assert [p.features for p in derived.spec.points] == [("act",)]


def test_shared_module_is_not_a_feature(x):
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, 10)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.fc3(self.act(self.fc2(self.act(self.fc1(x.flatten(1))))))

    derived = derive_and_verify(make(Shared), x[:16])
    assert {p.features for p in derived.spec.points} == {("fc1",), ("fc2",)}
    assert derived.verified


def test_verification_drops_a_wrong_point(x, monkeypatch):
    import ccamerge.trace.derive as trace

    model = build_model("mlp").eval()
    real = trace.derive_spec(model, x[:16])
    bad = MergePoint("broken", 128, ("layers.2",), (Axis("layers.1.weight", 0),), ())
    real.spec = AlignmentSpec(real.spec.points + (bad,))
    monkeypatch.setattr(trace, "derive_spec", lambda *_: real)
    derived = trace.derive_and_verify(model, x[:16])
    assert "broken" not in derived.spec.names and "broken" in derived.rejected
    assert len(derived.spec.points) == 2 and derived.verified
    assert any("broken" in u for u in derived.unmerged)


def test_untraceable_model_raises(x):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(x.flatten(1)) if x.sum() > 0 else -self.fc(x.flatten(1))

    with pytest.raises(CcamergeError, match="cannot trace"):
        derive_spec(Branchy(), x[:4])


def test_verify_reuses_verify_spec_without_offsets(x):
    model = build_model("mlp").eval()
    spec = build_spec(model)
    report = verify(model, spec, x[:16])
    assert set(report) == {*spec.names, "all"} and max(report.values()) < TOL
