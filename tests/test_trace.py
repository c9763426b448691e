"""Derived alignment specs: equal to the hand-written ones for the built-in families, verified
and merged end to end (CCA and permutation matching) for architectures outside them, also
from TorchScript archives."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import ProjBlock
from torch import nn

from ccamerge.errors import CcamergeError
from ccamerge.methods import METHODS
from ccamerge.methods.base import AlignContext
from ccamerge.models import build_model
from ccamerge.spec import AlignmentSpec, Axis, MergePoint, build_spec
from ccamerge.stats import collect_statistics
from ccamerge.trace.derive import (
    derive_and_verify,
    derive_spec,
    has_offsets,
    verify,
)
from ccamerge.trace.explain import explain, to_dot, to_mermaid
from ccamerge.trace.torchscript import load_torchscript, script_to_module, with_script_state
from ccamerge.transform import (
    apply_transforms,
    average_states,
    random_permutations,
    reset_batchnorm,
    with_state,
)

TOL = 1e-4


# architectures outside the built-in families ----------------------------------------------------
class LayerNormGeluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.LayerNorm(48), nn.GELU(),
                                 nn.Linear(48, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)


class Inception(nn.Module):
    """Three branches concatenated along channels, read by one conv (offsets 0, 6, 12)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(8, 6, 1), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1),
                                nn.ReLU())
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(8, 4, 1), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(self.mix(torch.cat([self.b1(x), self.b2(x), self.b3(x)], 1)))


class ProjResNet(nn.Module):
    """ResNet variant with a 1x1 conv shortcut in every block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.blocks = nn.Sequential(ProjBlock(8, 8, 1), ProjBlock(8, 12, 2), ProjBlock(12, 12, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class SiluTanhNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
                                      nn.Conv2d(8, 12, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Tanh(), nn.Linear(16, 10))

    def forward(self, x):
        return self.head(self.features(x))


class DropoutPoolNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout2d(0.2),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(32, 24), nn.ReLU(), nn.Dropout(0.3), nn.Linear(24, 10))

    def forward(self, x):
        return self.body(x)


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(cin, growth, 3, padding=1)

    def forward(self, x):
        return torch.cat([x, self.conv(self.relu(self.bn(x)))], 1)


class DenseNet(nn.Module):
    """DenseNet-style block: every layer reads the concatenation of all earlier outputs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.dense = nn.Sequential(DenseLayer(8, 4), DenseLayer(12, 4), DenseLayer(16, 4))
        self.transition = nn.Sequential(nn.BatchNorm2d(20), nn.ReLU(), nn.Conv2d(20, 10, 1),
                                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(10, 10)

    def forward(self, x):
        return self.fc(self.transition(self.dense(self.stem(x))))


class SqueezeExcite(nn.Module):
    """Channel gating: ``x * sigmoid(gate(x))`` makes the gate's last conv part of x's space."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 4, 1), nn.ReLU(),
                                  nn.Conv2d(4, 8, 1), nn.Sigmoid())
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.act2 = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10))

    def forward(self, x):
        y = self.act1(self.conv1(x))
        return self.head(self.act2(self.conv2(y * self.gate(y))))


class FunctionalNet(nn.Module):
    """F.relu everywhere (no module to hook) and a residual addition."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(torch.flatten(self.pool(y), 1))


class DepthwiseNet(nn.Module):
    """MobileNet-like: the depthwise conv is unsupported, so the spaces around it stay unmerged."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8),
                                nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 24),
                                  nn.ReLU(), nn.Linear(24, 10))

    def forward(self, x):
        return self.head(self.pw(self.dw(self.stem(x))))


class AttentionNet(nn.Module):
    """Conv stem -> tokens -> multi-head attention -> mean -> MLP head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc1 = nn.Linear(8, 6)  # wider would be rank-deficient: tokens are averaged
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(6, 10)

    def forward(self, x):
        tokens = self.stem(x).flatten(2).transpose(1, 2)
        mixed, _ = self.attn(tokens, tokens, tokens)
        return self.fc2(self.act(self.fc1(mixed.mean(1))))


SUPPORTED = [LayerNormGeluMLP, Inception, ProjResNet, SiluTanhNet, DropoutPoolNet, DenseNet,
             SqueezeExcite, FunctionalNet]
WITH_UNSUPPORTED = [DepthwiseNet, AttentionNet]
EXPECTED_POINTS = {LayerNormGeluMLP: 2, Inception: 6, ProjResNet: 7, SiluTanhNet: 3,
                   DropoutPoolNet: 3, DenseNet: 5, SqueezeExcite: 3, FunctionalNet: 1,
                   DepthwiseNet: 2, AttentionNet: 1}


def make(cls, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls().eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def key(spec: AlignmentSpec) -> set:
    """A spec up to point names and the order of axes and features."""
    return {(frozenset(p.features), frozenset(p.producers), frozenset(p.consumers), p.width)
            for p in spec.points}


def merge(models, spec, x, method, *, bn_reset: bool = False, **options) -> nn.Module:
    """ccamerge's machinery on a derived spec: statistics, solve, transform, average, and
    (as ``api.merge`` does by default) the BatchNorm reset that CCA-mixed running stats need."""
    stats = collect_statistics(models, spec, x)
    ctx = AlignContext([m.state_dict() for m in models], spec, stats)
    alignment = METHODS[method].align(ctx, **options)
    states = [apply_transforms(m.state_dict(), spec, t)
              for m, t in zip(models, alignment.transforms, strict=True)]
    merged = with_state(models[0], average_states(states))
    return reset_batchnorm(merged, x) if bn_reset else merged.eval()


def permuted_copy(model, spec, seed: int = 1) -> nn.Module:
    state = apply_transforms(model.state_dict(), spec, random_permutations(spec, seed))
    return with_state(model, state).eval()


@torch.no_grad()
def max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    return float((a.eval()(x) - b.eval()(x)).abs().max())


def archive(model: nn.Module, x: torch.Tensor, how: str = "script") -> bytes:
    compiled = torch.jit.script(model) if how == "script" else torch.jit.trace(model, x[:4])
    buffer = io.BytesIO()
    torch.jit.save(compiled, buffer)
    return buffer.getvalue()


# built-in families ------------------------------------------------------------------------------
BUILT_IN = [("mlp", {}), ("mlp", {"hidden": [32, 24, 16]}), ("vgg", {}),
            ("vgg", {"batch_norm": True}), ("vgg", {"batch_norm": True, "classifier": [32, 16]}),
            ("vgg", {"classifier": [24]}), ("resnet20", {}), ("resnet20", {"width": 0.5})]


@pytest.mark.parametrize(("arch", "config"), BUILT_IN)
def test_derived_spec_equals_hand_written(arch, config, x):
    model = build_model(arch, **config).eval()
    derived = derive_and_verify(model, x[:16])
    assert key(derived.spec) == key(build_spec(model))
    assert derived.verified and not derived.unsupported


@pytest.mark.parametrize("how", ["script", "trace"])
def test_archive_of_built_in_gives_hand_written_spec(how, x):
    model = build_model("resnet20", blocks=1).eval()
    derived = derive_and_verify(load_torchscript(archive(model, x, how)), x[:16])
    assert key(derived.spec) == key(build_spec(model))
    assert derived.verified


# custom architectures: trace, verify, merge ---------------------------------------------------
@pytest.mark.parametrize("cls", SUPPORTED + WITH_UNSUPPORTED)
def test_derive_and_verify(cls, x):
    derived = derive_and_verify(make(cls), x[:32])
    assert len(derived.spec.points) == EXPECTED_POINTS[cls]
    assert derived.verified, derived.verification
    assert max(derived.verification.values()) < TOL
    assert bool(derived.unsupported) == (cls in WITH_UNSUPPORTED)


@pytest.mark.parametrize("cls", SUPPORTED + WITH_UNSUPPORTED)
def test_merge_end_to_end(cls, x):
    model = make(cls)
    spec = derive_and_verify(model, x[:32]).spec
    twin = permuted_copy(model, spec)
    assert max_diff(model, twin, x) < TOL  # the spec is a symmetry of the network
    assert max_diff(merge([model, twin], spec, x, "permute"), model, x) < TOL
    assert max_diff(merge([model, make(cls)], spec, x, "cca", gamma=0.1, relative=True),
                    model, x) < TOL
    other = make(cls, seed=1)
    for method, options in (("cca", {"gamma": 0.1, "relative": True}), ("permute", {})):
        merged = merge([model, other], spec, x, method, bn_reset=True, **options)
        with torch.no_grad():
            out = merged(x)
        assert out.shape == (len(x), 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("cls", SUPPORTED)
def test_weight_matching_on_derived_spec(cls, x):
    """Data-free weight matching undoes a permutation, concatenation offsets included."""
    model = make(cls)
    spec = derive_spec(model, x[:8]).spec
    assert has_offsets(spec) == (cls in (Inception, DenseNet))
    merged = merge([model, permuted_copy(model, spec)], spec, x, "weight_matching")
    assert max_diff(merged, model, x) < TOL


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


def test_depthwise_is_reported_and_neighbours_unmerged(x):
    derived = derive_spec(make(DepthwiseNet), x[:8])
    (report,) = derived.unsupported
    assert report["op"] == "Conv2d" and report["location"] == "dw.0"
    assert "depthwise" in report["reason"]
    axes = {(a.param, a.axis) for p in derived.spec.points for a in p.producers + p.consumers}
    assert not axes & {("stem.0.weight", 0), ("dw.0.weight", 0), ("dw.1.weight", 0),
                       ("pw.0.weight", 1)}
    assert any(u.startswith("8 channels from stem.0") for u in derived.unmerged)
    assert any(u.startswith("8 channels from dw.0") for u in derived.unmerged)


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


# explanation -----------------------------------------------------------------------------------
def test_explain_is_json_with_diagrams(x):
    derived = derive_and_verify(make(DepthwiseNet), x[:16])
    info = json.loads(json.dumps(explain(derived)))
    assert [p["name"] for p in info["points"]] == derived.spec.names
    point = info["points"][0]
    assert {"producers", "consumers", "features", "width", "layers"} <= set(point)
    assert {"param", "axis", "repeat", "offset"} == set(point["producers"][0])
    assert info["unsupported"][0]["reason"] and info["verified"]
    dot, mermaid = info["dot"], info["mermaid"]
    assert dot.startswith("digraph") and "octagon" in dot and derived.spec.names[0] in dot
    assert mermaid.startswith("flowchart TD") and "class " in mermaid
    assert to_dot(derived) == dot and to_mermaid(derived) == mermaid


# TorchScript archives --------------------------------------------------------------------------
@pytest.mark.parametrize(("cls", "how"), [(LayerNormGeluMLP, "script"), (Inception, "script"),
                                          (ProjResNet, "trace"), (DenseNet, "script"),
                                          (FunctionalNet, "script"), (DepthwiseNet, "script")])
def test_archive_traced_verified_merged(cls, how, x):
    blobs = [archive(make(cls, seed), x, how) for seed in (0, 1)]
    scripts = [load_torchscript(blob) for blob in blobs]
    derived = derive_and_verify(scripts[0], x[:32])
    assert derived.verified
    assert key(derived.spec) == key(derive_spec(make(cls), x[:8]).spec)
    replays = [script_to_module(s, x[:8]) for s in scripts]
    assert set(replays[0].state_dict()) == set(scripts[0].state_dict())
    for method, options in (("cca", {"gamma": 0.1, "relative": True}), ("permute", {})):
        merged = merge(replays, derived.spec, x, method, bn_reset=True, **options)
        saved = with_script_state(scripts[0], merged.state_dict())
        assert max_diff(merged, saved, x) < 1e-5  # the replay computes what the archive does
    twin = permuted_copy(replays[0], derived.spec)
    assert max_diff(merge([replays[0], twin], derived.spec, x, "permute"), scripts[0], x) < TOL


def test_load_torchscript_rejects_pickles(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(CcamergeError, match="TorchScript"):
        load_torchscript(path)


def test_archive_with_unreplayable_submodule_is_opaque(x):
    class Looper(nn.Module):
        def forward(self, x):
            for _ in range(2):
                x = x * 0.5
            return x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16)
            self.act2, self.loop, self.fc3 = nn.ReLU(), Looper(), nn.Linear(16, 10)

        def forward(self, x):
            return self.fc3(self.loop(self.act2(self.fc2(self.act(self.fc1(x.flatten(1)))))))

    script = load_torchscript(archive(make(Outer), x))
    derived = derive_and_verify(script, x[:16])
    assert [p.features for p in derived.spec.points] == [("act",)]
    assert derived.unsupported[0]["location"] == "loop"
    assert any("loop" in n and "compiled" in n for n in derived.notes)
