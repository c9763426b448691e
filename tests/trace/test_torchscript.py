"""TorchScript archives: replayed, traced, verified and merged like eager models; pickles
refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from traced_nets import (
    TOL,
    DenseNet,
    DepthwiseNet,
    FunctionalNet,
    Inception,
    LayerNormGeluMLP,
    ProjResNet,
    archive,
    key,
    make,
    max_diff,
    merge,
    permuted_copy,
)

from ccamerge.errors import CcamergeError
from ccamerge.models import build_model
from ccamerge.spec import build_spec
from ccamerge.trace.derive import (
    derive_and_verify,
    derive_spec,
)
from ccamerge.trace.torchscript import load_torchscript, script_to_module, with_script_state


@pytest.mark.parametrize("how", ["script", "trace"])
def test_archive_of_built_in_gives_hand_written_spec(how, x):
    model = build_model("resnet20", blocks=1).eval()
    derived = derive_and_verify(load_torchscript(archive(model, x, how)), x[:16])
    assert key(derived.spec) == key(build_spec(model))
    assert derived.verified


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
