"""Long work on the pages: how long it will take (from a timed forward pass) and the flags that
let a Cancel button stop it. No ``st.*``: the flags live in a mapping the caller passes (the
session state), so the logic is tested without a script run.

A run stops when Streamlit interrupts the script: pressing Cancel requests a new run, and the
running one raises at its next progress update (every batch of the statistics pass, every merge,
every point of a curve). Results are stored only when a computation finishes, so a stopped run
leaves nothing half-done and the earlier results stay. Cancel also records the run's
``signature``: a page that computes on its own when drawn (diagnosis, curves) then waits for its
Run button instead of starting the same work again.
"""

from __future__ import annotations

from collections.abc import MutableMapping

CANCELLED = "ccm_cancelled"  # session key: task -> signature of the run that was cancelled
STATS_COST = 1.0  # a statistics pass costs about one forward pass per image and model
# Solves, copies and drawing on top of the forward passes: merging 2 VGG x1 on Fashion-MNIST
# with every method took 1.6x what its passes alone predict (benchmarks/dashboard_timings.py)
MARGIN = 1.6


def cancel(store: MutableMapping, task: str, signature: str) -> None:
    """Remember that the run of ``task`` with ``signature`` was cancelled (a button callback)."""
    store.setdefault(CANCELLED, {})[task] = signature


def is_cancelled(store: MutableMapping, task: str, signature: str) -> bool:
    """True while the last cancelled run of ``task`` is the one with ``signature``."""
    return store.get(CANCELLED, {}).get(task) == signature


def resume(store: MutableMapping, task: str) -> None:
    """Forget the cancelled run of ``task`` (its Run button was pressed)."""
    store.get(CANCELLED, {}).pop(task, None)


def estimate_seconds(per_image: float, *, stats_forwards: int, forwards: int) -> float:
    """Seconds for ``stats_forwards`` image-model forward passes of a statistics pass (0 when
    the statistics are cached) and ``forwards`` more (scores, BatchNorm resets, curves), at
    ``per_image`` seconds per image and model, times :data:`MARGIN`."""
    return MARGIN * per_image * (STATS_COST * stats_forwards + forwards)


def estimate_text(seconds: float) -> str:
    """``about 12 s`` / ``about 3 min``; ``under a second``."""
    if seconds < 1:
        return "under a second"
    if seconds < 90:
        return f"about {max(1, round(seconds)):d} s"
    return f"about {round(seconds / 60):d} min"
