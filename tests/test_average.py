"""The entry-at-a-time average of aligned models, and the aligned state dicts built from the same
entries: bit for bit what whole-state folds and maps build and their average (BatchNorm folded or
not, dense and permutation maps, unequal weights, models of different widths); at most two
aligned tensors alive while the average runs."""

from __future__ import annotations

import weakref

import pytest
import torch
from test_mixed_widths import duplicated

from ccamerge import api, average
from ccamerge.average import average_aligned_state, own_spec
from ccamerge.batchnorm import (
    batchnorm_eps,
    fold_state,
    folded_pairs,
    widen_static_vectors,
    without_static_vectors,
)
from ccamerge.transform import apply_transforms, average_states


def held_states(models, aligned, folded):
    """Every aligned state dict as whole-state operations build it: fold, map, constants."""
    bns = [bn for _conv, bn in folded]
    spec = without_static_vectors(aligned.spec, bns)
    eps = batchnorm_eps(models[0], bns)
    return [widen_static_vectors(apply_transforms(fold_state(m.state_dict(), folded, eps),
                                                  own_spec(spec, t), t), bns, eps)
            for m, t in zip(models, aligned.alignment.transforms, strict=True)]


def held_average(models, aligned, weights, folded):
    return average_states(held_states(models, aligned, folded), weights)


def assert_same_state(a, b):
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("policy", ["mapped", "paper"])
@pytest.mark.parametrize("method", ["cca", "permute"])
def test_streamed_average_equals_the_held_average_with_batchnorm(vgg_bn, digits, policy, method):
    models = [vgg_bn[0], vgg_bn[1], vgg_bn[1]]
    aligned = api.align(models, digits.x_train[:400], method)
    weights = [0.5, 0.3, 0.2]
    folded = folded_pairs(models[0], policy)
    assert folded or policy == "paper"
    streamed = average_aligned_state(models, aligned.alignment, aligned.spec, weights, folded)
    assert_same_state(streamed, held_average(models, aligned, weights, folded))
    for built, held in zip(api.aligned_states(models, aligned, folded),
                           held_states(models, aligned, folded), strict=True):
        assert_same_state(built, held)


def test_streamed_average_equals_the_held_average_across_widths(mlps, digits):
    models = [mlps[0], duplicated(mlps[1])]  # the wide model's maps are rectangular
    aligned = api.align(models, digits.x_train[:600], "cca")
    streamed = average_aligned_state(models, aligned.alignment, aligned.spec, [0.5, 0.5])
    assert_same_state(streamed, held_average(models, aligned, [0.5, 0.5], ()))
    assert_same_state(api.aligned_states(models, aligned)[1], held_states(models, aligned, ())[1])
    assert all(streamed[k].shape == v.shape for k, v in mlps[0].state_dict().items())


def test_merging_a_model_with_itself_returns_it(vgg_bn, digits):
    model = vgg_bn[0]
    merged = api.merge([model, model], digits.x_train[:400], "cca", bn_reset=False).model
    out, ref = merged.state_dict(), model.state_dict()
    folded = {k for pair in folded_pairs(model, "mapped") for k in
              (f"{pair[0]}.weight", f"{pair[1]}.weight", f"{pair[1]}.bias",
               f"{pair[1]}.running_mean", f"{pair[1]}.running_var")}
    for key in ref:
        if key not in folded:  # folded BatchNorms change form, not function
            torch.testing.assert_close(out[key], ref[key], atol=1e-5, rtol=1e-5)
    x = digits.x_test[:64]
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(x), model.eval()(x), atol=1e-4, rtol=1e-4)


def test_at_most_one_aligned_tensor_is_alive(vgg_bn, digits, monkeypatch):
    models = [vgg_bn[0], vgg_bn[1], vgg_bn[1]]
    aligned = api.align(models, digits.x_train[:400], "cca")
    own = {t.data_ptr() for m in models for t in m.state_dict().values()}
    made: list[weakref.ref] = []
    most_alive = 0
    entry = average.AlignedEntries.entry

    def counting_entry(self, key):
        nonlocal most_alive
        value = entry(self, key)
        if value.data_ptr() not in own:  # a new tensor, not a model's own (identity map)
            made.append(weakref.ref(value))
        most_alive = max(most_alive, sum(r() is not None for r in made))
        return value

    monkeypatch.setattr(average.AlignedEntries, "entry", counting_entry)
    average_aligned_state(models, aligned.alignment, aligned.spec, [1 / 3] * 3,
                          folded_pairs(models[0], "mapped"))
    assert len(made) > 2 * len(models)  # dense maps made new tensors for every model
    assert most_alive <= 2  # the one being summed and the one just made
