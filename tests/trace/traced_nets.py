"""Architectures outside the built-in families (and helpers) for the tracing tests."""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from helpers import ProjBlock
from torch import nn

from ccamerge.methods import METHODS
from ccamerge.methods.base import AlignContext
from ccamerge.spec import AlignmentSpec
from ccamerge.stats import collect_statistics
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
    """MobileNet-like: the depthwise conv filters each channel alone, so its input and output
    are one channel space (one merge point, its statistics pooled from both sides)."""

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
             SqueezeExcite, FunctionalNet, DepthwiseNet]
WITH_UNSUPPORTED = [AttentionNet]
EXPECTED_POINTS = {LayerNormGeluMLP: 2, Inception: 6, ProjResNet: 7, SiluTanhNet: 3,
                   DropoutPoolNet: 3, DenseNet: 5, SqueezeExcite: 3, FunctionalNet: 1,
                   DepthwiseNet: 3, AttentionNet: 1}


def make(cls, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls().eval()


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
