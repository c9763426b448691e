"""The checklist on constructed diagnosis reports: similarity is judged at every merge point."""

from __future__ import annotations

import pytest

from ccamerge.analysis.checklist import FAR_APART_MATCHED, FAR_APART_RHO, findings_for


def point(name: str, matched: float = 0.6, rho: float = 0.6) -> dict:
    """One healthy merge point of a report (64 units, plenty of samples, no collapse)."""
    return {"name": name, "width": 64, "mean_rho": rho, "mean_matched": matched,
            "mean_same_index": 0.05, "cond_reference": 50.0, "cond_models": 60.0,
            "dead_units": [0, 0], "dead_fraction": 0.0, "samples": 64_000,
            "samples_per_feature": 1000.0, "variance_ratio": 0.9, "partial_accuracy": 90.0,
            "partial_loss": 0.3, "damage_loss": 0.05, "damage_accuracy": 1.0}


def report(points: list[dict], merged: float = 97.0, **extra) -> dict:
    """A diagnosis report of two base models at 98% (ensemble 98.5%) merged to ``merged``."""
    return {"method": "cca", "options": {"gamma": 0.1, "relative": True}, "reference": 0,
            "bn_reset": True, "has_batchnorm": False, "num_classes": 10,
            "base": [{"accuracy": 98.0, "loss": 0.1}] * 2,
            "ensemble": {"accuracy": 98.5, "loss": 0.08},
            "merged": {"accuracy": merged, "loss": 0.2}, "reference_only": {"accuracy": 98.0},
            "points": points, "ranking": [p["name"] for p in points],
            "predicted_classes": [[0.1] * 10, [0.1] * 10], **extra}


def by_id(findings: list[dict]) -> dict[str, dict]:
    return {f["id"]: f for f in findings}


def test_a_deep_point_that_is_dissimilar_is_named_with_its_number():
    points = [point("conv1", 0.55), point("conv2", 0.45), point("conv3", 0.22, rho=0.41),
              point("conv4", 0.26), point("conv5", 0.5)]
    found = by_id(findings_for(report(points, merged=80.0)))
    far = found["far_apart"]
    assert far["severity"] == "warning" and "far_apart_early" not in found
    assert "far apart at conv3" in far["title"] and "mean matched correlation 0.22" in far["title"]
    assert "2 of 5 merge points dissimilar" in far["title"] and "conv4 0.26" in far["title"]
    gap = found["merge_gap"]  # 18 points lost: the checklist points at the warning, not "no cause"
    assert "no known cause" not in gap["title"] and "base model;" in gap["title"]
    assert "these warnings may: The models are far apart at conv3" in gap["title"]


def test_a_dissimilar_first_point_is_about_low_level_features():
    points = [point("fc1", 0.25), point("fc2", 0.05 + FAR_APART_MATCHED)]
    far = by_id(findings_for(report(points)))["far_apart_early"]
    assert "first merge point fc1" in far["title"] and "1 of 2" in far["title"]


def test_low_canonical_correlation_alone_counts():
    points = [point("fc1"), point("fc2", matched=0.5, rho=FAR_APART_RHO - 0.05)]
    far = by_id(findings_for(report(points)))["far_apart"]
    assert "fc2" in far["title"] and "mean canonical correlation 0.30" in far["title"]


def test_similar_points_give_no_finding_and_an_unexplained_gap_says_so():
    found = by_id(findings_for(report([point("fc1"), point("fc2")], merged=80.0)))
    assert not {"far_apart", "far_apart_early"} & set(found)
    assert "no known cause explains it" in found["merge_gap"]["title"]


@pytest.mark.parametrize("current, best, applies", [(85.0, 95.0, True), (94.5, 95.0, False)])
def test_an_untuned_setting_carries_the_setting_to_apply(current, best, applies):
    sweep = {"method": "cca", "grid": [{"gamma": 0.1, "relative": True},
                                       {"gamma": 1.0, "relative": True}],
             "accuracy": [current, best], "loss": [0.3, 0.2],
             "best": {"gamma": 1.0, "relative": True},
             "best_index": 1, "best_at_edge": False, "parameter": "gamma",
             "current": {"options": {"gamma": 0.1, "relative": True}, "accuracy": current,
                         "loss": 0.3}}
    found = by_id(findings_for(report([point("fc1")], merged=90.0, sweep=sweep)))
    assert ("untuned" in found) is applies
    if applies:
        assert found["untuned"]["apply"] == {"method": "cca",
                                             "options": {"gamma": 1.0, "relative": True}}
