"""Methods side by side on one pair of models: the partial merges of each, layer by layer.

:func:`partial_merges` merges the first k merge points with a method and keeps the reference's
remaining layers (as :func:`ccamerge.analysis.diagnose.partial_curve`), so two methods can be
compared at every depth, not only on the finished merge.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ccamerge.analysis.diagnose import partial_curve
from ccamerge.api import align
from ccamerge.average import average_aligned_state


def partial_merges(models: Sequence[nn.Module], data, method: str, *, reference: int = 0,
                   bn_reset: bool = True, stats_samples: int | None = None, seed: int = 0,
                   **options) -> dict:
    """``{"method", "points", "accuracy", "loss"}``: the merge point names in depth order and
    the test accuracy (percent) and loss of merging the first k of them with ``method``, k = 0
    (the reference alone, after its BatchNorm reset when ``bn_reset``) .. all (the merge)."""
    aligned = align(models, data, method, reference=reference, stats_samples=stats_samples,
                    seed=seed, **options)
    weights = [1.0 / len(models)] * len(models)
    merged = average_aligned_state(models, aligned.alignment, aligned.spec, weights)
    rows = partial_curve(models[reference], merged, aligned.spec, data, bn_reset)
    return {"method": method, "points": aligned.spec.names,
            "accuracy": [r["accuracy"] for r in rows], "loss": [r["loss"] for r in rows]}
