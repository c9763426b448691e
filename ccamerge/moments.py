"""One batch of features folded into streaming float64 moments: the statistics pass's hot path.

Per merge point and batch, every model gives samples ``[S, n]`` (for an image model in
channels-last memory, a view of its feature map). :func:`_add_chunk` multiplies only the
covariance blocks asked for (each model with itself, and the pairs: the reference with each
other model, or all pairs), as float32 products of the samples as they are, and folds them into
the float64 accumulators (:class:`ccamerge.stats.CrossMoments`) with Chan's update. Samples are
centred first (into a reused :class:`_Workspace`) only where an offset would cost precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# A unit whose batch mean^2 exceeds this many times its variance is centred before the float32
# products; up to it, products of the samples as they are lose no more precision than centred
# ones (measured on ReLU features: max error / (std_i std_j) ~ 4e-6 at mean^2 / var = 5.6, as
# centred products reach at mean 0; 1e-2 at a mean of 100 standard deviations).
UNCENTRED_LIMIT = 8.0


class _Workspace:
    """Reusable buffers for centred samples (one per model slot: a fresh feature-map-sized
    allocation per batch costs page faults that rival the product itself), and which models
    each point centres."""

    def __init__(self):
        self.flat: dict[int, torch.Tensor] = {}
        self.centre: set[tuple[str, int]] = set()

    def matrix(self, rows: int, cols: int, dtype: torch.dtype,
               device: torch.device | None = None, slot: int = 0) -> torch.Tensor:
        """A ``[rows, cols]`` view of buffer ``slot``, reallocated when too small or elsewhere."""
        device = torch.device("cpu") if device is None else device
        flat = self.flat.get(slot, torch.empty(0))
        if flat.dtype != dtype or flat.device != device or flat.numel() < rows * cols:
            flat = self.flat[slot] = torch.empty(rows * cols, dtype=dtype, device=device)
        return flat[:rows * cols].view(rows, cols)

    def shifted(self, name: str, i: int, samples: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(samples - shift [S, n], shift [n] or None)``: model ``i``'s samples as they are,
        or centred on their float32 mean into buffer ``i`` once ``(name, i)`` is marked."""
        if (name, i) not in self.centre:
            return samples, None
        mean = samples.mean(0)
        out = self.matrix(*samples.shape, samples.dtype, samples.device, slot=i)
        return torch.sub(samples, mean, out=out), mean


def _add_chunk(acc: dict, name: str, samples: Sequence[torch.Tensor], blocks,
               workspace: _Workspace) -> None:
    """Fold one batch of samples ``[S, n]`` per model into the moments of ``blocks``.

    Only the blocks asked for are multiplied, each one float32 product of the samples as they
    are (no centring copy): the co-moment about the batch means is ``A^T B - s_a s_b^T / S``
    with column sums ``s``, in float64 (:meth:`CrossMoments.add_products`). A model with a unit offset by more than
    :data:`UNCENTRED_LIMIT` (mean^2 / variance, in this batch) is centred instead, from then on
    for this point."""
    count = samples[0].shape[0]
    mats, shifts = zip(*(workspace.shifted(name, i, s) for i, s in enumerate(samples)),
                       strict=True)
    sums = [m.sum(0).to(torch.float64) for m in mats]  # [n] each
    products = {(i, j): mats[i].T @ mats[j] for i, j in blocks}  # [n, n] float32
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
    flags = []
    for i in candidates:
        square_of_mean = sums[i] * sums[i] / count  # [n]: S * mean^2
        spread = products[(i, i)].diagonal().to(torch.float64) - square_of_mean  # S * variance
        flags.append((square_of_mean > UNCENTRED_LIMIT * spread).any())
    return [i for i, bad in zip(candidates, torch.stack(flags).tolist(), strict=True) if bad]
