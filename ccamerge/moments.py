"""One batch of features folded into streaming float64 moments: the statistics pass's hot path.

Per merge point and batch, every model gives samples ``[S, n]``: for an image model in
channels-last memory a view of its feature map (multiplied on the CPU by oneDNN as well:
:func:`tn_product`); in the standard layout on the CPU with float32
products and oneDNN, a copy as units by samples ``[n, S]`` (:class:`UnitRows`, multiplied by
oneDNN: :func:`nt_product`); otherwise in the standard layout a channels-last copy, or, for maps
of many positions on the CPU, the map itself read in place (:class:`ChannelMaps`).
:func:`_add_chunk` multiplies only the covariance blocks asked for (each model with itself, as a
symmetric product: :func:`gram`; and the pairs: the reference with each other model, or all
pairs), as float32 products of the samples as they are, and folds them into the float64
accumulators (:class:`ccamerge.stats.CrossMoments`) with Chan's update. Samples are centred first
(into a reused :class:`_Workspace`) only where an offset would cost precision.

With ``products="bfloat16"`` every model's samples are instead centred on a bfloat16 shift into a
bfloat16 copy and multiplied in bfloat16 (float32 accumulation inside each chunk of
:data:`PRODUCT_ROWS` rows, the chunks summed in float32): about 4x the float32 GEMM rate where the
CPU has AMX or AVX512-BF16, at a relative error of the covariances near 1e-3 (see
:func:`_add_low_precision`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ccamerge.errors import CcamergeError

# A model with a unit whose mean^2 exceeds this many times its variance is centred before the
# float32 products. Products of the samples as they are lose about a factor 1 + mean^2 / var:
# max error / (std_i std_j) over 256 000 ReLU samples of 64 units (float64 oracle) 8e-7 at
# mean^2 / var = 0.5 (typical ReLU units; centred: 3e-6), 4e-6 at 6, 1.5e-5 at 28, 3e-5 at 44,
# 1e-2 at a mean of 100 standard deviations. Trained nets' units stay near 1 (largest seen: 2.3);
# torch's random init leaves a few units at 10-700 in deep VGG layers.
UNCENTRED_LIMIT = 32.0
# A point's first look judges the offsets on at most this many samples (rows) per model: a
# heuristic that only picks the cheaper exact path (later batches are checked from the products'
# diagonals), and the whole first batch of a wide early feature map costs a pass of its own.
FIRST_LOOK_ROWS = 16_384
# A model's product with itself, A^T A, is symmetric: on the CPU, from 256 columns, it is
# multiplied as the k row blocks of its upper triangle (k = 2; 4 from 512 columns) and mirrored.
# Time over one GEMM, 2 threads: 0.89 at [128000, 256], 0.75 at [32000, 512], 0.70 at [8000,
# 1024]; no gain below 256 columns (1.0-1.3). BLAS ssyrk was slower than MKL's GEMM there. On
# unit rows through oneDNN (AVX-512 AMD EPYC): 0.79 at [128000, 256], 0.74 at [32000, 512],
# 0.64 at [16000, 1024], 0.63 at [4000, 2048].
GRAM_BLOCKS = ((512, 4), (256, 2))
# Without unit rows (below: bfloat16 products, or no oneDNN), a standard-layout feature map of at
# least this many positions per image is read in place on the CPU (:class:`ChannelMaps`:
# products summed image by image) instead of copied to channels-last. Time over
# copy-then-products, two models (2 self blocks, 1 pair), 2 threads: 0.61 at [500, 64, 32x32],
# 0.67 at [250, 256, 32x32], 0.92 at [125, 512, 32x32]; 0.90-1.07 at 16x16 and 1.03-1.67 at
# 8x8 and below, where one GEMM over the whole batch wins.
MAP_MIN_POSITIONS = 1024
# Contiguous float32 products x @ y^T (x [n, S], y [n, S]: the contraction dim contiguous) go
# through oneDNN's matmul rather than torch.mm (MKL), unless a one-time check finds it slower
# (:func:`_faster`): 345-400 GFLOP/s against 146-185 at S x n = 128000 x 128 .. 4000 x 2048 on
# an AVX-512 AMD EPYC, 2 threads (MKL takes a slower path on AMD CPUs). Samples [S, n] with n
# contiguous gain nothing from it (oneDNN reorders them first: 54-204 GFLOP/s), and a
# channels-last map costs two copies to reach [n, S]: in the statistics pass that lost (VGG11 x1
# 1.05x, ResNet20 x1 1.17x slower), so those stay on torch.mm.
# With float32 products on the CPU and oneDNN there, every standard-layout map [B, n, P] is
# copied to unit rows [n, B*P] (:class:`UnitRows`, runs of P; :class:`ccamerge.stats.MapBuffers`)
# instead of to channels-last or read in place. Time of the three blocks of two models, copies
# included, over the channels-last copy and torch.mm, 2 threads: 0.44-0.56 at n = 16..2048, P =
# 16..256 (batches of 250-500); over in place (ChannelMaps, oneDNN per image): 0.21 at [500, 16,
# 1024], 0.45 at [500, 64, 1024], 0.85-0.94 at 128-256 units, 1.05 at [125, 512, 1024].
# Contiguous float32 samples [S, n] (n contiguous: channels-last maps, linear features) are
# multiplied, a^T b, as the weight gradient of a 1x1 convolution by oneDNN on their rows viewed
# as channels-last maps [S / R, n, R, 1] with R = TN_POSITIONS (no copy; the S mod R rows left
# over by torch.mm), unless a one-time check finds it slower than torch.mm. AVX-512 AMD EPYC, 2
# threads, GFLOP/s against torch.mm (MKL): self products 255-375 against 130-180, pairs of two
# maps 170-325 against 140-180 at S x n = 128000 x 128 .. 8000 x 512; 115-190 against 95-130 at
# 512000 x 64, where both are bound by memory. Views of R = 4..1024 rows and the map's own
# [B, n, H, W] were within the repeats' spread of each other but for R <= 16 at 128 units
# (0.6-0.75x). Column slices are strided (oneDNN copies them first: 7-240 GFLOP/s), so a self
# product of such samples is multiplied whole, not as its triangle's row blocks: 2 threads at
# 300 GFLOP/s for the whole beat MKL's triangle (0.75-0.89 of one GEMM at 130-180).
TN_POSITIONS = 256
# ... but only products of at least TN_MIN_MACS multiply-adds (S n_a n_b) over at least
# TN_MIN_ROWS_PER_UNIT S per unit (S >= that * max(n_a, n_b)). Time over torch.mm, same VM: 0.54-
# 0.72 from [3000, 128] and [32000, 32] (33M) up to [16000, 1024]; 0.96 at [4096, 2048]; but 1.0-
# 1.2 at [1437, 128] (24M) and [4000, 64] (16M), where the call's own cost counts, and 1.2-2.2 at
# [500, 512], [1000, 1024] and [2000, 2048], too few rows per unit to share out. Smaller products
# (a small MLP's features) then also stay bit for bit what they were, whatever the thread count
# (oneDNN's rounding depends on it; MKL's did not here).
TN_MIN_MACS = 1 << 25
TN_MIN_ROWS_PER_UNIT = 2
# The precisions the products of a pass can run in (``collect_statistics(products=...)``).
PRODUCTS = ("float32", "bfloat16")
# bfloat16 products are rounded to bfloat16 once per chunk of this many rows, so the output
# rounding (relative 2^-8 at most per chunk) averages out over the chunks: max error / (std_i
# std_j) of a [256000, 256] ReLU covariance 3.8e-3 in one chunk, 8e-4 in chunks of 8192, 4e-4 in
# chunks of 1024; time over one bfloat16 GEMM, 2 threads, at [256000, 256] / [16000, 1024] /
# [4000, 2048]: 1.9 / 1.8 / 1.7 in chunks of 1024, 0.93 / 1.2 / 1.14 in chunks of 4096.
PRODUCT_ROWS = 4096
# The float32 subtraction before the rounding runs on blocks of this many elements (in cache).
SUBTRACT_BLOCK_ELEMENTS = 1 << 18
# bfloat16 self products of at least this many columns (time over product-and-transpose, 2
# threads: 0.73 at [4000, 2048], 1.6 at [16000, 1024]) are multiplied as the row blocks of their
# upper triangle (:func:`gram`); narrower ones (many rows: column slices of bfloat16 rows cost
# a copy each) as one product, averaged with its transpose.
LOW_GRAM_MIN_COLUMNS = 2048
# At most this many elements of per-chunk bfloat16 products are held at once.
PRODUCT_CHUNK_ELEMENTS = 1 << 24


class ChannelMaps:
    """The ``B*P`` samples ``[B*P, n]`` of a standard-layout feature map ``maps`` ``[B, n, P]``
    (``P = H*W`` positions, contiguous), read in place: each product is a sum over the images
    of ``[n, P]`` GEMMs (:func:`product`), so the map is never copied to channels-last."""

    def __init__(self, maps: torch.Tensor):
        self.maps = maps

    @property
    def shape(self) -> torch.Size:
        batch, n, positions = self.maps.shape
        return torch.Size((batch * positions, n))

    @property
    def dtype(self) -> torch.dtype:
        return self.maps.dtype

    @property
    def device(self) -> torch.device:
        return self.maps.device

    def head(self, rows: int) -> ChannelMaps:
        """The whole images holding about the first ``rows`` samples (at least one)."""
        return ChannelMaps(self.maps[:max(1, rows // self.maps.shape[2])])


class UnitRows:
    """The ``S`` samples ``[S, n]`` of a feature map held as units by samples: ``rows``
    ``[n, S]``, each unit's samples contiguous (a standard-layout map ``[B, n, P]`` copied as
    ``[n, B, P]``, runs of ``P``: a cheaper copy than to channels-last). Products then contract
    the contiguous dim (:func:`nt_product`), the form oneDNN multiplies fastest."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    @property
    def shape(self) -> torch.Size:
        n, count = self.rows.shape
        return torch.Size((count, n))

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def head(self, rows: int) -> UnitRows:
        """The first ``rows`` samples (a strided view)."""
        return UnitRows(self.rows[:, :rows])


Samples = torch.Tensor | ChannelMaps | UnitRows  # [S, n]


def _checked_onednn_op() -> Callable | None:
    """oneDNN's float32 ``x @ y^T`` on the CPU (the matmul of torch's fused linear layers), or
    None where this torch lacks it, it disagrees with a float64 product on a small check, or it
    is slower than ``torch.mm`` on samples ``[S, n]`` (:func:`_faster`: MKL may be the faster
    one on other CPUs than the AMD EPYC where oneDNN measured 2x)."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        if not torch.backends.mkldnn.is_available():
            return None
        fast = lambda a, b: op(a, b, None, "none", [], "")  # noqa: E731
        x, y = torch.rand(24, 300, generator=torch.Generator().manual_seed(0)).split((16, 8))
        with torch.no_grad():
            got = fast(x, y)
        if not torch.allclose(got.double(), x.double() @ y.double().T, rtol=1e-5):
            return None
    except (AttributeError, RuntimeError):
        return None
    rows = torch.rand(256, 8192, generator=torch.Generator().manual_seed(1))
    return fast if _faster(lambda: fast(rows, rows), rows.T.contiguous()) else None


def _checked_onednn_tn() -> Callable | None:
    """``a^T b`` of contiguous float32 samples ``[S, n_a]``, ``[S, n_b]`` on the CPU through
    oneDNN's convolution weight gradient (:func:`_weight_gradient_product`), or None where
    this torch lacks it, it disagrees with a float64 product on a small check, or it is slower
    than ``torch.mm`` (:func:`_faster`)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        a, b = torch.rand(2 * TN_POSITIONS + 7, 40,
                          generator=torch.Generator().manual_seed(0)).split((24, 16), dim=1)
        a, b = a.contiguous(), b.contiguous()
        with torch.no_grad():
            got = _weight_gradient_product(a, b)
        if not torch.allclose(got.double(), a.double().T @ b.double(), rtol=1e-5):
            return None
    except (AttributeError, RuntimeError):
        return None
    samples = torch.rand(8192, 256, generator=torch.Generator().manual_seed(1))
    fast = lambda: _weight_gradient_product(samples, samples)  # noqa: E731
    return _weight_gradient_product if _faster(fast, samples) else None


def _weight_gradient_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^T b`` ``[n_a, n_b]`` of contiguous samples ``a`` ``[S, n_a]``, ``b`` ``[S, n_b]`` as the
    weight gradient of a 1x1 convolution: its first rows viewed as channels-last maps ``[S / R,
    n, R, 1]`` (``R`` = :data:`TN_POSITIONS`, no copy), the ``S mod R`` left over by
    ``torch.mm``."""
    count = a.shape[0] // TN_POSITIONS * TN_POSITIONS
    if count == 0:
        return a.T @ b
    shape = (a.shape[1], b.shape[1], 1, 1)
    out = torch.ops.aten.convolution_backward(
        _as_maps(a, count), _as_maps(b, count), _ZERO.expand(shape), None, [1, 1], [0, 0],
        [1, 1], False, [0, 0], 1, [False, True, False])[1].view(shape[:2])
    return out.addmm_(a[count:].T, b[count:]) if count < a.shape[0] else out


_ZERO = torch.zeros(())  # the 1x1 convolution's weights: only their shape is read


def _as_maps(samples: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` (a multiple of :data:`TN_POSITIONS`) rows of contiguous samples
    ``[S, n]`` as a channels-last map ``[count / R, n, R, 1]`` (a view)."""
    n = samples.shape[1]
    return samples.as_strided((count // TN_POSITIONS, n, TN_POSITIONS, 1),
                              (TN_POSITIONS * n, 1, n, n))


def _faster(fast: Callable, samples: torch.Tensor) -> bool:
    """Whether the call ``fast`` is at least as fast as ``torch.mm`` computing ``samples^T
    samples`` (``[8192, 256]``: the best of three each, about 30 ms in all)."""
    with torch.no_grad():
        times = [_best_time(fast), _best_time(lambda: samples.T @ samples)]
    return times[0] <= times[1]


def _best_time(call: Callable, tries: int = 3) -> float:
    """The fastest of ``tries`` timed calls after one untimed, in seconds."""
    call()
    best = math.inf
    for _ in range(tries):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


# The checked oneDNN products (or None), decided once per process: "nt" (unit rows, x @ y^T) and
# "tn" (samples [S, n], a^T b).
_ONEDNN: dict[str, Callable | None] = {}
_CHECKS = {"nt": _checked_onednn_op, "tn": _checked_onednn_tn}


def _onednn(form: str) -> Callable | None:
    if form not in _ONEDNN:
        _ONEDNN[form] = _CHECKS[form]()
    return _ONEDNN[form]


def onednn_nt() -> Callable | None:
    """The checked oneDNN ``x @ y^T`` (:func:`nt_product`), or None where it is not there or
    not faster (decided on first use, once per process)."""
    return _onednn("nt")


def onednn_tn() -> Callable | None:
    """The checked oneDNN ``a^T b`` of samples ``[S, n]`` (:func:`tn_product`), or None where it
    is not there or not faster (decided on first use, once per process)."""
    return _onednn("tn")


def nt_product(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x @ y^T`` ``[m, k]`` of ``x`` ``[m, S]`` and ``y`` ``[k, S]``: contiguous float32 on the
    CPU through oneDNN where it is there (:func:`onednn_nt`), else ``torch.mm``."""
    fast = _fast_form(x, y) and onednn_nt()
    return fast(x, y) if fast else torch.mm(x, y.T)


def tn_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^T b`` ``[n_a, n_b]`` of samples ``a`` ``[S, n_a]`` and ``b`` ``[S, n_b]``: contiguous
    float32 on the CPU through oneDNN where it is there (:func:`onednn_tn`), else
    ``torch.mm``."""
    fast = _tn_worth_it(a, b) and onednn_tn()
    return fast(a, b) if fast else a.T @ b


def _tn_worth_it(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether samples ``a`` ``[S, n_a]``, ``b`` ``[S, n_b]`` are in oneDNN's form and large
    enough for it to pay (:data:`TN_MIN_MACS`, :data:`TN_MIN_ROWS_PER_UNIT`)."""
    rows, widest = a.shape[0], max(a.shape[1], b.shape[1])
    return (_fast_form(a, b) and rows * a.shape[1] * b.shape[1] >= TN_MIN_MACS
            and rows >= TN_MIN_ROWS_PER_UNIT * widest)


def _fast_form(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether both operands are contiguous float32 CPU tensors (what oneDNN takes as is)."""
    return (a.device.type == b.device.type == "cpu" and a.dtype == b.dtype == torch.float32
            and a.is_contiguous() and b.is_contiguous())


def column_sums(samples: Samples, square: bool = False) -> torch.Tensor:
    """``[n]`` sums of samples ``[S, n]`` (of their squares with ``square``), float64."""
    if isinstance(samples, ChannelMaps):
        values, dims = samples.maps, (0, 2)
    elif isinstance(samples, UnitRows):
        values, dims = samples.rows, 1
    else:
        values, dims = samples, 0
    summed = values.square() if square else values
    total = torch.promote_types(values.dtype, torch.float32)  # bfloat16 sums in float32
    return summed.sum(dims, dtype=total).to(torch.float64)


def product(a: Samples, b: Samples) -> torch.Tensor:
    """``a^T b`` ``[n_a, n_b]`` of samples ``[S, n_a]``, ``[S, n_b]``: maps read in place summed
    image by image, unit rows in one :func:`nt_product`, samples ``[S, n]`` in one
    :func:`tn_product`."""
    if isinstance(a, ChannelMaps) and isinstance(b, ChannelMaps):
        out = nt_product(a.maps[0], b.maps[0])
        for image_a, image_b in zip(a.maps[1:], b.maps[1:], strict=True):
            out.add_(nt_product(image_a, image_b))
        return out
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return tn_product(_dense(a), _dense(b))
    return nt_product(_rows(a), _rows(b))


def _dense(samples: Samples) -> torch.Tensor:
    """Samples ``[S, n]`` as one tensor (a view of unit rows, a copy of maps)."""
    if isinstance(samples, UnitRows):
        return samples.rows.T
    if isinstance(samples, ChannelMaps):
        return samples.maps.transpose(1, 2).reshape(-1, samples.maps.shape[1])
    return samples


def _rows(samples: ChannelMaps | UnitRows) -> torch.Tensor:
    """Samples as unit rows ``[n, S]`` (a copy of maps)."""
    if isinstance(samples, ChannelMaps):
        return samples.maps.transpose(0, 1).reshape(samples.maps.shape[1], -1)
    return samples.rows


class _Workspace:
    """Reusable buffers for centred samples (one per model slot: a fresh feature-map-sized
    allocation per batch costs page faults that rival the product itself), and which models
    each point centres (``centre``) or has already checked (``checked``)."""

    def __init__(self, products: str = "float32"):
        if products not in PRODUCTS:
            raise CcamergeError(f"products must be one of {', '.join(PRODUCTS)}, not {products!r}")
        self.products = products
        self.flat: dict[int, torch.Tensor] = {}
        self.centre: set[tuple[str, int]] = set()
        self.checked: set[tuple[str, int]] = set()
        self.shifts: dict[tuple[str, int], torch.Tensor] = {}  # bfloat16 path: [n] float32

    def matrix(self, rows: int, cols: int, dtype: torch.dtype,
               device: torch.device | None = None, slot: int = 0) -> torch.Tensor:
        """A ``[rows, cols]`` view of buffer ``slot``, reallocated when too small or elsewhere."""
        return self.like((rows, cols), dtype, device, slot)

    def like(self, shape: tuple[int, ...], dtype: torch.dtype,
             device: torch.device | None = None, slot: int = 0) -> torch.Tensor:
        """A view of buffer ``slot`` of ``shape``, reallocated when too small or elsewhere."""
        device = torch.device("cpu") if device is None else device
        size = math.prod(shape)
        flat = self.flat.get(slot, torch.empty(0))
        if flat.dtype != dtype or flat.device != device or flat.numel() < size:
            flat = self.flat[slot] = torch.empty(size, dtype=dtype, device=device)
        return flat[:size].view(shape)

    def first_look(self, name: str, samples: Sequence[Samples]) -> None:
        """The first batch of a point: mark the models whose units are offset (from column
        sums and norms of its first :data:`FIRST_LOOK_ROWS` samples, before any product), so no
        product is computed twice."""
        new = [i for i in range(len(samples)) if (name, i) not in self.checked]
        if not new:
            return
        heads = {i: _head(samples[i], FIRST_LOOK_ROWS) for i in new}
        flags = [_offset(column_sums(heads[i]), column_sums(heads[i], square=True),
                         heads[i].shape[0]) for i in new]
        self.centre.update((name, i) for i, bad in zip(new, torch.stack(flags).tolist(),
                                                       strict=True) if bad)
        self.checked.update((name, i) for i in new)

    def shifted(self, name: str, i: int, samples: Samples
                ) -> tuple[Samples, torch.Tensor | None]:
        """``(samples - shift [S, n], shift [n] or None)``: model ``i``'s samples as they are,
        or centred on their float32 mean into buffer ``i`` once ``(name, i)`` is marked."""
        if (name, i) not in self.centre:
            return samples, None
        if isinstance(samples, ChannelMaps):
            maps = samples.maps
            mean = maps.mean((0, 2))
            out = self.like(tuple(maps.shape), maps.dtype, maps.device, slot=i)
            return ChannelMaps(torch.sub(maps, mean[:, None], out=out)), mean
        if isinstance(samples, UnitRows):
            mean = samples.rows.mean(1)
            out = self.like(tuple(samples.rows.shape), samples.dtype, samples.device, slot=i)
            return UnitRows(torch.sub(samples.rows, mean[:, None], out=out)), mean
        mean = samples.mean(0)
        out = self.matrix(*samples.shape, samples.dtype, samples.device, slot=i)
        return torch.sub(samples, mean, out=out), mean


def _head(samples: Samples, rows: int) -> Samples:
    """About the first ``rows`` samples (whole images of a :class:`ChannelMaps`)."""
    return samples.head(rows) if isinstance(samples, ChannelMaps | UnitRows) else samples[:rows]


def _offset(sums: torch.Tensor, squares: torch.Tensor, count: int) -> torch.Tensor:
    """Whether any unit's ``mean^2 > UNCENTRED_LIMIT * variance``, from its float64 column sums
    ``[n]`` and sums of squares ``[n]`` (a 0-dim bool tensor: no synchronisation yet)."""
    square_of_mean = sums * sums / count  # [n]: S * mean^2
    return (square_of_mean > UNCENTRED_LIMIT * (squares - square_of_mean)).any()


def _add_chunk(acc: dict, name: str, samples: Sequence[Samples], blocks,
               workspace: _Workspace) -> None:
    """Fold one batch of samples ``[S, n]`` per model into the moments of ``blocks``.

    Only the blocks asked for are multiplied, each one float32 product of the samples as they
    are (no centring copy): the co-moment about the batch means is ``A^T B - s_a s_b^T / S``
    with column sums ``s``, in float64 (:meth:`CrossMoments.add_products`). A model with a
    unit offset by more than :data:`UNCENTRED_LIMIT` (mean^2 / variance) is centred instead:
    checked on a point's first batch before its products, on later ones from the products'
    diagonals (a model that turns offset is multiplied again, centred); from then on for this
    point."""
    if workspace.products == "bfloat16":
        _add_low_precision(acc, name, samples, blocks, workspace)
        return
    count = samples[0].shape[0]
    workspace.first_look(name, samples)
    mats, shifts = zip(*(workspace.shifted(name, i, s) for i, s in enumerate(samples)),
                       strict=True)
    sums = [column_sums(m) for m in mats]  # [n] each
    products = {(i, j): gram(mats[i]) if i == j else product(mats[i], mats[j])
                for i, j in blocks}  # [n, n] float32
    offset = _offset_models(products, sums, count, shifts)
    if offset:
        workspace.centre.update((name, i) for i in offset)
        _add_chunk(acc, name, samples, blocks, workspace)
        return
    for i, j in blocks:
        acc[(name, i, j)].add_products(count, sums[i], sums[j], products[(i, j)], shifts[i],
                                       shifts[j])


def _offset_models(products: dict, sums: list[torch.Tensor], count: int,
                   shifts: Sequence[torch.Tensor | None]) -> list[int]:
    """Models (not yet centred) with a unit whose ``mean^2 > UNCENTRED_LIMIT * variance`` in this
    batch, from the diagonals of their uncentred products ``[n, n]`` and sums ``[n]`` (one
    host-device synchronisation)."""
    candidates = [i for i, shift in enumerate(shifts) if shift is None]
    if not candidates:
        return []
    flags = [_offset(sums[i], products[(i, i)].diagonal().to(torch.float64), count)
             for i in candidates]
    return [i for i, bad in zip(candidates, torch.stack(flags).tolist(), strict=True) if bad]


def gram(a: Samples, multiply: Callable[[Samples, Samples], torch.Tensor] = product
         ) -> torch.Tensor:
    """``a^T a`` ``[n, n]`` of samples ``a`` ``[S, n]``: one product, or on the CPU from 256
    columns the row blocks of its upper triangle, each mirrored (:data:`GRAM_BLOCKS`), each
    block ``multiply(a_cols, b_cols)`` (:func:`product`; :func:`low_product` for bfloat16)."""
    n = a.shape[1]
    k = next((k for cols, k in GRAM_BLOCKS if n >= cols), 1) if _in_blocks(a) else 1
    if k == 1:
        return multiply(a, a)
    out = None
    edges = [i * n // k for i in range(k + 1)]
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        rows = multiply(_columns(a, lo, hi), _columns(a, lo, n))  # [hi - lo, n - lo]
        if out is None:
            out = torch.empty(n, n, dtype=rows.dtype, device=rows.device)
        out[lo:hi, lo:] = rows
        out[hi:, lo:hi] = rows[:, hi - lo:].T
    return out


def _in_blocks(samples: Samples) -> bool:
    """Whether a self product is multiplied as the row blocks of its triangle: on the CPU, but
    not samples ``[S, n]`` that oneDNN multiplies whole (:data:`TN_POSITIONS`)."""
    whole = (isinstance(samples, torch.Tensor) and _tn_worth_it(samples, samples)
             and onednn_tn() is not None)
    return samples.device.type == "cpu" and not whole


def _columns(samples: Samples, lo: int, hi: int) -> Samples:
    """Samples ``[S, hi - lo]`` of the units ``lo:hi`` (a view)."""
    if isinstance(samples, ChannelMaps):
        return ChannelMaps(samples.maps[:, lo:hi])
    if isinstance(samples, UnitRows):
        return UnitRows(samples.rows[lo:hi])
    return samples[:, lo:hi]


def _add_low_precision(acc: dict, name: str, samples: Sequence[Samples], blocks,
                       workspace: _Workspace) -> None:
    """:func:`_add_chunk` with bfloat16 products: model ``i``'s samples ``[S, n]`` minus a
    bfloat16-exact shift ``[n]`` (its first batch's mean, rounded: ReLU zeros then stay exact, so
    their rounding cannot bias the products) into a bfloat16 buffer (a standard-layout map stays
    ``[B, n, P]``), every block one chunked bfloat16 product summed in float32
    (:func:`low_product`; self blocks symmetric: :func:`low_gram`), folded in float64."""
    count = samples[0].shape[0]
    samples = [_dense(s) if isinstance(s, UnitRows) else s for s in samples]
    lows = [_low_copy(name, i, s, workspace) for i, s in enumerate(samples)]
    for i, j in blocks:
        product_ij = (low_gram(lows[i].samples) if i == j
                      else low_product(lows[i].samples, lows[j].samples))
        acc[(name, i, j)].add_products(count, lows[i].sums, lows[j].sums, product_ij,
                                       lows[i].shift, lows[j].shift)


@dataclass
class _LowSamples:
    """A model's samples for bfloat16 products: ``samples - shift`` ``[S, n]`` in bfloat16 (a
    :class:`ChannelMaps` for a standard-layout map), the ``shift`` ``[n]`` (bfloat16-exact, in
    the samples' dtype) and the float64 column ``sums`` ``[n]`` of the unrounded differences."""

    samples: Samples
    shift: torch.Tensor
    sums: torch.Tensor


def _low_copy(name: str, i: int, samples: Samples, workspace: _Workspace) -> _LowSamples:
    """Model ``i``'s samples shifted and rounded into bfloat16 buffer ``i`` of the workspace.
    The shift is subtracted in the samples' precision, a cache-sized block of rows or images at
    a time, before the rounding (rounding first would cost an offset unit its precision), and
    the column sums are taken from the same blocks."""
    shift = workspace.shifts.get((name, i))
    if shift is None:
        mean = column_sums(samples) / samples.shape[0]
        shift = workspace.shifts[(name, i)] = mean.to(torch.bfloat16).to(samples.dtype)
    if isinstance(samples, ChannelMaps):  # [B, n, P]
        maps = samples.maps
        out = workspace.like(tuple(maps.shape), torch.bfloat16, maps.device, slot=i)
        return _LowSamples(ChannelMaps(out), shift,
                           _subtract_into(out, maps, shift[:, None], dims=(0, 2)))
    out = workspace.matrix(*samples.shape, torch.bfloat16, samples.device, slot=i)
    return _LowSamples(out, shift, _subtract_into(out, samples, shift, dims=0))


def _subtract_into(out: torch.Tensor, values: torch.Tensor, shift: torch.Tensor,
                   dims: int | tuple[int, ...]) -> torch.Tensor:
    """``out = values - shift`` rounded to ``out``'s dtype, block by block along dim 0 through
    one small reused temporary of ``values``' dtype; returns the float64 sums of the unrounded
    differences over ``dims``."""
    step = max(1, SUBTRACT_BLOCK_ELEMENTS // max(1, values[0].numel()))
    scratch = torch.empty((min(step, values.shape[0]), *values.shape[1:]), dtype=values.dtype,
                          device=values.device)
    total = torch.promote_types(values.dtype, torch.float32)
    sums = None
    for lo in range(0, values.shape[0], step):
        part = torch.sub(values[lo:lo + step], shift, out=scratch[:min(step, len(values) - lo)])
        out[lo:lo + step].copy_(part)
        block = part.sum(dims, dtype=total).to(torch.float64)
        sums = block if sums is None else sums.add_(block)
    return sums


def low_gram(a: Samples) -> torch.Tensor:
    """``a^T a`` ``[n, n]`` float32 of bfloat16 samples: :func:`low_product`, exactly symmetric
    (on the CPU from :data:`LOW_GRAM_MIN_COLUMNS` columns the row blocks of its upper
    triangle, :func:`gram`; else the product and its transpose averaged)."""
    if (a.device.type == "cpu" and not isinstance(a, ChannelMaps)
            and a.shape[1] >= LOW_GRAM_MIN_COLUMNS):
        return gram(a, low_product)
    out = low_product(a, a)
    return (out + out.T) / 2


def low_product(a: Samples, b: Samples) -> torch.Tensor:
    """``a^T b`` ``[n_a, n_b]`` float32 of bfloat16 samples ``[S, n_a]``, ``[S, n_b]``: bfloat16
    products of chunks of :data:`PRODUCT_ROWS` rows (of a :class:`ChannelMaps`, one image per
    chunk) summed in float32, at most :data:`PRODUCT_CHUNK_ELEMENTS` chunk products at once."""
    n_a, n_b = a.shape[1], b.shape[1]
    out = torch.zeros(n_a, n_b, dtype=torch.float32, device=a.device)
    if isinstance(a, ChannelMaps):  # [B, n, P] each
        left, right = a.maps, b.maps.transpose(1, 2)
    else:
        whole = a.shape[0] // PRODUCT_ROWS * PRODUCT_ROWS
        if whole < a.shape[0]:
            out.add_(a[whole:].T @ b[whole:])
        left = a[:whole].reshape(-1, PRODUCT_ROWS, n_a).transpose(1, 2)
        right = b[:whole].reshape(-1, PRODUCT_ROWS, n_b)
    step = max(1, PRODUCT_CHUNK_ELEMENTS // (n_a * n_b))
    for lo in range(0, left.shape[0], step):
        out.add_(torch.bmm(left[lo:lo + step], right[lo:lo + step]).sum(0, dtype=torch.float32))
    return out
