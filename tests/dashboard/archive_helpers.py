"""Architectures outside ccamerge's built-in families, trained briefly on digits and saved as
TorchScript archives (``torch.jit.save``), for the dashboard's upload and merge tests."""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from helpers import ProjBlock
from torch import nn

from ccamerge.data import load_dataset


class LayerNormGeluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 96), nn.LayerNorm(96), nn.GELU(),
                                 nn.Linear(96, 96), nn.LayerNorm(96), nn.GELU(), nn.Linear(96, 10))

    def forward(self, x):
        return self.net(x)


class ConcatNet(nn.Module):
    """Two branches concatenated along channels, read through a flatten by one Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(32, 16, 1), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(),
                                  nn.Linear(64, 10))

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.cat([self.b1(x), self.b2(x)], 1))


class ProjResNet(nn.Module):
    """A ResNet variant whose block has a 1x1 convolution shortcut."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32),
                                  nn.ReLU())
        self.block = ProjBlock(32, 48, 2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(48 * 16, 10))

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


ARCHITECTURES = {"ln_gelu_mlp": LayerNormGeluMLP, "concat_net": ConcatNet,
                 "proj_resnet": ProjResNet}


def train(cls: type[nn.Module], seed: int, *, epochs: int = 4) -> nn.Module:
    """A few epochs of Adam on digits (about 97% test accuracy for each class above)."""
    data = load_dataset("digits")
    torch.manual_seed(seed)
    model = cls()
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.y_train), generator=generator)
        for start in range(0, len(order), 64):
            batch = order[start:start + 64]
            loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def archive_bytes(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    return buffer.getvalue()
