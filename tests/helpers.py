"""Helpers shared by tests (import with ``from helpers import ...``)."""

from __future__ import annotations

import torch

from ccamerge.spec import build_spec
from ccamerge.transform import apply_transforms, random_permutations, with_state


def permuted_twin(model, seed=1):
    """A copy of ``model`` with every merge point's units randomly permuted (same function)."""
    spec = build_spec(model)
    twin = with_state(model, apply_transforms(model.state_dict(), spec, random_permutations(spec, seed)))
    twin.info = dict(getattr(model, "info", {}))
    return twin


def max_output_diff(a, b, x) -> float:
    with torch.no_grad():
        return float((a.eval()(x) - b.eval()(x)).abs().max())
