"""A user's model with a ``width`` argument (outside the built-in families), and its twin of
double width that computes the same function, for the tests of traced mixed widths."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ccamerge.trace.derive import derive_and_verify
from ccamerge.transform import Transform, apply_transforms, reset_batchnorm


class WidthCNN(nn.Module):
    """A user's CNN with a ``width`` argument: stem -> residual block (``conv2(conv1(y)) + y``)
    -> a concatenation ``[y, side(y)]`` read by ``mix`` -> pool -> two Linear layers.

    Input ``[B, in_channels, 8, 8]``, output ``[B, classes]``. ``batch_norm``: BatchNorm after
    the stem and the block's convs (else identities)."""

    def __init__(self, width: int = 4, *, kernel: int = 3, batch_norm: bool = True,
                 in_channels: int = 1, classes: int = 10):
        super().__init__()
        norm = nn.BatchNorm2d if batch_norm else (lambda _c: nn.Identity())
        self.stem = nn.Conv2d(in_channels, width, kernel, padding=kernel // 2)
        self.bn0, self.relu0 = norm(width), nn.ReLU()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(width, 2 * width, 3, padding=1), \
            norm(2 * width), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(2 * width, width, 3, padding=1), \
            norm(width), nn.ReLU()
        self.side, self.relu3 = nn.Conv2d(width, width, 1), nn.ReLU()
        self.mix, self.relu4 = nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU()
        self.pool, self.flat = nn.AdaptiveAvgPool2d(2), nn.Flatten()
        self.fc1, self.relu5 = nn.Linear(8 * width, 3 * width), nn.ReLU()
        self.fc2 = nn.Linear(3 * width, classes)

    def forward(self, x):
        y = self.relu0(self.bn0(self.stem(x)))  # [B, w, 8, 8]
        z = self.relu1(self.bn1(self.conv1(y)))  # [B, 2w, 8, 8]
        y = self.relu2(self.bn2(self.conv2(z)) + y)  # the residual stream [B, w, 8, 8]
        y = self.relu4(self.mix(torch.cat([y, self.relu3(self.side(y))], 1)))  # [B, 2w, 8, 8]
        return self.fc2(self.relu5(self.fc1(self.flat(self.pool(y)))))  # [B, classes]


class NoSkipCNN(WidthCNN):
    """The same modules without the residual add: another wiring."""

    def forward(self, x):
        y = self.relu0(self.bn0(self.stem(x)))
        y = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(y))))))
        y = self.relu4(self.mix(torch.cat([y, self.relu3(self.side(y))], 1)))
        return self.fc2(self.relu5(self.fc1(self.flat(self.pool(y)))))


def make(width: int = 4, seed: int = 0, x: torch.Tensor | None = None, **kwargs) -> WidthCNN:
    """A random :class:`WidthCNN`, its BatchNorm statistics those of ``x`` when given (so that
    the BatchNorm reset after a merge finds the same statistics again)."""
    torch.manual_seed(seed)
    model = WidthCNN(width, **kwargs)
    return (reset_batchnorm(model, x) if x is not None else model).eval()


def duplicated(model: WidthCNN, x: torch.Tensor) -> WidthCNN:
    """A :class:`WidthCNN` of twice the width computing the same function: every unit of every
    merge point of the traced spec twice (producers ``[W; W]``), each copy read with half the
    weight (consumers ``[W/2, W/2]``), concatenation offsets included."""
    spec = derive_and_verify(model, x[:32]).spec
    maps = {p.name: Transform(np.hstack([np.eye(p.width)] * 2),  # [n, 2n]
                              np.vstack([np.eye(p.width) / 2] * 2)) for p in spec.points}
    wide = WidthCNN(2 * model.stem.out_channels, batch_norm=isinstance(model.bn0, nn.BatchNorm2d))
    wide.load_state_dict(apply_transforms(model.state_dict(), spec, maps))
    return wide.eval()


class MobileBlockCNN(nn.Module):
    """A MobileNet-style net with a ``width`` argument: stem -> pointwise (``w -> 2w``) ->
    depthwise 3x3 (``groups = 2w``, ``multiplier`` outputs per channel) -> pointwise (back to
    ``w``), each with BatchNorm and ReLU -> pool -> Linear. Input ``[B, 1, 8, 8]``."""

    def __init__(self, width: int = 4, *, multiplier: int = 1, classes: int = 10):
        super().__init__()
        inner = 2 * width

        def unit(conv: nn.Conv2d) -> nn.Sequential:
            return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU())

        self.stem = unit(nn.Conv2d(1, width, 3, padding=1))
        self.expand = unit(nn.Conv2d(width, inner, 1))
        self.depthwise = unit(nn.Conv2d(inner, multiplier * inner, 3, padding=1, groups=inner))
        self.project = unit(nn.Conv2d(multiplier * inner, width, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))

    def forward(self, x):
        y = self.stem(x)  # [B, w, 8, 8]
        y = self.project(self.depthwise(self.expand(y)))  # [B, w, 8, 8]
        return self.head(y)  # [B, classes]


def duplicated_module(model: nn.Module, wide: nn.Module, x: torch.Tensor) -> nn.Module:
    """``wide`` (``model``'s architecture at twice its traced widths) carrying ``model``'s
    function: every unit of every merge point twice (producers ``[W; W]``), each copy read with
    half the weight (consumers ``[W/2, W/2]``)."""
    spec = derive_and_verify(model, x[:32]).spec
    maps = {p.name: Transform(np.hstack([np.eye(p.width)] * 2),  # [n, 2n]
                              np.vstack([np.eye(p.width) / 2] * 2)) for p in spec.points}
    wide.load_state_dict(apply_transforms(model.state_dict(), spec, maps))
    return wide.eval()
