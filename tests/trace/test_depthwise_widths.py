"""Depthwise convs in traced models of other widths: a MobileNet-style block (pointwise ->
depthwise -> pointwise, BatchNorm and ReLU) at x1 and at x2 (its duplicated twin) is one
family, merges with cca into either width and into half the twin's width keeping the function,
and convs whose (non-depthwise) groups differ are refused in one line."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from width_nets import MobileBlockCNN, duplicated_module

from ccamerge import api
from ccamerge.errors import CcamergeError
from ccamerge.io import load_archive_model, save_merged
from ccamerge.trace.family import family_specs
from ccamerge.transform import reset_batchnorm

TOL = 1e-4  # float32 forward passes after float64 maps


@torch.no_grad()
def max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    return float((a.eval()(x) - b.eval()(x)).abs().max())


@pytest.fixture(scope="module", params=[1, 2], ids=["multiplier-1", "multiplier-2"])
def pair(request, x) -> tuple[MobileBlockCNN, MobileBlockCNN]:
    """A x1 block (BatchNorm statistics of ``x``) and its x2 twin computing the same function."""
    torch.manual_seed(0)
    narrow = reset_batchnorm(MobileBlockCNN(4, multiplier=request.param), x).eval()
    return narrow, duplicated_module(narrow, MobileBlockCNN(8, multiplier=request.param), x)


def test_the_x1_and_x2_blocks_are_one_family(pair, x):
    narrow, wide = pair
    assert wide.depthwise[0].groups == 2 * narrow.depthwise[0].groups == 16
    specs = family_specs([narrow, wide], x[:32])
    assert [2 * p.width for p in specs[0].points] == [p.width for p in specs[1].points]
    depthwise = specs[0].point("expand.2")
    assert ("depthwise.0.weight", 0) in {(a.param, a.axis) for a in depthwise.producers}
    assert max_diff(narrow, wide, x) < 1e-5


def baseline(narrow: nn.Module, x: torch.Tensor, policy: str) -> nn.Module:
    """What a merge should compute: the x1 block itself under the "paper" BatchNorm policy, its
    merge with itself under "mapped" (whose BatchNorm reset alone moves this block's outputs by
    about 2e-4, with any method, the plain average included)."""
    return narrow if policy == "paper" else api.merge([narrow, narrow], x, "cca").model


@pytest.mark.parametrize("policy", ["paper", "mapped"])
@pytest.mark.parametrize("target", [0, 1])
def test_cca_merges_into_either_width_keeping_the_function(pair, x, target, policy):
    narrow, wide = pair
    models = [narrow, wide]
    result = api.merge(models, x, "cca", target_model=target, bn_policy=policy)
    assert result.model.depthwise[0].weight.shape == models[target].depthwise[0].weight.shape
    assert max_diff(result.model, baseline(narrow, x, policy), x) < TOL


@pytest.mark.parametrize("policy", ["paper", "mapped"])
def test_cca_compresses_the_twin_to_half_keeping_the_function(pair, x, policy):
    narrow, wide = pair
    result = api.merge([narrow, wide], x, "cca", target_model=1, target_width=0.5,
                       bn_policy=policy)
    merged = result.model
    assert merged.depthwise[0].groups == narrow.depthwise[0].groups
    assert {k: v.shape for k, v in merged.state_dict().items()} == \
        {k: v.shape for k, v in narrow.state_dict().items()}
    assert max_diff(merged, baseline(narrow, x, policy), x) < TOL


def _replayed(model: nn.Module, x: torch.Tensor) -> nn.Module:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    return load_archive_model(buffer.getvalue(), x[:8])


def test_archives_merge_into_either_width_but_refuse_a_target_width(pair, x, tmp_path):
    """An archive compiles a depthwise conv's groups into its code: its merges keep the
    target's archive, and a free target width is refused in one line naming the archive."""
    narrow, wide = pair
    replays = [_replayed(m, x) for m in pair]
    for target in (0, 1):
        result = api.merge(replays, x, "cca", target_model=target, bn_policy="paper")
        path = save_merged(result.model, replays[target], tmp_path / f"m{target}.ts",
                           {"merge": result.recipe})
        assert max_diff(torch.jit.load(str(path)), narrow, x) < TOL
    with pytest.raises(CcamergeError) as err:
        api.merge(replays, x, "cca", target_model=1, target_width=0.5)
    line = str(err.value)
    assert "\n" not in line and "model 1 cannot be rebuilt at other widths" in line
    assert "TorchScript archive" in line and "target_model" in line


class GroupedCNN(nn.Module):
    """A conv of ``groups`` groups between two convs, at width ``width``."""

    def __init__(self, width: int, groups: int):
        super().__init__()
        self.stem, self.relu0 = nn.Conv2d(1, width, 3, padding=1), nn.ReLU()
        self.grouped, self.relu1 = nn.Conv2d(width, width, 3, padding=1, groups=groups), nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))

    def forward(self, x):
        return self.head(self.relu1(self.grouped(self.relu0(self.stem(x)))))


def test_grouped_convs_whose_groups_differ_are_refused_in_one_line(x):
    torch.manual_seed(0)
    with pytest.raises(CcamergeError) as err:
        api.merge([GroupedCNN(8, 2).eval(), GroupedCNN(16, 4).eval()], x, "cca")
    line = str(err.value)
    assert "\n" not in line and line.startswith("model 1 does not match model 0")
    assert "grouped (Conv2d): groups 4 vs 2" in line
