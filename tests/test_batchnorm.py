import copy

import numpy as np
import pytest
import torch
from helpers import max_output_diff, permuted_twin

from ccamerge.api import merge, resolve_spec, subsample
from ccamerge.batchnorm import (
    batchnorm_eps,
    carried_moments,
    conv_bn_pairs,
    fold_state,
    moment_batchnorms,
    output_moments,
)
from ccamerge.errors import CcamergeError
from ccamerge.models import build_model
from ccamerge.repair import unit_moments
from ccamerge.spec import build_spec
from ccamerge.stats import collect_statistics
from ccamerge.transform import with_state


def test_pairs_cover_every_conv_batchnorm_of_a_resnet():
    pairs = conv_bn_pairs(build_model("resnet20", width=0.5, blocks=2))
    assert ("conv", "bn") in pairs
    assert ("stages.1.0.shortcut.0", "stages.1.0.shortcut.1") in pairs
    assert ("stages.2.1.conv2", "stages.2.1.bn2") in pairs
    assert len(pairs) == 1 + 3 * 2 * 2 + 2


def test_folding_keeps_the_function(vgg_bn, digits):
    model = vgg_bn[0]
    folded = with_state(model, fold_state(model.state_dict(), conv_bn_pairs(model)))
    assert max_output_diff(model, folded, digits.x_test) < 1e-4
    bn = dict(folded.named_modules())[conv_bn_pairs(model)[0][1]]
    assert torch.all(bn.weight == 1) and torch.all(bn.running_mean == 0)


def test_folding_uses_each_batchnorms_own_epsilon(vgg_bn, digits):
    model = copy.deepcopy(vgg_bn[0])  # the fixture is shared by the session: leave it as it is
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eps = 0.5  # far from torch's 1e-5: a fold that ignores it changes the function
    pairs = conv_bn_pairs(model)
    eps = batchnorm_eps(model, [bn for _conv, bn in pairs])
    assert set(eps.values()) == {0.5}
    folded = with_state(model, fold_state(model.state_dict(), pairs, eps))
    assert max_output_diff(model, folded, digits.x_test) < 1e-4
    wrong = with_state(model, fold_state(model.state_dict(), pairs))
    assert max_output_diff(model, wrong, digits.x_test) > 1e-2


def test_a_model_with_another_epsilon_merges_with_itself_under_the_mapped_policy(resnets, digits):
    model = copy.deepcopy(resnets[0])
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eps = 1e-3
    merged = merge([model, model], digits.x_train[:300], "cca", bn_policy="mapped",
                   bn_reset=False, batch_size=300).model
    assert max_output_diff(merged, model, digits.x_test[:200]) < 1e-4


@pytest.mark.parametrize("bn_reset", [True, False])
def test_a_permuted_twin_merges_back_to_the_model_under_the_mapped_policy(resnets, digits,
                                                                           bn_reset):
    model, x = resnets[0], digits.x_train[:300]
    merged = merge([model, permuted_twin(model, seed=2)], x, "permute", bn_policy="mapped",
                   bn_reset=bn_reset, batch_size=300).model  # one batch: data moments exactly
    assert max_output_diff(merged, model, digits.x_test[:200]) < 1e-3
    assert merged.info["merge"]["bn_policy"] == "mapped"


def _bn_outputs(model, bns, x) -> dict[str, np.ndarray]:
    """Each BatchNorm's eval output on ``x`` as samples ``[B*H*W, C]`` (float64)."""
    modules, seen = dict(model.named_modules()), {}
    hooks = [modules[bn].register_forward_hook(
        lambda _m, _i, out, bn=bn: seen.__setitem__(bn, out.movedim(1, -1).reshape(
            -1, out.shape[1]).double().numpy())) for bn in bns]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return seen


def test_the_statistics_pass_gives_numpys_moments_of_the_batchnorm_outputs(resnets, digits):
    x, bns = digits.x_train[:200], ["bn", "stages.1.0.bn2"]
    (moments,) = output_moments(resnets[:1], bns, x)
    for bn, samples in _bn_outputs(resnets[0], bns, x).items():
        np.testing.assert_allclose(moments[bn][0], samples.mean(0), atol=1e-5)
        np.testing.assert_allclose(moments[bn][1], np.cov(samples.T), atol=1e-5)


def test_the_statistics_pass_carries_the_moments_a_pass_of_their_own_measures(
        pinned_layout, resnets, digits):
    """``self_only`` BatchNorms: each model with itself, every position (``positions`` is for
    the merge points only), the same numbers as one pass per model."""
    x, bns = digits.x_train[:150], moment_batchnorms(resnets[0])
    stats = collect_statistics(resnets, build_spec(resnets[0]), x, batch_size=64, positions=3,
                               self_only=bns)
    assert set(stats["block1.1"].covs) == {(0, 0), (1, 1), (0, 1)}
    assert all(set(stats.self_only[bn].covs) == {(0, 0), (1, 1)} for bn in bns)
    carried, separate = carried_moments(stats, bns), output_moments(resnets, bns, x, batch_size=64)
    for mine, theirs in zip(carried, separate, strict=True):
        for bn in bns:
            np.testing.assert_allclose(mine[bn][0], theirs[bn][0], rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(mine[bn][1], theirs[bn][1], rtol=1e-12, atol=1e-12)
    assert stats.self_only[bns[0]].count == 150 * 8 * 8  # every position of every image
    assert carried_moments(collect_statistics(resnets, build_spec(resnets[0]), x), bns) is None


def _same_weights(a: torch.nn.Module, b: torch.nn.Module, rtol: float = 1e-6) -> None:
    for key, value in a.state_dict().items():
        other = b.state_dict()[key]
        scale = max(float(other.abs().max()), 1e-30) if other.is_floating_point() else 1.0
        torch.testing.assert_close(value, other, rtol=0, atol=rtol * scale, msg=key)


@pytest.mark.parametrize("method", ["cca", "permute"])
def test_a_mapped_merge_with_the_moments_of_the_statistics_pass_equals_the_separate_pass(
        pinned_layout, resnets, digits, method):
    """The old path (statistics without the moments: one more pass per model over the same
    sample) and the new one build the same merged model."""
    x = digits.x_train[:400]
    together = merge(resnets, x, method, stats_samples=250, seed=3, batch_size=100)
    spec = resolve_spec(resnets, x)
    plain = collect_statistics(resnets, spec, subsample(x, 250, 3), batch_size=100,
                               pairs="all")
    separate = merge(resnets, x, method, stats_samples=250, seed=3, batch_size=100,
                     statistics=plain)
    assert set(together.statistics.self_only) == set(moment_batchnorms(resnets[0]))
    _same_weights(together.model, separate.model)


def _counted_rows(models, **merge_options) -> dict[str, int]:
    """Input rows the ``models`` (and the merged model, a copy of the reference) ran in eval
    and in train mode during one merge."""
    rows = {"eval": 0, "train": 0}

    def hook(module, inputs, _out):
        rows["train" if module.training else "eval"] += inputs[0].shape[0]

    handles = [m.register_forward_hook(hook) for m in models]
    try:
        merge(models, **merge_options)
    finally:
        for handle in handles:
            handle.remove()
    return rows


def _random_resnets(n: int) -> list[torch.nn.Module]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(build_model("resnet20", image_shape=[3, 32, 32], width=0.25).eval())
    return out


def test_a_mapped_merge_runs_the_forwards_of_the_paper_policy_and_no_pass_per_model(
        pinned_layout):
    """N statistics forwards over the sample + one train-mode pass, as under "paper". Statistics
    given without the moments cost one eval pass per model for them; given with them, none.
    (Pinned: an automatic layout choice adds one timed batch of model 0, once.)"""
    models, x = _random_resnets(3), torch.randn(90, 3, 32, 32)
    common = dict(data=x, method="cca", batch_size=40)
    paper = _counted_rows(models, bn_policy="paper", **common)
    mapped = _counted_rows(models, bn_policy="mapped", **common)
    assert paper == mapped == {"eval": 3 * 90, "train": 90}
    spec = resolve_spec(models, x)
    plain = collect_statistics(models, spec, x, batch_size=40)
    assert _counted_rows(models, statistics=plain, **common) == {"eval": 3 * 90, "train": 90}
    carrying = collect_statistics(models, spec, x, batch_size=40,
                                  self_only=moment_batchnorms(models[0]))
    assert _counted_rows(models, statistics=carrying, **common) == {"eval": 0, "train": 90}


def test_under_a_dense_map_merged_units_take_the_mapped_moments(resnets, digits):
    """Oracle: numpy moments of each original model's BatchNorm outputs mapped by its T."""
    x = digits.x_train[:300]
    result = merge(resnets, x, "cca", bn_policy="mapped", batch_size=300)
    bns = [bn for _conv, bn in conv_bn_pairs(resnets[0])]
    owner = {a.param: p.name for p in result.spec.points for a in p.producers}
    outputs = [_bn_outputs(m, bns, x) for m in resnets]
    merged = unit_moments(result.model, bns, x, batch_size=300)
    dense = 0
    for bn in bns:
        maps = [t[owner[f"{bn}.bias"]].T if owner[f"{bn}.bias"] in t else np.eye(
            outputs[0][bn].shape[1]) for t in result.alignment.transforms]
        mapped = [out[bn] @ T for out, T in zip(outputs, maps, strict=True)]  # [S, C] each
        mean = np.mean([m.mean(0) for m in mapped], axis=0)
        std = np.mean([m.std(0, ddof=1) for m in mapped], axis=0)
        np.testing.assert_allclose(merged[bn][0].numpy(), mean, atol=2e-3 * std.max())
        np.testing.assert_allclose(merged[bn][1].numpy(), std, rtol=2e-3, atol=1e-6)
        dense += int(np.count_nonzero(maps[1]) > len(maps[1]))
    assert dense == len(bns)  # CCA's maps are dense at every BatchNorm


def test_a_dense_map_moves_the_scale_away_from_the_transformed_scale_vector(resnets, digits):
    """Why "paper" is wrong under CCA: T^T g is not the mapped features' scale (size, sign)."""
    x = digits.x_train[:300]
    result = merge(resnets, x, "cca", bn_reset=False)
    T = result.alignment.transforms[1]["block1.1"].T
    (moments,) = output_moments(resnets[1:], ["stages.0.0.bn1"], x)
    scale = np.sqrt(np.einsum("kj,kl,lj->j", T, moments["stages.0.0.bn1"][1], T))
    g = dict(resnets[1].named_modules())["stages.0.0.bn1"].weight.detach().double().numpy()
    assert np.max(np.abs(np.abs(T.T @ g) - scale) / scale) > 0.1


def test_fold_is_retired_with_a_pointer_to_mapped(vgg_bn, digits):
    with pytest.raises(CcamergeError, match="replaced by 'mapped'"):
        merge(vgg_bn, digits.x_train[:100], "permute", bn_policy="fold")


def test_unknown_policy_is_refused(vgg_bn, digits):
    with pytest.raises(CcamergeError, match="bn_policy"):
        merge(vgg_bn, digits.x_train[:100], "permute", bn_policy="magic")
