"""Process-wide caches bounded in bytes, not entries (no ``st.*``).

A :class:`Memo` is a thread-safe LRU whose entries are weighed by :func:`nbytes`: the bytes of the
tensors and arrays a value holds (a model weighs its state dict, a replayed archive also its
compiled copy). Putting a value evicts the least recently used entries until everything fits;
a value larger than the whole budget is not kept (``put`` returns False) and earlier entries
stay. :func:`cached` turns a function into a cached one keyed like ``st.cache_data`` (every
argument whose name does not start with ``_``), handing out deep copies unless ``share``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

MISSING = object()
MAX_DEPTH = 8  # containers nested deeper than this are not weighed further


def nbytes(value, _seen: set | None = None, _depth: int = 0) -> int:
    """Bytes held by the tensors, arrays, strings and bytes inside ``value`` (models: their
    state dict and a replayed archive's ``script``; containers, dataclasses and plain objects:
    their parts), each storage counted once."""
    seen = set() if _seen is None else _seen
    if isinstance(value, torch.Tensor):
        return _storage_bytes(value, seen)
    if id(value) in seen or _depth > MAX_DEPTH:
        return 0
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, str | bytes | bytearray):
        return len(value)
    return sum(nbytes(part, seen, _depth + 1) for part in _parts(value))


def _storage_bytes(tensor: torch.Tensor, seen: set) -> int:
    if tensor.device.type == "meta":
        return 0
    storage = tensor.untyped_storage()
    key = ("storage", storage.data_ptr())
    if key in seen:
        return 0
    seen.add(key)
    return int(storage.nbytes())


def _parts(value) -> list:
    """What :func:`nbytes` weighs inside ``value``."""
    if isinstance(value, nn.Module | torch.jit.ScriptModule):
        script = getattr(value, "script", None)
        return [*value.state_dict().values(), *([script] if script is not None else [])]
    if isinstance(value, dict):
        return [*value.keys(), *value.values()]
    if isinstance(value, list | tuple | set | frozenset):
        return list(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [getattr(value, f.name) for f in dataclasses.fields(value)]
    return list(vars(value).values()) if hasattr(value, "__dict__") else []


class Memo:
    """A thread-safe LRU holding at most ``max_bytes`` (weighed by :func:`nbytes`)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._bytes = 0

    @property
    def bytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def get(self, key: str, default=None):
        """The value under ``key`` (now the most recently used), else ``default``."""
        with self._lock:
            if key not in self._items:
                return default
            self._items.move_to_end(key)
            return self._items[key][0]

    def put(self, key: str, value) -> bool:
        """Keep ``value`` under ``key``, evicting the oldest entries until it fits; a value over
        the whole budget is not kept (False), and nothing else is evicted for it."""
        size = nbytes(value)
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            if size > self.max_bytes:
                return False
            while self._items and self._bytes + size > self.max_bytes:
                self._bytes -= self._items.popitem(last=False)[1][1]
            self._items[key] = (value, size)
            self._bytes += size
        return True

    def clear(self) -> None:
        """Forget every entry."""
        with self._lock:
            self._items.clear()
            self._bytes = 0


def key(*parts) -> str:
    """A cache key from JSON-able parts (anything else by its ``str``)."""
    return json.dumps(parts, sort_keys=True, default=str)


def cached(store: Callable[[], Memo], *, share: bool = False):
    """Decorator: cache a function's results in ``store()``, keyed by its name and every
    argument whose name does not start with ``_`` (like ``st.cache_data``); hits are deep copies
    unless ``share`` (read-only objects such as loaded models). Exceptions are not cached."""
    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            named = {k: v for k, v in bound.arguments.items() if not k.startswith("_")}
            cache_key = key(fn.__module__, fn.__qualname__, named)
            value = store().get(cache_key, MISSING)
            if value is MISSING:
                value = fn(*args, **kwargs)
                store().put(cache_key, value)
            return value if share else copy.deepcopy(value)
        return call
    return wrap
