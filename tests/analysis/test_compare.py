"""Partial merges of two methods on one pair, checked against the merges themselves."""

import pytest

from ccamerge.analysis.compare import partial_merges
from ccamerge.api import merge
from ccamerge.evaluate import evaluate_model


@pytest.mark.parametrize("method", ["permute", "cca"])
def test_partial_merges_run_from_the_reference_to_the_merge(mlps, digits, method):
    curve = partial_merges(mlps[:2], digits, method, bn_reset=False)
    assert curve["method"] == method and curve["points"] == ["fc1", "fc2"]
    assert len(curve["accuracy"]) == len(curve["loss"]) == 3
    alone = evaluate_model(mlps[0], digits.x_test, digits.y_test)
    assert curve["accuracy"][0] == pytest.approx(alone["accuracy"])
    merged = merge(mlps[:2], digits, method, bn_reset=False).model
    assert curve["accuracy"][-1] == pytest.approx(
        evaluate_model(merged, digits.x_test, digits.y_test)["accuracy"])


def test_options_reach_the_method(mlps, digits):
    rotation = partial_merges(mlps[:2], digits, "cca", bn_reset=False, gamma=1e6)
    exact = partial_merges(mlps[:2], digits, "cca", bn_reset=False, gamma=1e-4)
    assert rotation["loss"][-1] != pytest.approx(exact["loss"][-1])
