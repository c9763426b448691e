"""Activation statistics at merge points: streaming float64 moments that merge exactly.

Features are read by forward hooks (:func:`capture_features`, a context manager). A conv map
``[B, C, H, W]`` gives ``B*H*W`` samples of ``C`` features; a linear activation ``[B, C]`` gives
``B`` samples. Each batch is centred and multiplied in the model's float32, then merged into float64
accumulators with Chan's update, so results do not depend on the batch size and two shards combine
exactly (:meth:`CrossMoments.merge`). :func:`collect_statistics` is the hot path of every
activation-based merge: image batches run in the faster memory layout, chosen once per process
(:mod:`ccamerge.layout`; channels-last feature maps read as ``[S, C]`` without a copy), self
blocks are multiplied as symmetric products and centring uses one reused workspace
(:mod:`ccamerge.moments`; see ``benchmarks/cost.py --paper``).

The passes and the float64 accumulators stay on the models' device (or ``device=``), with TF32
off (:func:`ccamerge.devices.exact_float32`); only the finished covariances come to the host, as
numpy float64 for the solves. With a torch.distributed ``group`` every rank reads its block of
batches and the moments are all-reduced exactly (:mod:`ccamerge.distributed`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ccamerge.allocator import for_a_pass
from ccamerge.data import DataSource, as_source
from ccamerge.devices import (
    exact_float32,
    model_to,
    models_to,
    module_device,
    work_device,
)
from ccamerge.distributed import all_reduce_moments, batch_block, rank_and_size, shard_source
from ccamerge.errors import CcamergeError
from ccamerge.layout import choose_layout, in_layout, long_pass, weights_in
from ccamerge.models import ARCHITECTURES
from ccamerge.moments import (  # noqa: F401 - UNCENTRED_LIMIT, _add_chunk re-exported
    MAP_MIN_POSITIONS,
    UNCENTRED_LIMIT,
    ChannelMaps,
    Samples,
    UnitRows,
    _add_chunk,
    _Workspace,
    onednn_nt,
)
from ccamerge.positions import PositionSampler
from ccamerge.spec import AlignmentSpec, MergePoint, model_widths

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

MIN_SAMPLES_PER_FEATURE = 10.0  # fewer samples per feature and covariances are unreliable


def centred(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean [p], x - mean [S, p])`` of samples ``x`` ``[S, p]``."""
    mean = x.mean(0)
    return mean, x - mean


class CrossMoments:
    """Running count, means and co-moment ``sum (x - mx)^T (y - my)`` of paired samples, as
    float64 tensors on ``device`` (the device of the samples; the CPU by default)."""

    def __init__(self, p: int, q: int, device: torch.device | str | None = None):
        self.count = 0
        self.mean_x = torch.zeros(p, dtype=torch.float64, device=device)  # [p]
        self.mean_y = torch.zeros(q, dtype=torch.float64, device=device)  # [q]
        self.comoment = torch.zeros(p, q, dtype=torch.float64, device=device)  # [p, q]

    def update(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Add samples ``x`` ``[S, p]`` paired with ``y`` ``[S, q]`` (``y=None``: ``y = x``)."""
        cx = centred(x)
        self.add_centred(cx, cx if y is None else centred(y))

    def add_centred(self, cx: tuple[torch.Tensor, torch.Tensor],
                    cy: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Add a batch given as ``(mean [p], centred samples [S, p])`` pairs (see :func:`centred`);
        the product runs in the samples' dtype, the accumulation in float64."""
        self.add_batch(cx[1].shape[0], cx[0], cy[0], cx[1].T @ cy[1])

    def add_batch(self, count: int, mean_x: torch.Tensor, mean_y: torch.Tensor,
                  comoment: torch.Tensor) -> None:
        """Fold in ``count`` disjoint samples given by their means ``[p]``, ``[q]`` and their
        co-moment about them ``[p, q]`` (any float dtype, on this device) with Chan's update,
        in float64."""
        if count == 0:
            return
        n = self.count + count
        dx = mean_x.to(torch.float64) - self.mean_x  # [p]
        dy = mean_y.to(torch.float64) - self.mean_y  # [q]
        self.comoment.add_(comoment).addr_(dx, dy, alpha=self.count * count / n)
        self.mean_x.add_(dx, alpha=count / n)
        self.mean_y.add_(dy, alpha=count / n)
        self.count = n

    def add_products(self, count: int, sum_x: torch.Tensor, sum_y: torch.Tensor,
                     product: torch.Tensor, shift_x: torch.Tensor | None = None,
                     shift_y: torch.Tensor | None = None) -> None:
        """Fold in ``count`` samples given as shifted samples ``A = X - shift_x`` ``[S, p]``,
        ``B = Y - shift_y`` ``[S, q]`` (no shift: None) through their float64 column sums
        ``[p]``, ``[q]`` and product ``A^T B`` ``[p, q]`` (float32 is fine): their co-moment
        about their means is ``A^T B - s_a s_b^T / S``, added with Chan's correction in place
        (one pass over the float64 co-moment, no temporary)."""
        if count == 0:
            return
        mean_x = sum_x / count if shift_x is None else sum_x / count + shift_x.to(torch.float64)
        mean_y = sum_y / count if shift_y is None else sum_y / count + shift_y.to(torch.float64)
        n = self.count + count
        dx, dy = mean_x - self.mean_x, mean_y - self.mean_y  # [p], [q]
        self.comoment.add_(product).addr_(sum_x, sum_y, alpha=-1 / count)
        self.comoment.addr_(dx, dy, alpha=self.count * count / n)
        self.mean_x.add_(dx, alpha=count / n)
        self.mean_y.add_(dy, alpha=count / n)
        self.count = n

    def merge(self, other: CrossMoments) -> None:
        """Fold in the moments of another disjoint set of samples (Chan et al.)."""
        self.add_batch(other.count, other.mean_x, other.mean_y, other.comoment)

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased covariance ``[p, q]``, numpy float64 (for the solves)."""
        if self.count < 2:
            raise CcamergeError("need at least 2 samples to estimate a covariance")
        return (self.comoment / (self.count - 1)).cpu().numpy()


@dataclass
class PointStatistics:
    """Moments of one merge point for N models: ``mean[i]`` ``[n_i]``, ``cov(i, j)``
    ``[n_i, n_j]``. ``width``: the spec's width ``n``; ``widths``: each model's ``n_i`` (all
    ``n`` unless the models' widths differ)."""

    name: str
    width: int
    count: int
    mean: list[np.ndarray]
    covs: dict[tuple[int, int], np.ndarray] = field(repr=False)
    widths: list[int] | None = None

    def __post_init__(self):
        if self.widths is None:
            self.widths = [self.width] * len(self.mean)

    @property
    def mixed(self) -> bool:
        """Whether the models' widths differ at this point."""
        return len(set(self.widths)) > 1

    def cov(self, i: int, j: int) -> np.ndarray:
        if (i, j) in self.covs:
            return self.covs[(i, j)]
        if (j, i) in self.covs:
            return self.covs[(j, i)].T
        raise CcamergeError(f"covariance block ({i}, {j}) of {self.name} was not collected; "
                            "collect statistics with pairs='all'")

    def std(self, i: int) -> np.ndarray:
        return np.sqrt(np.clip(np.diag(self.cov(i, i)), 0.0, None))

    def corr(self, i: int, j: int) -> np.ndarray:
        """Pearson correlation ``[n_i, n_j]`` between units of models i (rows) and j; dead units
        give 0."""
        outer = np.outer(self.std(i), self.std(j))
        with np.errstate(divide="ignore", invalid="ignore"):
            c = np.where(outer > 0, self.cov(i, j) / np.where(outer > 0, outer, 1.0), 0.0)
        return np.clip(c, -1.0, 1.0)

    def second_moment(self, i: int, j: int) -> np.ndarray:
        """Uncentred ``E[x_i x_j^T]`` ``[n_i, n_j]`` (for Euclidean distances between units)."""
        return self.cov(i, j) * (self.count - 1) / self.count + np.outer(self.mean[i], self.mean[j])

    def dead_units(self, i: int, rel_tol: float = 1e-9) -> np.ndarray:
        """Indices of units whose variance is (numerically) zero, e.g. ReLUs that never fire."""
        var = np.diag(self.cov(i, i))
        return np.flatnonzero(var <= rel_tol * max(float(var.max()), 1e-30))


@dataclass
class Statistics:
    """Per merge point statistics of N models; ``reference`` is the model others are paired with."""

    points: dict[str, PointStatistics]
    num_models: int
    reference: int
    pairs: str
    device: str = "cpu"  # where the forward passes and accumulators ran (rank 0's, if several)
    world_size: int = 1  # processes that shared the data (torch.distributed)
    samples_per_rank: list[int] = field(default_factory=list)  # input rows each process read
    positions: int | float | None = None  # per conv map and image: all (None), k, or a fraction
    layout: str = "n/a"  # memory layout the image batches ran in (rank 0's): ccamerge.layout
    products: str = "float32"  # precision of the per-batch products: ccamerge.moments.PRODUCTS
    # torch threads the pass ran with (rank 0's): oneDNN's products round by the thread count
    threads: int = 1
    # module -> its outputs' moments, each model with itself only (``cov(i, i)``), every position
    self_only: dict[str, PointStatistics] = field(default_factory=dict)

    def __getitem__(self, name: str) -> PointStatistics:
        return self.points[name]

    def summary(self) -> dict:
        """JSON-able per point: width, samples, samples per feature (of the widest model), dead
        units per model, and each model's width when they differ."""
        return {name: {"width": p.width, "samples": p.count,
                       "samples_per_feature": p.count / max(p.widths),
                       "dead_units": [len(p.dead_units(i)) for i in range(self.num_models)]}
                | ({"widths": list(p.widths)} if p.mixed else {})
                for name, p in self.points.items()}

    def collection(self) -> dict:
        """JSON-able: ``device``, ``world_size``, ``samples_per_rank`` (inputs, not feature-map
        positions), their sum ``samples``, the ``layout`` of the image batches, the precision
        of their ``products`` and the torch ``threads`` of the pass (the last bits of oneDNN's
        products depend on the layout and the thread count)."""
        return {"device": self.device, "world_size": self.world_size,
                "samples_per_rank": list(self.samples_per_rank),
                "samples": sum(self.samples_per_rank), "layout": self.layout,
                "products": self.products, "threads": self.threads}


def _as_samples(out: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` -> ``[B, C]``; ``[B, C, H, W]`` -> ``[B*H*W, C]`` (a view in channels-last)."""
    if out.dim() == 2:
        return out
    return out.movedim(1, -1).reshape(-1, out.shape[1])


Select = Callable[[tuple[str, int], torch.Tensor], torch.Tensor]


class MapBuffers:
    """Reused memory for standard-layout feature maps ``[B, C, H, W]`` copied to channels-last,
    whose samples ``[B*H*W, C]`` are then a view, or with ``unit_rows`` (float32 products where
    oneDNN is there) to unit rows ``[C, B*H*W]`` (:class:`~ccamerge.moments.UnitRows`): one
    buffer per feature module and call, kept from batch to batch (a fresh map-sized allocation
    per batch costs page faults on the order of the copy). Only for captures that are consumed
    before the next batch (the statistics pass).

    Outputs read without a copy (channels-last maps, :class:`~ccamerge.moments.ChannelMaps`,
    linear features) are watched: a later in-place op of the forward (``ReLU(inplace=True)``
    after a captured BatchNorm) would change them before the fold. :meth:`overwritten` finds
    those (torch's version counters) and such modules' outputs are copied from then on."""

    def __init__(self, unit_rows: bool = False):
        self.unit_rows = unit_rows
        self.flat: dict[tuple, torch.Tensor] = {}
        self.copied: set[tuple] = set()  # keys whose outputs a later in-place op changes
        self._watched: list[tuple[tuple, torch.Tensor, int]] = []

    def samples(self, key: tuple, out: torch.Tensor) -> Samples:
        """The samples ``[S, C]`` of a module's output: a standard-layout map on the CPU as
        unit rows (:meth:`rows`) with ``unit_rows``, else read in place from
        :data:`~ccamerge.moments.MAP_MIN_POSITIONS` positions
        (:class:`~ccamerge.moments.ChannelMaps`); any other map through :meth:`channels_last`
        (a copy for the keys in ``copied``)."""
        if key in self.copied:
            return _as_samples(self.channels_last(key, out, copy=True))
        cpu_map = out.dim() == 4 and out.device.type == "cpu"
        standard = (cpu_map and out.is_contiguous()
                    and not out.is_contiguous(memory_format=torch.channels_last))
        if standard and self.unit_rows:
            return self.rows(key, out)
        if standard and out.shape[2] * out.shape[3] >= MAP_MIN_POSITIONS:
            read = ChannelMaps(out.flatten(2))
        else:
            view = self.channels_last(key, out)
            if view is not out:  # a copy: nothing later changes it
                return _as_samples(view)
            read = _as_samples(view)
        self._watched.append((key, out, out._version))
        return read

    def overwritten(self) -> bool:
        """Whether an output read without a copy since the last call has been changed in place
        since (those keys are copied from now on); forgets the outputs watched so far."""
        changed = {key for key, out, version in self._watched if out._version != version}
        self._watched.clear()
        self.copied |= changed
        return bool(changed)

    def rows(self, key: tuple, out: torch.Tensor) -> UnitRows:
        """The samples of a standard-layout map ``out`` ``[B, C, H, W]`` as unit rows
        ``[C, B*H*W]``, copied (runs of ``H*W``) into the buffer of ``key`` (valid until the
        next call with it)."""
        b, c, h, w = out.shape
        target = self._buffer(key, out).view(c, b, h * w)
        target.copy_(out.flatten(2).transpose(0, 1))
        return UnitRows(target.view(c, b * h * w))

    def _buffer(self, key: tuple, out: torch.Tensor) -> torch.Tensor:
        """A flat buffer of ``out``'s size, dtype and device for ``key``, kept between calls."""
        flat = self.flat.get(key)
        if (flat is None or flat.numel() < out.numel() or flat.dtype != out.dtype
                or flat.device != out.device):
            flat = self.flat[key] = torch.empty(out.numel(), dtype=out.dtype, device=out.device)
        return flat[:out.numel()]

    def channels_last(self, key: tuple, out: torch.Tensor, copy: bool = False) -> torch.Tensor:
        """``out`` ``[B, C, H, W]`` itself when channels-last (``copy``: a copy all the same),
        else a channels-last copy in the buffer of ``key`` (valid until the next call with
        ``key``); outputs that are not ``[B, C, H, W]`` as they are (``copy``: cloned)."""
        if out.dim() != 4:
            return out.clone() if copy else out
        if out.is_contiguous(memory_format=torch.channels_last) and not copy:
            return out
        b, c, h, w = out.shape
        target = self._buffer(key, out).view(b, h, w, c).permute(0, 3, 1, 2)
        return target.copy_(out)


@contextlib.contextmanager
def capture_features(model: nn.Module, spec: AlignmentSpec, select: Select | None = None,
                     buffers: MapBuffers | None = None
                     ) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record each merge point's features while the block runs. Yields ``{point: [samples, ...]}``
    (one ``[S, n]`` entry per feature module per forward; clear it between batches).
    ``select(key, output)``: the samples ``[S, n]`` to keep of a module's output, ``key`` =
    ``(point name, index of the feature module in the point)`` (default: every sample).
    ``buffers``: standard-layout maps are copied into these reused buffers first (the samples
    are then overwritten by a later forward: fold them before it; outputs read in place are
    watched, :class:`MapBuffers`). Without them every capture is a copy of its own, so an
    in-place op after the module cannot change it."""
    modules = dict(model.named_modules())
    captured: dict[str, list[torch.Tensor]] = {p.name: [] for p in spec.points}
    handles = []
    for point in spec.points:
        for k, feature in enumerate(point.features):
            if feature not in modules:
                raise CcamergeError(f"merge point {point.name} reads module {feature!r}, which the "
                                    "model does not have")
            hook = _recorder(captured[point.name], (point.name, k), select, buffers)
            handles.append(modules[feature].register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _recorder(chunks: list, key: tuple[str, int], select: Select | None,
              buffers: MapBuffers | None = None) -> Callable:
    """A forward hook appending the samples of a module's output to ``chunks``."""
    def hook(_module, _inputs, out):
        out = out.detach()
        whole = select is None or (isinstance(select, PositionSampler) and select.keeps_all(out))
        if buffers is not None and whole:
            chunks.append(buffers.samples((*key, len(chunks)), out))
            return
        if buffers is not None:
            out = buffers.channels_last((*key, len(chunks)), out)
        samples = _as_samples(out) if select is None else select(key, out)
        if buffers is None and _shares_memory(samples, out):
            samples = samples.clone()  # a later in-place op (ReLU(inplace=True)) would change it
        chunks.append(samples)
    return hook


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` is a view of ``b``'s memory."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def batch_features(model: nn.Module, spec: AlignmentSpec,
                   xb: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{point: samples [S, n]}`` of one forward pass of ``model`` on the batch ``xb``."""
    with capture_features(model, spec) as captured, torch.no_grad():
        model(xb.to(module_device(model)))
    return {name: chunks[0] if len(chunks) == 1 else torch.cat(chunks)
            for name, chunks in captured.items()}


def _check_finite(acc: dict, spec: AlignmentSpec, num_models: int) -> None:
    """NaN/inf in any activation reaches the running means (cheap to check every batch: one
    host-device synchronisation for all points)."""
    means = [acc[(point.name, i, i)].mean_x for point in spec.points for i in range(num_models)]
    if bool(torch.isfinite(torch.cat(means)).all()):
        return
    for point in spec.points:
        for i in range(num_models):
            if not bool(torch.isfinite(acc[(point.name, i, i)].mean_x).all()):
                raise CcamergeError(f"model {i} produced NaN/inf activations at merge point "
                                    f"{point.name}; check its weights and the input data "
                                    "(nothing was zeroed)")


def _pairs_for(num_models: int, reference: int, pairs: str) -> list[tuple[int, int]]:
    others = [i for i in range(num_models) if i != reference]
    if pairs == "reference":
        return [(reference, i) for i in others]
    if pairs == "all":
        return [(i, j) for i in range(num_models) for j in range(i + 1, num_models)]
    raise CcamergeError(f"pairs must be 'reference' or 'all', not {pairs!r}")


def collect_statistics(models: Sequence[nn.Module], spec: AlignmentSpec, x, *,
                       reference: int = 0, pairs: str = "reference", batch_size: int = 256,
                       progress: Callable[[float], None] | None = None,
                       device: str | torch.device | None = None,
                       group: ProcessGroup | None = None, positions: int | float | None = None,
                       seed: int = 0, self_only: Sequence[str] = (),
                       products: str = "float32") -> Statistics:
    """One pass of all ``models`` over the inputs ``x``: a tensor ``[B, ...]`` or any data source
    (:func:`ccamerge.data.as_source`: a Dataset part, a DataLoader, an iterable of batches),
    streamed ``batch_size`` samples at a time, so memory does not grow with the data.

    Collects, per merge point, every model's mean and covariance and the cross-covariances of
    ``pairs``: ``"reference"`` (reference with each other model) or ``"all"`` (every pair).
    Models run in eval mode as structural copies that share the callers' parameters (the
    callers' modules and mode are untouched); image batches run in the memory layout
    :func:`ccamerge.layout.choose_layout` finds faster (``Statistics.layout``), which for
    ``"channels_last_weights"`` holds the callers' conv weights channels-last during the pass
    and restores their strides after (:func:`ccamerge.layout.weights_in`).

    Models of one family whose widths differ are fine: each model's width at a point is read
    from its own spec for the built-in families (:func:`ccamerge.spec.model_widths`), from the
    channels of its features for traced models (the point names and feature modules are the
    same), so a cross-covariance between models of widths ``n_i``, ``n_j`` is ``[n_i, n_j]``.

    ``positions``: of each conv feature map ``[B, C, H, W]``, the ``H*W`` positions of every
    image (None), ``k`` of them (an int) or a fraction (a float in (0, 1]), chosen at random
    with ``seed``, the same positions in every model (:mod:`ccamerge.positions`).

    ``device``: where the passes (exact float32, no TF32) and the float64 accumulators run:
    ``"auto" | "cpu" | "cuda" | "cuda:N"`` (default: model 0's device). ``group``: a
    torch.distributed process group; this rank then reads only its block of whole batches of
    ``x`` (every rank passes all of ``x``) and the moments are all-reduced exactly, so every
    rank returns the statistics of all of ``x`` (see :mod:`ccamerge.distributed`).

    ``self_only``: names of modules (BatchNorms, convs, linears; present in every model) whose
    outputs are measured in the same pass, each model with itself only (mean ``[C_i]``,
    covariance ``[C_i, C_i]``, no cross-covariances), over every position whatever
    ``positions`` (the mapped BatchNorm policy sets units to these moments and recomputes the
    running statistics on all positions: :mod:`ccamerge.batchnorm`); in ``Statistics.self_only``.

    ``products``: the precision of the per-batch products, ``"float32"`` (exact up to float32
    rounding) or ``"bfloat16"`` (centred bfloat16 products summed in float32: faster where the
    CPU has AMX or AVX512-BF16, covariances to about 1e-3 relative; :mod:`ccamerge.moments`);
    the accumulators are float64 either way. In ``Statistics.products``.
    """
    place = work_device(models, device)
    sampler = PositionSampler(positions, seed)
    probe = as_source(x)
    source, first = _shard(probe, batch_size, group)  # all of x without a group
    blocks = [(i, i) for i in range(len(models))] + _pairs_for(len(models), reference, pairs)
    runners, source = _runners(models, source, place)
    widths = _point_widths(models, runners, spec, probe)
    main = _View.of(spec, widths, blocks, place, products)
    own_widths = module_widths(models, self_only)
    own = _View.of(output_spec(own_widths), own_widths, [(i, i) for i in range(len(models))],
                   place, products)

    def fold(captures: list[dict[str, list[torch.Tensor]]],
             own_captures: list[dict[str, list[torch.Tensor]]]) -> None:
        main.fold(captures)
        own.fold(own_captures)
        _check_finite(main.acc, spec, len(models))

    views = [(spec, sampler), (own.spec, None)]
    seen, layout = _stream(runners, views, source, batch_size, sampler, first, fold, progress,
                           unit_rows=products == "float32" and onednn_nt() is not None)
    samples_per_rank = all_reduce_moments([*main.acc.values(), *own.acc.values()], seen, group)
    stats = _finish(main.acc, spec, widths, len(models), reference, pairs, place,
                    samples_per_rank)
    stats.positions = sampler.positions
    stats.layout = layout
    stats.products = products
    stats.self_only = _points(own.acc, own.spec, own_widths, len(models))
    return stats


@dataclass
class _View:
    """What one set of points of the pass accumulates: ``acc`` ``{(point, i, j): CrossMoments
    [n_i, n_j]}`` for each covariance block ``(i, j)`` of ``blocks``, and its workspace."""

    spec: AlignmentSpec
    blocks: list[tuple[int, int]]
    acc: dict[tuple[str, int, int], CrossMoments]
    workspace: _Workspace

    @classmethod
    def of(cls, spec: AlignmentSpec, widths: dict[str, list[int]],
           blocks: list[tuple[int, int]], place: torch.device,
           products: str = "float32") -> _View:
        acc = {(p.name, i, j): CrossMoments(widths[p.name][i], widths[p.name][j], place)
               for p in spec.points for i, j in blocks}
        return cls(spec, blocks, acc, _Workspace(products))

    def fold(self, captures: list[dict[str, list[torch.Tensor]]]) -> None:
        """One batch of every model's captured samples (``captures[i]``: model i's)."""
        for point in self.spec.points:  # the k-th feature module of every model
                                        # (streams read several)
            for chunk in zip(*(captured[point.name] for captured in captures), strict=True):
                _add_chunk(self.acc, point.name, chunk, self.blocks, self.workspace)


def output_spec(widths: dict[str, list[int]]) -> AlignmentSpec:
    """A spec with one point per module of ``widths`` (:func:`module_widths`), reading its
    output (the point's width: model 0's)."""
    return AlignmentSpec(tuple(MergePoint(name, per_model[0], (name,), (), ())
                               for name, per_model in widths.items()))


def module_widths(models: Sequence[nn.Module], names: Sequence[str]) -> dict[str, list[int]]:
    """``{module: [output channels per model]}`` of BatchNorm (``num_features``), conv
    (``out_channels``) or linear (``out_features``) modules; another kind fails in one line."""
    out: dict[str, list[int]] = {name: [] for name in names}
    for model in models:
        modules = dict(model.named_modules())
        for name in names:
            module = modules.get(name)
            width = next((getattr(module, a) for a in ("num_features", "out_channels",
                                                       "out_features") if hasattr(module, a)), None)
            if width is None:
                raise CcamergeError(f"cannot measure the outputs of {name!r}: the model has no "
                                    "such BatchNorm, conv or linear module")
            out[name].append(int(width))
    return out


def _point_widths(models: Sequence[nn.Module], runners: Sequence[nn.Module], spec: AlignmentSpec,
                  source: DataSource) -> dict[str, list[int]]:
    """``{point: [n_i per model]}``: :func:`ccamerge.spec.model_widths`, except for models
    outside the built-in families whose state-dict shapes differ (traced models of one family
    at other widths), whose widths are read from one forward of the eval-mode ``runners`` on
    two inputs: the channel count of each model's features at each point."""
    if all(getattr(m, "arch", None) in ARCHITECTURES for m in models) or not _shapes_differ(models):
        return model_widths(models, spec)
    place = module_device(runners[0])
    rows = [batch_features(r, spec, source.head(2).to(place)) for r in runners]  # {point: [S, n_i]}
    return {p.name: [int(row[p.name].shape[1]) for row in rows] for p in spec.points}


def _shapes_differ(models: Sequence[nn.Module]) -> bool:
    """Whether some state-dict entry has another shape in some model than in model 0."""
    first = {k: v.shape for k, v in models[0].state_dict().items()}
    return any(first.get(k) != v.shape for m in models[1:] for k, v in m.state_dict().items())


def _shard(source: DataSource, batch_size: int, group: ProcessGroup | None
           ) -> tuple[DataSource, int]:
    """This rank's part of ``source`` and the global index of its first sample."""
    if group is None:
        return source, 0
    part = shard_source(source, batch_size, group)
    return part, batch_block(source.size_hint(), batch_size, *rank_and_size(group)).start


def _stream(runners, views: Sequence[tuple[AlignmentSpec, Select | None]], source: DataSource,
            batch_size: int, sampler: PositionSampler, first: int, fold: Callable,
            progress, unit_rows: bool = False) -> tuple[int, str]:
    """Run every model on every batch with the features of each ``(spec, select)`` view
    captured, ``fold(*captures)`` after each batch (one list of per-model captures per view);
    returns the number of inputs read and the memory layout image batches ran in
    (:func:`ccamerge.layout.choose_layout`). ``unit_rows``: standard-layout maps are copied as
    unit rows (:class:`MapBuffers`)."""
    total, seen = source.size_hint(), 0
    layout, whole = None, long_pass(total, batch_size)
    with contextlib.ExitStack() as stack:
        stack.enter_context(exact_float32())
        stack.enter_context(for_a_pass())  # freed maps kept for the next batch, if asked
        buffers = [[MapBuffers(unit_rows) for _ in runners] for _ in views]
        captures = [[stack.enter_context(capture_features(m, spec, select, kept))
                     for m, kept in zip(runners, row, strict=True)]
                    for (spec, select), row in zip(views, buffers, strict=True)]

        def discard(captured: Sequence[dict[str, list[torch.Tensor]]]) -> None:
            for chunks in (c for features in captured for c in features.values()):
                chunks.clear()

        def overwritten(models: slice = slice(None)) -> bool:  # every buffer forgets its watch
            return any([kept.overwritten() for row in buffers for kept in row[models]])

        def probe(part: torch.Tensor) -> None:  # model 0 with its hooks, nothing folded
            sampler.start_batch(first + seen, len(part))
            runners[0](part)
            overwritten(slice(0, 1))
            discard([view[0] for view in captures])

        for xb, _ in source.batches(batch_size):
            if layout is None:
                layout = choose_layout(runners[0], xb, probe, whole)
                stack.enter_context(weights_in(runners, layout))
            sampler.start_batch(first + seen, len(xb))
            with torch.no_grad():
                xb = in_layout(xb, layout)
                for model in runners:
                    model(xb)
                if overwritten():  # an in-place op changed a capture: again, copying it
                    discard([c for view in captures for c in view])
                    for model in runners:
                        model(xb)
                    overwritten()  # copies now: lets go of this batch's outputs
            fold(*captures)
            discard([c for view in captures for c in view])
            seen += len(xb)
            if progress and total:
                progress(min(1.0, seen / total))
    return seen, layout or "n/a"


def _runners(models: Sequence[nn.Module], source: DataSource, place: torch.device
             ) -> tuple[list[nn.Module], DataSource]:
    """Eval-mode models to run on ``place`` and ``source`` moved there. A model already there
    becomes a copy of its modules that shares its parameters and buffers (no memory, hooks and
    mode stay off the caller's modules); others are copied there."""
    runners = []
    for model in models:
        runner = _shared_copy(model) if module_device(model) == place else model_to(model, place)
        runners.append(runner.eval())
    return runners, _moved(source, {"device": place})


def _shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules holding the very same parameter and buffer tensors (the
    model itself if it cannot be copied)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    try:
        return copy.deepcopy(model, memo)
    except Exception:  # noqa: BLE001 - an uncopyable module runs as it is
        return model


def channels_last(models: Sequence[nn.Module], x: torch.Tensor | DataSource,
                  device: torch.device | None = None
                  ) -> tuple[list[nn.Module], torch.Tensor | DataSource]:
    """Copies of ``models`` in channels-last memory on ``device`` (default: where they are),
    and ``x`` with its images in that layout there (a tensor ``[B, C, H, W]`` converted, a data
    source converted batch by batch); feature vectors only moved. A feature map then reads as
    ``[S, C]`` samples without a transposing copy; whether convolutions run faster this way
    depends on the model (:mod:`ccamerge.layout`).
    Models that cannot be copied are used as they are (an error if they must move)."""
    shape = x.shape[1:] if isinstance(x, torch.Tensor) else x.sample_shape
    if len(shape) != 3:
        return _placed(models, x, device)
    to = {"memory_format": torch.channels_last} | ({} if device is None else {"device": device})
    try:
        copies = [copy.deepcopy(m).to(**to) for m in models]
    except Exception:  # noqa: BLE001 - an uncopyable module only loses the speed-up
        return _placed(models, x, device)
    return copies, _moved(x, to)


def _placed(models: Sequence[nn.Module], x: torch.Tensor | DataSource,
            device: torch.device | None) -> tuple[list[nn.Module], torch.Tensor | DataSource]:
    if device is None:
        return list(models), x
    return models_to(models, device), _moved(x, {"device": device})


def _moved(x: torch.Tensor | DataSource, to: dict) -> torch.Tensor | DataSource:
    """``x.to(**to)`` for a tensor, batch by batch for a data source."""
    if isinstance(x, torch.Tensor):
        return x.to(**to)
    return x.map(lambda xb: xb.to(**to))


def _finish(acc, spec, widths: dict[str, list[int]], num_models, reference, pairs,
            device: torch.device, samples_per_rank: list[int]) -> Statistics:
    """The accumulated moments as numpy float64 :class:`Statistics` (on the host)."""
    return Statistics(_points(acc, spec, widths, num_models), num_models, reference, pairs,
                      str(device), len(samples_per_rank), list(samples_per_rank),
                      threads=torch.get_num_threads())


def _points(acc, spec, widths: dict[str, list[int]], num_models: int
            ) -> dict[str, PointStatistics]:
    """``{point: PointStatistics}`` of the accumulated blocks (numpy float64, on the host)."""
    points = {}
    for point in spec.points:
        autos = [acc[(point.name, i, i)] for i in range(num_models)]
        covs = {(i, j): m.covariance for (name, i, j), m in acc.items() if name == point.name}
        points[point.name] = PointStatistics(point.name, point.width, autos[0].count,
                                             [a.mean_x.cpu().numpy() for a in autos], covs,
                                             list(widths[point.name]))
    return points
