"""Shared fixtures: the digits dataset and a few small models trained once per test session."""

from __future__ import annotations

import numpy as np
import pytest

from ccamerge.data import load_dataset
from ccamerge.layout import ENV_VAR
from ccamerge.train import default_config, train_model


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture
def pinned_layout(monkeypatch):
    """Image passes in the standard layout, in this process and the ones it starts: for tests
    that compare two passes bit for bit (an automatic choice may differ in rounding between
    them; :mod:`ccamerge.layout`)."""
    monkeypatch.setenv(ENV_VAR, "standard")


def _train(arch, digits, seed, epochs, samples=None, **overrides):
    config = default_config(arch, digits) | overrides
    indices = None if samples is None else np.arange(samples)
    return train_model(arch, config, digits, seed=seed, epochs=epochs, indices=indices)


@pytest.fixture(scope="session")
def mlps(digits):
    """Three MLPs (hidden 64, 64) trained from seeds 0, 1, 2."""
    return [_train("mlp", digits, seed, 6, hidden=[64, 64]) for seed in range(3)]


@pytest.fixture(scope="session")
def vgg_bn(digits):
    """Two small VGGs with BatchNorm."""
    return [_train("vgg", digits, seed, 3, batch_norm=True, width=0.5) for seed in range(2)]


@pytest.fixture(scope="session")
def resnets(digits):
    """Two small ResNets (2 blocks per stage, width 0.5: BatchNorm, residual streams)."""
    return [_train("resnet20", digits, seed, 2, samples=600, width=0.5, blocks=2)
            for seed in range(2)]


@pytest.fixture
def batch(digits):
    return digits.x_test[:64]
