"""Data-parallel statistics under torch.distributed: sharding, exact all-reduce, BatchNorm reset.

Launch one process per GPU (or several CPU processes) with torchrun; every rank loads the same
models and data and calls the same functions with the process group of :func:`init_from_env`::

    torchrun --nproc_per_node=K -m ccamerge merge A.safetensors B.safetensors ...

Sharding: rank r reads the r-th contiguous block of whole batches (:func:`batch_block`), so every
batch, and the float32 product computed from it, is exactly a batch of the single-process pass.
The float64 moments are then combined exactly (:func:`all_reduce_moments`):

1. all-reduce the counts ``n_r`` and the sums ``n_r * mean_r``: the global count and means;
2. every rank shifts its co-moment to the global means, ``C_r + n_r (mx_r - mx)(my_r - my)^T``,
   and the shifted co-moments are all-reduced (summed): the co-moment of all samples.

This is Chan's merge of the partial moments done at once; the results equal the single-process
statistics to float64 round-off (only the order of the additions differs).

Timeouts: the process group of :func:`init_from_env` waits at most ``timeout_s`` (default
:data:`DEFAULT_TIMEOUT_S`, or ``$CCAMERGE_DIST_TIMEOUT_S``) in any collective; a rank that died
or hangs then turns into one :class:`CcamergeError` line naming the step and the rank. Under
NCCL ``TORCH_NCCL_BLOCKING_WAIT=1`` is set (unless already set) so that a timeout raises in the
waiting rank instead of the watchdog aborting the process. (torchrun itself stops the other
workers of a node as soon as one of them exits with an error.)
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ccamerge.data import as_source
from ccamerge.devices import exact_float32, module_device, resolve_device
from ccamerge.errors import CcamergeError
from ccamerge.transform import reset_batchnorm

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

DEFAULT_TIMEOUT_S = 600.0  # a collective waits this long for the slowest rank, then fails


def _dist():
    """``torch.distributed``, or a clear error on builds without it."""
    import torch.distributed as dist

    if not dist.is_available():
        raise CcamergeError("this torch build has no torch.distributed; run a single process")
    return dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``group`` is None for a single process (no torchrun)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    group: ProcessGroup | None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints results and writes files."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the environment describes a process group (torchrun's ``RANK``, ``WORLD_SIZE``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _timeout_s(timeout_s: float | None) -> float:
    if timeout_s is None:
        timeout_s = float(os.environ.get("CCAMERGE_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    if timeout_s <= 0:
        raise CcamergeError(f"the process group timeout must be > 0 s, got {timeout_s}")
    return timeout_s


def init_from_env(*, device: str | torch.device | None = "auto", timeout_s: float | None = None,
                  backend: str | None = None) -> DistContext:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``): gloo on the CPU, nccl on CUDA, each rank on its own GPU
    (``cuda:LOCAL_RANK``) for ``device="auto"`` or ``"cuda"``. Without torchrun: one rank, no
    group. A process group initialised earlier is reused."""
    dist = _dist() if launched_by_torchrun() else None
    if dist is None:
        return DistContext(0, 1, 0, resolve_device(device), None)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    place = _rank_device(device, local_rank)
    if not dist.is_initialized():
        _init_group(dist, backend or ("nccl" if place.type == "cuda" else "gloo"),
                    _timeout_s(timeout_s))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, place, dist.group.WORLD)


def _rank_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    """``cuda:LOCAL_RANK`` for "auto"/"cuda" when CUDA is there (made the current device)."""
    name = str(device or "auto").lower()
    if name in ("auto", "cuda") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise CcamergeError(f"LOCAL_RANK {local_rank} but this node has {count} CUDA "
                                f"device(s); start at most {count} processes per node "
                                "(--nproc_per_node) or use --device cpu")
        torch.cuda.set_device(local_rank)
    return resolve_device(device)


def _init_group(dist, backend: str, timeout_s: float) -> None:
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    except Exception as exc:  # noqa: BLE001 - store, network and backend errors alike
        raise CcamergeError(f"rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')} "
                            f"could not join the {backend} process group at {where} within "
                            f"{timeout_s:g} s: {_first_line(exc)}") from exc


def shutdown(*, synchronise: bool = True) -> None:
    """Leave the process group (if any). Call it once at the end of a torchrun process, also
    after an error (``finally``): a process that exits with a timed-out collective still
    pending aborts (SIGABRT) instead of exiting with its own status. ``synchronise`` (a clean
    exit): wait for every rank first, since gloo aborts a rank whose peer tears the group down
    while its own traffic is still in flight; after an error, leave without waiting."""
    dist = _dist() if launched_by_torchrun() else None
    if dist is None or not dist.is_initialized():
        return
    with contextlib.suppress(RuntimeError):  # a broken group is left all the same
        if synchronise:
            _leave_together(dist)
        else:
            dist.destroy_process_group()


_LEAVE_TIMEOUT_S = 30.0


def _leave_together(dist) -> None:
    """Barrier, then two rounds through the rendezvous store (not gloo): every rank has returned
    from the barrier before any closes its connections (a gloo barrier can return on one rank
    while its last message to a peer is still on the wire, and closing then aborts that peer:
    "terminate called without an active exception"); and rank 0, which hosts the store, tears
    down last, so no rank's teardown loses the store under it."""
    store = _default_store(dist)
    dist.barrier()
    if store is None:
        dist.destroy_process_group()
        return
    size = dist.get_world_size()
    rank = dist.get_rank()
    _count_in(store, "ccamerge/leave/ready", size)
    if rank != 0:
        dist.destroy_process_group()
        store.add("ccamerge/leave/gone", 1)
        return
    _count_in(store, "ccamerge/leave/gone", size - 1, add=0)
    dist.destroy_process_group()


def _default_store(dist):
    """The default group's key-value store, or None where this torch hides it."""
    get = getattr(dist.distributed_c10d, "_get_default_store", None)
    try:
        return get() if get is not None else None
    except RuntimeError:
        return None


def _count_in(store, key: str, expected: int, *, add: int = 1) -> None:
    """Add ``add`` to the counter ``key``, then wait (at most :data:`_LEAVE_TIMEOUT_S`) until it
    reaches ``expected``; a peer that never arrives only ends the wait."""
    deadline = time.monotonic() + _LEAVE_TIMEOUT_S
    while store.add(key, add) < expected and time.monotonic() < deadline:
        add = 0
        time.sleep(0.005)


def rank_and_size(group: ProcessGroup | None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` without one."""
    if group is None:
        return 0, 1
    dist = _dist()
    return dist.get_rank(group), dist.get_world_size(group)


def batch_block(num_samples: int, batch_size: int, rank: int, world_size: int) -> slice:
    """Rows of rank ``rank``: the ``rank``-th of ``world_size`` contiguous blocks of whole
    batches (batches ``[0, bs), [bs, 2 bs), ...`` of ``num_samples`` rows; block sizes differ by
    at most one batch; a rank may get none). Deterministic, and its batches are exactly the
    single-process ones."""
    if batch_size < 1:
        raise CcamergeError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise CcamergeError(f"rank must be in 0..{world_size - 1}, got {rank}")
    batches = -(-num_samples // batch_size)
    first, last = rank * batches // world_size, (rank + 1) * batches // world_size
    return slice(min(first * batch_size, num_samples), min(last * batch_size, num_samples))


def shard_source(source, batch_size: int, group: ProcessGroup | None):
    """This rank's :func:`batch_block` of a data source of known length (lazily, as a subset;
    the whole source without a group)."""
    if group is None:
        return source
    n = source.size_hint()
    if n is None:
        raise CcamergeError("sharding statistics across ranks needs data of known length (a "
                            "Dataset, a tensor, an .npz, a folder or a sized DataLoader)")
    return source.subset(np.arange(n)[batch_block(n, batch_size, *rank_and_size(group))])


def every_nth_batch(batches: Iterable, group: ProcessGroup | None) -> Iterator:
    """Batches ``rank, rank + world_size, ...`` of a stream (for data sources that only
    iterate); every batch of a deterministic stream goes to exactly one rank."""
    rank, world_size = rank_and_size(group)
    return itertools.islice(batches, rank, None, world_size)


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without a ``[source.cc:123] `` prefix."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip())
    return text.splitlines()[0][:300] if text else type(exc).__name__


@contextlib.contextmanager
def _collective(step: str, group: ProcessGroup) -> Iterator[None]:
    """Turn a failed or timed-out collective into one CcamergeError line."""
    try:
        yield
    except RuntimeError as exc:  # DistError, DistBackendError, gloo/nccl errors
        rank, world_size = rank_and_size(group)
        raise CcamergeError(f"{step} failed on rank {rank} of {world_size}: another rank died, "
                            "stalled past the process group's timeout or sent different "
                            f"tensors ({_first_line(exc)})") from exc


def _gather_rows(rows: int, layout: int, group: ProcessGroup, device: torch.device) -> list[int]:
    """Every rank's number of input rows; fails when the ranks' moment layouts differ."""
    dist = _dist()
    mine = torch.tensor([rows, layout], dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(rank_and_size(group)[1])]
    with _collective("gathering the statistics sizes", group):
        dist.all_gather(table, mine, group=group)
    table = [t.tolist() for t in table]
    if len({layout for _rows, layout in table}) > 1:
        raise CcamergeError("the ranks collected statistics of different shapes "
                            f"({[layout for _rows, layout in table]} values); every rank must "
                            "load the same models, merge points and pairs")
    return [r for r, _layout in table]


def all_reduce_moments(moments: Sequence, rows: int, group: ProcessGroup | None) -> list[int]:
    """Combine every rank's moments (objects with ``count``, ``mean_x [p]``, ``mean_y [q]``,
    ``comoment [p, q]`` float64 tensors, e.g. :class:`ccamerge.stats.CrossMoments`) in place,
    exactly, into the moments of all ranks' samples; every rank gets the same result. ``rows``:
    the input rows this rank read. Returns every rank's ``rows`` (``[rows]`` without a group)."""
    if group is None:
        return [rows]
    device = moments[0].comoment.device if moments else torch.device("cpu")
    layout = sum(m.comoment.numel() for m in moments)
    samples_per_rank = _gather_rows(rows, layout, group, device)
    with _collective("all-reducing the statistics", group):
        _reduce_means(moments, group)
        for m in moments:
            _dist().all_reduce(m.comoment, group=group)
    return samples_per_rank


def _reduce_means(moments: Sequence, group: ProcessGroup) -> None:
    """Global counts and means; each co-moment shifted to the global means (summed later)."""
    parts = []
    for m in moments:
        parts += [m.mean_x * m.count, m.mean_y * m.count, m.mean_x.new_full((1,), m.count)]
    total = torch.cat(parts)  # [sum (p + q + 1)] float64
    _dist().all_reduce(total, group=group)
    offset = 0
    for m in moments:
        p, q = len(m.mean_x), len(m.mean_y)
        sums, n = total[offset:offset + p + q], round(float(total[offset + p + q]))
        offset += p + q + 1
        if n == 0:
            continue
        mean_x, mean_y = sums[:p] / n, sums[p:] / n
        m.comoment.addr_(m.mean_x - mean_x, m.mean_y - mean_y, alpha=m.count)
        m.mean_x.copy_(mean_x)
        m.mean_y.copy_(mean_y)
        m.count = n


def _norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def all_reduce_batchnorm(model: nn.Module, rows: int, group: ProcessGroup | None) -> None:
    """After every rank reset ``model``'s BatchNorm statistics on its own ``rows`` inputs
    (:func:`ccamerge.transform.reset_batchnorm`), give every rank those of all inputs, in place.

    The single-process reset sets ``running_mean`` / ``running_var`` ``[C]`` to the
    batch-size-weighted means of the per-batch means and unbiased variances (train-mode
    BatchNorm normalises each batch with its own statistics), so the exact reduction is the
    rows-weighted mean of the ranks' values (the pooled variance from counts, means and M2
    would be a different quantity); ``num_batches_tracked`` is summed."""
    norms = _norms(model)
    if group is None or not norms:
        return
    device = module_device(model)
    parts = [torch.full((1,), float(rows), dtype=torch.float64, device=device)]
    for m in norms:
        parts += [m.running_mean.double() * rows, m.running_var.double() * rows,
                  m.num_batches_tracked.double().view(1)]
    total = torch.cat(parts)
    with _collective("all-reducing the BatchNorm statistics", group):
        _dist().all_reduce(total, group=group)
    _set_norms(norms, total)


def _set_norms(norms: Sequence[nn.Module], total: torch.Tensor) -> None:
    rows, offset = float(total[0]), 1
    if rows == 0:
        raise CcamergeError("no rank had inputs for the BatchNorm reset")
    for m in norms:
        c = m.running_mean.numel()
        m.running_mean.copy_(total[offset:offset + c] / rows)
        m.running_var.copy_(total[offset + c:offset + 2 * c] / rows)
        m.num_batches_tracked.fill_(round(float(total[offset + 2 * c])))
        offset += 2 * c + 1


@torch.no_grad()
def reset_batchnorm_sharded(model: nn.Module, x, *, batch_size: int = 256,
                            device: str | torch.device | None = None,
                            group: ProcessGroup | None = None) -> nn.Module:
    """:func:`ccamerge.transform.reset_batchnorm` of ``model`` over inputs ``x`` (a tensor
    ``[B, ...]`` or a data source) on ``device`` (default: the model's) in exact float32. With
    ``group``, each rank passes all of ``x``, runs only its :func:`batch_block` and the results
    are all-reduced, so every rank ends with the single-process reset's statistics. In place;
    the model comes back on its own device, in eval mode."""
    home = module_device(model)
    place = resolve_device(device) if device is not None else home
    rows = shard_source(as_source(x), batch_size, group).map(lambda xb: xb.to(place))
    model.to(place)
    try:
        with exact_float32():
            reset_batchnorm(model, rows, batch_size=batch_size)
        all_reduce_batchnorm(model, len(rows), group)
    finally:
        model.to(home)
    return model.eval()
