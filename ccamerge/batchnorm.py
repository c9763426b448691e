"""BatchNorm under a dense alignment map: the ``mapped`` policy.

The paper's policy (``"paper"``) transforms a BatchNorm's weight, bias and running statistics
with the same ``T^T`` as the conv rows. For a permutation that is exact. For CCA's dense ``T``
it is not: BatchNorm acts per unit, and after the map unit ``j`` of the transformed BatchNorm
outputs ``y T`` has mean ``t_j^T mu`` and variance ``t_j^T Sigma t_j`` (``t_j = T[:, j]``,
``mu`` ``[C]`` and ``Sigma`` ``[C, C]`` the mean and covariance of the BatchNorm outputs ``y``
on data; with ``y = G x_hat + b``, ``Sigma = G C G`` for ``G = diag(scale)`` and ``C`` the
covariance of the normalised pre-BN features). Transforming the scale as a vector gives
``T^T g`` instead, which differs in size and even in sign.

The ``mapped`` policy gives each merged unit the moments of the mapped endpoint features:

1. every BatchNorm that directly follows a conv is folded into it (exact in eval mode):
   ``W <- diag(g / sqrt(rv + eps)) W``, BatchNorm left as ``x + (b - rm g / sqrt(rv + eps))``,
   so the conv (+ shift) outputs *are* the BatchNorm outputs ``y``;
2. only the conv rows and that shift are transformed (``T^T W``, ``T^T b``) and averaged;
3. each folded BatchNorm of the merged model gets scale ``s_j = sum_i w_i sqrt(t_ij^T
   Sigma_i t_ij)`` and shift ``m_j = sum_i w_i t_ij^T mu_i`` (model ``i``'s weight ``w_i``, its
   map ``T_i`` at the merge point the BatchNorm writes, ``mu_i``, ``Sigma_i`` measured on the
   *original* model ``i``, not on an aligned endpoint, whose features below the first layer a
   dense map has already changed); then one train-mode pass recomputes the running statistics
   and the scale is corrected by ``sqrt((rv + eps) / rv)``, so that on that data each merged
   unit's output has mean ``m_j`` and standard deviation ``s_j`` (up to the train-mode pass:
   during it the BatchNorms upstream normalise by batch statistics, before their own scale
   correction, so a deeper BatchNorm's statistics are those of slightly different inputs; on
   the test nets a model merged with its permuted twin differs from it by ~1e-3 in the logits).

The moments ``mu_i``, ``Sigma_i`` come from the statistics pass itself (its ``self_only``
modules, :func:`moment_batchnorms`: the same forwards, every position, no cross-covariances),
so a merge under this policy runs the paper's passes: N statistics forwards and one
train-mode pass. Statistics collected without them (and data-free methods) fall back to one
pass per model (:func:`output_moments`).

For a permutation ``t_ij^T mu_i`` and ``t_ij^T Sigma_i t_ij`` are the matched unit's own mean and
variance, so a permuted twin merges back to the original model. Standard deviations (not
variances) are averaged, as REPAIR does. Without a BatchNorm reset the folded average is kept
as it is (step 3 skipped).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import fx, nn

from ccamerge.distributed import reset_batchnorm_sharded
from ccamerge.errors import CcamergeError
from ccamerge.spec import AlignmentSpec, MergePoint
from ccamerge.stats import Statistics, collect_statistics
from ccamerge.transform import Transforms, has_batchnorm

POLICIES = ("mapped", "paper")
DEFAULT_POLICY = "mapped"  # chosen on held-out data: see
                           # benchmarks/results/default/summary.md, options
LEGACY_POLICY = "paper"  # what a recipe without ``bn_policy`` was made with (the old default)
RETIRED = {"fold": "bn_policy 'fold' took its per-unit targets from the aligned endpoints, which "
                   "a dense map makes wrong below the first layer; it is replaced by 'mapped' "
                   "(targets from the original models' statistics mapped by T)"}
STATIC = ("weight", "running_mean", "running_var")  # identity after folding: never transformed
DEFAULT_EPS = 1e-5  # torch's BatchNorm epsilon, for a state dict without its module
Moments = dict[str, tuple[np.ndarray, np.ndarray]]  # batchnorm -> (mean [C], covariance [C, C])


def check_policy(policy: str) -> None:
    """Refuse an unknown or retired ``bn_policy`` in one line saying what to use."""
    if policy in RETIRED:
        raise CcamergeError(RETIRED[policy])
    if policy not in POLICIES:
        raise CcamergeError(f"bn_policy must be one of {POLICIES}, not {policy!r}")


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv, batchnorm)`` module names where the BatchNorm reads only that conv's output."""
    try:
        graph = model.graph if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model).graph
    except Exception as exc:
        raise CcamergeError(f"cannot trace the model to fold BatchNorm: {exc}") from exc
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        source = node.args[0]
        if (isinstance(source, fx.Node) and source.op == "call_module"
                and isinstance(modules.get(source.target), nn.Conv2d) and len(source.users) == 1):
            pairs.append((source.target, node.target))
    return pairs


def fold_state(state: dict[str, torch.Tensor], pairs: Sequence[tuple[str, str]],
               eps: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """A state dict with each paired BatchNorm folded into its conv (same function in eval).
    ``eps``: each BatchNorm's own epsilon by name (:func:`batchnorm_eps`; missing: 1e-5, torch's
    default)."""
    out = dict(state)
    for conv, bn in pairs:
        out[f"{conv}.weight"] = folded_weight(state, conv, bn, eps)
        out[f"{bn}.bias"] = folded_shift(state, bn, eps)
    return widen_static_vectors(out, [bn for _conv, bn in pairs], eps)


def _fold_scale(state: Mapping[str, torch.Tensor], bn: str,
                eps: Mapping[str, float] | None) -> torch.Tensor:
    """``g / sqrt(rv + eps)`` ``[C]`` of BatchNorm ``bn``."""
    return state[f"{bn}.weight"] / torch.sqrt(state[f"{bn}.running_var"] + _eps(eps, bn))


def folded_weight(state: Mapping[str, torch.Tensor], conv: str, bn: str,
                  eps: Mapping[str, float] | None = None) -> torch.Tensor:
    """``conv``'s weight ``[C, ...]`` with BatchNorm ``bn``'s scale folded into its rows."""
    return state[f"{conv}.weight"] * _fold_scale(state, bn, eps).view(-1, 1, 1, 1)


def folded_shift(state: Mapping[str, torch.Tensor], bn: str,
                 eps: Mapping[str, float] | None = None) -> torch.Tensor:
    """The shift ``b - rm g / sqrt(rv + eps)`` ``[C]`` a folded BatchNorm ``bn`` keeps."""
    return state[f"{bn}.bias"] - state[f"{bn}.running_mean"] * _fold_scale(state, bn, eps)


def widen_static_vectors(state: dict[str, torch.Tensor], bns: Sequence[str],
                         eps: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """``state`` with each folded BatchNorm's constant vectors (scale 1, running mean 0,
    running variance ``1 - eps``, its own ``eps`` as in :func:`fold_state`) at the width of its
    transformed shift ``[C']``: they are never transformed, and a map between models of
    different widths changes ``C``."""
    out = dict(state)
    for bn in bns:
        for kind in STATIC:
            out[f"{bn}.{kind}"] = static_vector(kind, state[f"{bn}.bias"], _eps(eps, bn))
    return out


def static_vector(kind: str, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """A folded BatchNorm's constant ``kind`` (one of :data:`STATIC`) at the size of its
    ``shift`` ``[C]``: scale 1, running mean 0, running variance ``1 - eps``."""
    if kind == "weight":
        return torch.ones_like(shift)
    if kind == "running_mean":
        return torch.zeros_like(shift)
    return torch.full_like(shift, 1.0 - eps)


def batchnorm_eps(model: nn.Module, bns: Sequence[str]) -> dict[str, float]:
    """``{name: eps}`` of the BatchNorms ``bns`` of ``model``."""
    return {bn: float(model.get_submodule(bn).eps) for bn in bns}


def _eps(eps: Mapping[str, float] | None, bn: str) -> float:
    return (eps or {}).get(bn, DEFAULT_EPS)


def without_static_vectors(spec: AlignmentSpec, bns: Sequence[str]) -> AlignmentSpec:
    """``spec`` minus the folded BatchNorms' scale and running statistics as producers."""
    static = {f"{bn}.{v}" for bn in bns for v in STATIC}
    return AlignmentSpec(tuple(
        MergePoint(p.name, p.width, p.features,
                   tuple(a for a in p.producers if a.param not in static),
                   p.consumers) for p in spec.points))


def written_points(spec: AlignmentSpec, bns: Sequence[str]) -> dict[str, str | None]:
    """``{batchnorm: name of the merge point its shift produces}`` (None: no point, the
    BatchNorm's units are not mapped)."""
    owner = {a.param: p.name for p in spec.points for a in p.producers}
    return {bn: owner.get(f"{bn}.bias") for bn in bns}


def folded_pairs(model: nn.Module, policy: str) -> list[tuple[str, str]]:
    """The ``(conv, batchnorm)`` pairs ``policy`` folds: :func:`conv_bn_pairs` under "mapped",
    none under "paper" or without BatchNorm."""
    return conv_bn_pairs(model) if policy == "mapped" and has_batchnorm(model) else []


def moment_batchnorms(model: nn.Module, policy: str = DEFAULT_POLICY, *,
                      bn_reset: bool = True) -> list[str]:
    """The BatchNorms whose output moments ``policy``'s reset needs: the folded ones
    (:func:`folded_pairs`), none without a reset. Pass them as ``self_only`` to
    :func:`ccamerge.stats.collect_statistics` to measure them in the statistics pass."""
    return [bn for _conv, bn in folded_pairs(model, policy)] if bn_reset else []


def carried_moments(stats: Statistics | None, bns: Sequence[str]) -> list[Moments] | None:
    """Per model, each of ``bns``' output (mean ``[C_i]``, covariance ``[C_i, C_i]``) from
    statistics collected with them as ``self_only`` (same numbers as :func:`output_moments`
    on the statistics' inputs); None when ``stats`` does not carry all of them."""
    if stats is None or any(bn not in stats.self_only for bn in bns):
        return None
    return [{bn: (stats.self_only[bn].mean[i], stats.self_only[bn].cov(i, i)) for bn in bns}
            for i in range(stats.num_models)]


def output_moments(models: Sequence[nn.Module], bns: Sequence[str], x, *,
                   batch_size: int = 256, group=None) -> list[Moments]:
    """Per model, each named BatchNorm's output mean ``[C]`` and covariance ``[C, C]`` (float64)
    over the inputs ``x`` (a tensor ``[B, ...]`` or a data source), eval mode, one streamed
    pass per model (shared by the ranks of ``group``). Models may differ in width (each
    BatchNorm's ``C`` is its own model's). A merge collects them in its statistics pass
    instead (:func:`moment_batchnorms`, :func:`carried_moments`); this pass is for statistics
    collected without them and for data-free methods."""
    out = []
    for model in models:
        modules = dict(model.named_modules())
        spec = AlignmentSpec(tuple(MergePoint(bn, modules[bn].num_features, (bn,), (), ())
                                   for bn in bns))
        stats = collect_statistics([model], spec, x, batch_size=batch_size, group=group)
        out.append({bn: (stats[bn].mean[0], stats[bn].cov(0, 0)) for bn in bns})
    return out


def mapped_targets(moments: Sequence[Moments], transforms: Sequence[Transforms],
                   points: dict[str, str | None], weights: Sequence[float]
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{batchnorm: (mean [C], std [C])}``: ``sum_i w_i T_i^T mu_i`` and ``sum_i w_i
    sqrt(diag(T_i^T Sigma_i T_i))``, with ``T_i`` model i's map at the point the BatchNorm
    writes (identity where it has none; per block of ``repeat`` entries for a BatchNorm with
    several entries per unit, e.g. after a depthwise conv with a channel multiplier)."""
    targets = {}
    for bn, point in points.items():
        mean, std = 0.0, 0.0
        for w, stats, maps in zip(weights, moments, transforms, strict=True):
            mu, sigma = stats[bn]
            T = block_map(maps[point].T, len(mu)) if point in maps else np.eye(len(mu))
            mean = mean + w * (T.T @ mu)
            std = std + w * np.sqrt(np.clip(np.einsum("kj,kl,lj->j", T, sigma, T), 0.0, None))
        targets[bn] = (mean, std)
    return targets


def block_map(T: np.ndarray, entries: int) -> np.ndarray:
    """``T`` ``[n, m]`` acting on ``entries`` channel-major entries, ``entries / n`` per unit:
    ``kron(T, I_repeat)`` ``[n * repeat, m * repeat]`` (``T`` itself for one entry per unit)."""
    repeat = entries // T.shape[0]
    return T if repeat == 1 else np.kron(T, np.eye(repeat))


@torch.no_grad()
def set_moments(merged: nn.Module, targets: dict[str, tuple[np.ndarray, np.ndarray]], x, *,
                batch_size: int = 256, group=None) -> None:
    """Give each target BatchNorm of ``merged`` (folded: it normalises its input) shift
    ``mean`` and scale ``std``, recompute every BatchNorm's running statistics on ``x`` in one
    train-mode pass, and correct the targets' scales by ``sqrt((rv + eps) / rv)``, so their
    eval outputs have mean ``mean`` and std ``std`` on ``x`` ([C] each)."""
    modules = dict(merged.named_modules())
    for bn, (mean, std) in targets.items():
        modules[bn].bias.copy_(torch.from_numpy(mean))
        modules[bn].weight.copy_(torch.from_numpy(std))
    reset_batchnorm_sharded(merged, x, batch_size=batch_size, group=group)
    for bn in targets:
        norm = modules[bn]
        var = norm.running_var.double()
        ratio = torch.where(var > 0, (var + norm.eps) / var.clamp_min(1e-300), 1.0).sqrt()
        norm.weight.copy_(norm.weight.double() * ratio)
