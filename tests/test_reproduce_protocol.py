"""The reproduction's protocol: every pair at N = 2, and the plateau rule for training length."""

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import reproduce  # noqa: E402


def test_n2_cells_take_every_pair_and_larger_n_a_sample():
    profile = {"subsets": 3}
    pairs = reproduce.subsets_for(2, 6, profile, random.Random(0))
    assert len(pairs) == 15 == len(set(pairs))
    triples = reproduce.subsets_for(3, 6, profile, random.Random(0))
    assert len(triples) == 3 and all(len(set(t)) == 3 for t in triples)


@pytest.mark.parametrize(("losses", "chosen"), [
    ({10: 1.0, 20: 0.5, 40: 0.47, 80: 0.46}, 40),  # 40 -> 80 would gain < 10%: stop at 40's try
    ({10: 1.0, 20: 0.5, 40: 0.2, 80: 0.05}, 80),  # still falling: the cap
    ({10: 0.02, 20: 0.015, 40: 0.01, 80: 0.0}, 20),  # within PLATEAU_ABS at once
])
def test_the_plateau_rule_doubles_until_the_loss_stops_falling(monkeypatch, losses, chosen):
    tried = []

    def fake_pool(_arch, _width, _setting, _data, _profile, _cache, seeds, base):
        tried.append(base)
        return [base]

    monkeypatch.setattr(reproduce, "train_pool", fake_pool)
    monkeypatch.setattr(reproduce, "training_scores", lambda e, _data: {"loss": losses[e]})
    profile = {"epochs": {"vgg": 10}, "max_epochs": 80}
    epochs, trail = reproduce.plateau_epochs("vgg", 1.0, "same", None, profile, Path("."))
    assert epochs == chosen and trail == [(e, losses[e]) for e in tried]
