"""Random subsets of the positions of conv feature maps, for cheaper statistics.

A conv map ``[B, C, H, W]`` gives ``B*H*W`` samples of ``C`` features, and neighbouring
positions are strongly correlated, so a subset of the ``H*W`` positions of each image carries
most of the information at a fraction of the covariance products' cost. :class:`PositionSampler`
picks ``k`` positions per image from a counter-based hash of ``(seed, feature map, image index,
position)``: the same positions for every model (cross-covariances stay paired), on every
device, whatever the batch size or the sharding over ranks (the image index is the global one).
"""

from __future__ import annotations

import numbers
import zlib

import torch

from ccamerge.errors import CcamergeError

_MASK = 0x7FFFFFFF  # hashes stay in [0, 2^31), so int64 products never overflow


def check_positions(positions) -> int | float | None:
    """``None`` (every position), an int ``k >= 1`` (positions per image) or a float fraction in
    ``(0, 1]``; anything else is a clear error."""
    if positions is None:
        return None
    if isinstance(positions, bool) or not isinstance(positions, numbers.Real):
        raise CcamergeError(f"positions must be None, an int >= 1 or a fraction in (0, 1], got "
                            f"{positions!r}")
    if isinstance(positions, numbers.Integral):
        if positions < 1:
            raise CcamergeError(f"positions must be >= 1 per image, got {positions}")
        return int(positions)
    if not 0.0 < float(positions) <= 1.0:
        raise CcamergeError(f"a fraction of positions must be in (0, 1], got {positions}")
    return float(positions)


def positions_per_image(positions: int | float | None, hw: int) -> int:
    """How many of a map's ``hw`` positions each image contributes."""
    if positions is None:
        return hw
    if isinstance(positions, float):
        return min(hw, max(1, round(positions * hw)))
    return min(hw, positions)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A hash of int64 values in ``[0, 2^31)`` (LCG steps and xor-shifts), same range."""
    for _ in range(3):
        x = (x * 1103515245 + 12345) & _MASK
        x = x ^ (x >> 15)
    return x


def position_keys(images: torch.Tensor, hw: int, salt: int) -> torch.Tensor:
    """Pseudo-random keys ``[B, hw]`` for the positions of images with global indices
    ``images`` ``[B]`` (int64); a map's ``k`` positions of an image are its ``k`` smallest keys."""
    per_image = _mix((images * 40503 + salt) & _MASK)  # [B]
    per_position = _mix(torch.arange(hw, device=images.device) + salt)  # [hw]
    return _mix(per_image[:, None] ^ per_position[None, :])


class PositionSampler:
    """Keeps ``positions`` (see :func:`check_positions`) of every conv map; linear features and
    maps with no more positions than asked pass whole. Call :meth:`start_batch` before each
    batch's forward passes; the chosen rows are computed once per map and batch and reused for
    every model."""

    def __init__(self, positions: int | float | None, seed: int = 0):
        self.positions = check_positions(positions)
        self.seed = int(seed)
        self.first, self.size = 0, 0
        self._rows: dict[tuple[str, int], torch.Tensor] = {}

    def start_batch(self, first: int, size: int) -> None:
        """The next batch holds the images with global indices ``first .. first + size - 1``."""
        self.first, self.size = int(first), int(size)
        self._rows.clear()

    def keeps_all(self, out: torch.Tensor) -> bool:
        """Whether every sample of the module output ``out`` passes (no subset to choose)."""
        return out.dim() == 2 or (positions_per_image(self.positions, out.shape[2] * out.shape[3])
                                  >= out.shape[2] * out.shape[3])

    def __call__(self, key: tuple[str, int], out: torch.Tensor) -> torch.Tensor:
        """Samples ``[B*k, C]`` of a module's output ``[B, C, H, W]`` (``[B, C]`` unchanged)."""
        if out.dim() == 2:
            return out
        samples = out.movedim(1, -1).reshape(-1, out.shape[1])  # [B*H*W, C]
        hw = out.shape[2] * out.shape[3]
        if self.keeps_all(out):
            return samples
        if key not in self._rows:
            self._rows[key] = self._choose(key, hw, out.shape[0], out.device)
        return samples.index_select(0, self._rows[key])

    def _choose(self, key: tuple[str, int], hw: int, batch: int,
                device: torch.device) -> torch.Tensor:
        """Flat row indices ``[B*k]`` into the batch's ``[B*H*W, C]`` samples."""
        if batch != self.size:
            raise CcamergeError(f"a feature map has {batch} images but the batch {self.size}")
        salt = zlib.crc32(f"{self.seed}:{key[0]}:{key[1]}:{hw}".encode()) & _MASK
        images = torch.arange(self.first, self.first + batch, device=device)
        k = positions_per_image(self.positions, hw)
        chosen = position_keys(images, hw, salt).topk(k, dim=1, largest=False).indices  # [B, k]
        chosen = chosen.sort(dim=1).values  # in memory order: the gather reads forward
        rows = chosen + torch.arange(batch, device=device)[:, None] * hw
        return rows.reshape(-1)
