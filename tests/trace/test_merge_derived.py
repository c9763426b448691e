"""Models outside the built-in families merged end to end (CCA, permutation, weight matching)
through their derived specs."""

from __future__ import annotations

import pytest
import torch
from traced_nets import (
    SUPPORTED,
    TOL,
    WITH_UNSUPPORTED,
    DenseNet,
    Inception,
    make,
    max_diff,
    merge,
    permuted_copy,
)

from ccamerge.trace.derive import (
    derive_and_verify,
    derive_spec,
    has_offsets,
)


@pytest.mark.parametrize("cls", SUPPORTED + WITH_UNSUPPORTED)
def test_merge_end_to_end(cls, x):
    model = make(cls)
    spec = derive_and_verify(model, x[:32]).spec
    twin = permuted_copy(model, spec)
    assert max_diff(model, twin, x) < TOL  # the spec is a symmetry of the network
    assert max_diff(merge([model, twin], spec, x, "permute"), model, x) < TOL
    assert max_diff(merge([model, make(cls)], spec, x, "cca", gamma=0.1, relative=True),
                    model, x) < TOL
    other = make(cls, seed=1)
    for method, options in (("cca", {"gamma": 0.1, "relative": True}), ("permute", {})):
        merged = merge([model, other], spec, x, method, bn_reset=True, **options)
        with torch.no_grad():
            out = merged(x)
        assert out.shape == (len(x), 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("cls", SUPPORTED)
def test_weight_matching_on_derived_spec(cls, x):
    """Data-free weight matching undoes a permutation, concatenation offsets included."""
    model = make(cls)
    spec = derive_spec(model, x[:8]).spec
    assert has_offsets(spec) == (cls in (Inception, DenseNet))
    merged = merge([model, permuted_copy(model, spec)], spec, x, "weight_matching")
    assert max_diff(merged, model, x) < TOL
