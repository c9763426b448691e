"""Helpers shared by tests (import with ``from helpers import ...``)."""

from __future__ import annotations

import torch
from torch import nn

from ccamerge.cli import main
from ccamerge.spec import build_spec
from ccamerge.transform import apply_transforms, random_permutations, with_state


def permuted_twin(model, seed=1):
    """A copy of ``model`` with every merge point's units randomly permuted (same function)."""
    spec = build_spec(model)
    twin = with_state(model, apply_transforms(model.state_dict(), spec,
                                              random_permutations(spec, seed)))
    twin.info = dict(getattr(model, "info", {}))
    return twin


def max_output_diff(a, b, x) -> float:
    with torch.no_grad():
        return float((a.eval()(x) - b.eval()(x)).abs().max())


class ProjBlock(nn.Module):
    """A ResNet block with a 1x1 convolution shortcut (for architectures outside the built-ins)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``ccamerge *argv --json --quiet`` in this process."""
    code = main([*argv, "--json", "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err
