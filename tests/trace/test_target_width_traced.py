"""``target_width`` for traced models (a fraction of the reference's widths at every merge
point): a resized copy of the reference is a real instance at those widths, a duplicated
reference (residual add, BatchNorm, a concatenation) compressed to half keeps the function, the
reference's widths are the plain merge, archives through the CLI replay bit for bit, and bad
values or models whose code fixes a width are refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli
from torch import nn
from width_nets import WidthCNN, duplicated, make

from ccamerge import api
from ccamerge.errors import CcamergeError
from ccamerge.trace.derive import derive_and_verify
from ccamerge.trace.resize import resized_model

TOL = 1e-4  # float32 forward passes after float64 maps


@torch.no_grad()
def max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    return float((a.eval()(x) - b.eval()(x)).abs().max())


def shapes(model: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def equal_states(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module", params=[True, False], ids=["bn", "no-bn"])
def pair(request, x) -> tuple[WidthCNN, WidthCNN]:
    narrow = make(x=x, batch_norm=request.param)
    return narrow, duplicated(narrow, x)


def test_the_resized_copy_is_the_model_built_at_those_widths(x):
    """Half of every point of a width-8 WidthCNN: the layers and tensors of WidthCNN(4)."""
    wide = make(8)
    spec = derive_and_verify(wide, x[:32]).spec
    narrow = resized_model(wide, spec, {p.name: p.width // 2 for p in spec.points}, x[:16])
    built = make(4)
    assert type(narrow) is WidthCNN and shapes(narrow) == shapes(built)
    assert [repr(m) for m in narrow.children()] == [repr(m) for m in built.children()]


@pytest.mark.parametrize("method", ["cca", "gcca"])
def test_a_duplicated_reference_compressed_to_half_keeps_the_function(pair, x, method):
    narrow, wide = pair
    result = api.merge([narrow, wide], x, method, target_model=1, target_width=0.5)
    assert type(result.model) is WidthCNN and shapes(result.model) == shapes(narrow)
    assert max_diff(result.model, narrow, x) < TOL
    assert result.recipe["reference"] == 1 and result.recipe["target_width"] == 0.5
    assert result.recipe["target_widths"] == {"relu0": 4, "relu1": 8, "relu3": 4, "relu4": 8,
                                              "relu5": 12}


def test_the_references_widths_are_the_plain_merge(pair, x):
    narrow, wide = pair
    plain = api.merge([narrow, wide], x, "cca")
    full = api.merge([narrow, wide], x, "cca", target_width=1.0)
    assert equal_states(plain.model, full.model) and full.recipe["target_width"] == 1.0
    # the fraction is of the reference's widths, whichever model already has them
    into = api.merge([wide, narrow], x, "cca", target_width=0.5)
    assert into.recipe["reference"] == 0 and shapes(into.model) == shapes(narrow)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"target_width": 1.5}, "a fraction of the reference's widths in (0, 1], got 1.5"),
    ({"target_width": 0.0}, "positive number"),
    ({"target_width": 0.75, "target_model": 1}, "the largest allowed is 0.5"),
    ({"target_width": 0.5, "method": "permute"}, "only cca and gcca"),
])
def test_bad_values_are_refused_in_one_line(x, kwargs, words):
    narrow = make(x=x)
    models = [narrow, duplicated(narrow, x)]
    with pytest.raises(CcamergeError) as err:
        api.merge(models, x, **{"method": "cca", **kwargs})
    assert "\n" not in str(err.value) and words in str(err.value)


class FixedFlatten(nn.Module):
    """A forward whose code fixes a width: the flatten to ``4 * 4`` entries per image."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.conv, self.relu = nn.Conv2d(1, width, 3, padding=1), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(2), nn.Linear(4 * width, 10)

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.conv(x))).reshape(x.shape[0], 16))


def test_a_model_whose_code_fixes_a_width_is_refused_in_one_line(x):
    torch.manual_seed(0)
    models = [FixedFlatten().eval(), FixedFlatten().eval()]
    with pytest.raises(CcamergeError) as err:
        api.merge(models, x, "cca", target_width=0.5)
    line = str(err.value)
    assert "\n" not in line and "model 0 cannot be rebuilt at other widths" in line
    assert "target_model" in line


def test_cli_compresses_archives_to_a_target_width_and_replay_reproduces(archive_files, digits,
                                                                        tmp_path, capsys):
    out, again = tmp_path / "merged.ts", tmp_path / "again.ts"
    code, text, err = run_cli(capsys, "merge", *archive_files, "--method", "cca", "--target-model",
                           "1", "--target-width", "0.5", "--out", str(out), "--trust-code")
    assert code == 0, err
    report = json.loads(text)
    assert report["reference"] == 1 and report["target_width"] == 0.5
    merged, narrow = torch.jit.load(str(out)), torch.jit.load(archive_files[0])
    assert shapes(merged) == shapes(narrow)
    assert max_diff(merged, narrow, digits.x_train[:500]) < TOL
    code, _text, err = run_cli(capsys, "replay", str(out), "--out", str(again), "--trust-code")
    assert code == 0, err
    assert equal_states(merged, torch.jit.load(str(again)))
