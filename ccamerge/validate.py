"""Checks of the plain arguments the API and the CLI take (counts, indices, seeds, weights), each
raising one :class:`~ccamerge.errors.CcamergeError` line that says what is allowed.

Every number must be finite and of the right type: ``nan``, ``inf``, ``True`` for an integer and
``2.5`` for a count are refused, never coerced.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from torch import nn

from ccamerge.errors import CcamergeError

MAX_SEED = 2**32 - 1  # numpy's legacy generators take seeds below 2**32
MAX_STEPS = 1001  # interpolation grid points
MAX_BATCH = 2**20


def integer(name: str, value, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (``high`` None: no upper bound)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise CcamergeError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        span = f"in {low}..{high}" if high is not None else f">= {low}"
        raise CcamergeError(f"{name} must be an integer {span}, got {value}")
    return int(value)


def optional_integer(name: str, value, low: int, high: int | None = None) -> int | None:
    """None, or :func:`integer`."""
    return None if value is None else integer(name, value, low, high)


def flag(name: str, value) -> bool:
    """A true/false switch (``bool`` or ``numpy.bool_``)."""
    if not isinstance(value, bool | np.bool_):
        raise CcamergeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def models(values, minimum: int = 2) -> list[nn.Module]:
    """A list or tuple of at least ``minimum`` ``torch.nn.Module`` s."""
    if not isinstance(values, list | tuple):
        raise CcamergeError(f"expected a list of models, got {type(values).__name__}")
    bad = [i for i, m in enumerate(values) if not isinstance(m, nn.Module)]
    if bad:
        raise CcamergeError(f"model {bad[0]} is a {type(values[bad[0]]).__name__}, not a "
                            "torch.nn.Module; load model files with ccamerge.load_model")
    if len(values) < minimum:
        raise CcamergeError(f"merging needs at least {minimum} models, got {len(values)}")
    return list(values)


def merge_weights(values, count: int) -> list[float] | None:
    """None, or ``count`` finite non-negative numbers summing to 1 (within 1e-6)."""
    if values is None:
        return None
    if isinstance(values, str) or not isinstance(values, Sequence | np.ndarray):
        raise CcamergeError(f"weights must be a list of {count} numbers, got {values!r}")
    out = [_finite("weight", w) for w in values]
    if len(out) != count:
        raise CcamergeError(f"got {len(out)} weights for {count} models; give one per model")
    if min(out) < 0 or abs(sum(out) - 1.0) > 1e-6:
        raise CcamergeError(f"weights must be >= 0 and sum to 1, got {out}; divide them by "
                            "their sum")
    return out


def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise CcamergeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise CcamergeError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def method_name(value) -> str:
    """A method name must be a string (the registry lists the valid ones)."""
    if not isinstance(value, str):
        raise CcamergeError(f"method must be a name such as 'cca', got {value!r}")
    return value


def sampling(stats_samples, seed, batch_size: int = 1) -> None:
    """``stats_samples`` (None or >= 2), ``seed`` (0..2**32-1) and ``batch_size`` (>= 1)."""
    optional_integer("stats_samples", stats_samples, 1)
    if stats_samples is not None and stats_samples < 2:
        raise CcamergeError(f"need at least 2 statistics samples, got {stats_samples}")
    integer("seed", seed, 0, MAX_SEED)
    integer("batch_size", batch_size, 1, MAX_BATCH)


def merge_arguments(values, method, *, reference, weights, stats_samples, batch_size, seed,
                    bn_reset, repair) -> list[float] | None:
    """The plain arguments of :func:`ccamerge.api.merge`, checked; returns the weights as
    floats (None: equal weights)."""
    models(values)
    method_name(method)
    integer("reference", reference, 0, len(values) - 1)
    sampling(stats_samples, seed, batch_size)
    flag("bn_reset", bn_reset)
    flag("repair", repair)
    return merge_weights(weights, len(values))
