"""Diagnosis and sweep on statistics collected earlier: the same report as a fresh pass, no pass
of their own, and the base and ensemble scores of one pass per model."""

import pytest

import ccamerge.analysis.diagnose as diagnose_module
from ccamerge import api
from ccamerge.analysis.diagnose import diagnose, sweep
from ccamerge.evaluate import evaluate_ensemble, evaluate_model
from ccamerge.stats import collect_statistics

SAMPLES = 600


def _stats(models, digits, pairs="reference"):
    x = api.train_inputs(digits)
    return collect_statistics(models, api.resolve_spec(models, x), api.subsample(x, SAMPLES, 0),
                              pairs=pairs)


def _counting(monkeypatch):
    calls = []
    real = diagnose_module.collect_statistics

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(diagnose_module, "collect_statistics", spy)
    monkeypatch.setattr(api, "collect_statistics", spy)
    return calls


def test_diagnosis_on_given_statistics_is_the_fresh_diagnosis_without_a_pass(mlps, digits,
                                                                              monkeypatch):
    fresh = diagnose(mlps[:2], digits, "cca", stats_samples=SAMPLES)
    stats = _stats(mlps[:2], digits)
    calls = _counting(monkeypatch)
    reused = diagnose(mlps[:2], digits, "cca", stats_samples=SAMPLES, statistics=stats)
    assert calls == []
    assert reused["points"] == fresh["points"] and reused["merged"] == fresh["merged"]
    assert reused["findings"] == fresh["findings"]


def test_base_and_ensemble_scores_match_their_oracles(mlps, digits):
    report = diagnose(mlps[:2], digits, "permute", stats_samples=SAMPLES)
    for model, score in zip(mlps[:2], report["base"], strict=True):
        assert score == pytest.approx(evaluate_model(model, digits.x_test, digits.y_test))
    assert report["ensemble"] == pytest.approx(
        evaluate_ensemble(mlps[:2], digits.x_test, digits.y_test))
    assert report["reference_only"] == report["base"][0]
    shares = report["predicted_classes"][1]
    predicted = mlps[1](digits.x_test).argmax(1)
    assert shares[3] == pytest.approx(float((predicted == 3).double().mean()))


def test_sweep_on_given_statistics_scores_like_a_fresh_pass(mlps, digits, monkeypatch):
    grid = [{"gamma": g, "relative": True} for g in (1e-2, 1.0)]
    held = (digits.x_train[-300:], digits.y_train[-300:])
    fresh = sweep(mlps[:2], digits, "cca", grid=grid, validation=held, stats_samples=SAMPLES)
    stats = _stats(mlps[:2], digits)
    calls = _counting(monkeypatch)
    reused = sweep(mlps[:2], digits, "cca", grid=grid, validation=held, stats_samples=SAMPLES,
                   statistics=stats)
    assert calls == [] and reused["accuracy"] == fresh["accuracy"]


def test_sweep_refuses_statistics_without_validation_images(mlps, digits):
    with pytest.raises(Exception, match="validation"):
        sweep(mlps[:2], digits, "cca", statistics=_stats(mlps[:2], digits))
