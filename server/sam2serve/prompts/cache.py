"""A thread-safe LRU cache with a byte budget, for image embeddings and the low-res logits of masks.

One budget covers both kinds; the least recently used entry goes first, whatever its kind. Concurrent
misses on one key compute it once: the first caller computes, the others wait for its value.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


V = TypeVar("V", bound=Sized)


class CacheObserver(Protocol):
    """Where the cache reports what happens (Prometheus in the server; nothing by default)."""

    def hit(self, kind: str) -> None: ...
    def miss(self, kind: str) -> None: ...
    def evicted(self, kind: str) -> None: ...
    def size(self, kind: str, entries: int, nbytes: int) -> None: ...


class _Silent:
    def hit(self, kind: str) -> None: ...
    def miss(self, kind: str) -> None: ...
    def evicted(self, kind: str) -> None: ...
    def size(self, kind: str, entries: int, nbytes: int) -> None: ...


@dataclass
class _Entry(Generic[V]):
    kind: str
    value: V
    nbytes: int


class ByteBudgetLRU(Generic[V]):
    """`get` / `put` / `get_or_compute` by key; `kind` labels entries for the observer ("image", "mask")."""

    def __init__(self, budget_bytes: int, observer: CacheObserver | None = None) -> None:
        if budget_bytes < 0:
            raise ValueError(f"the cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._observer = observer or _Silent()
        self._entries: collections.OrderedDict[str, _Entry[V]] = collections.OrderedDict()
        self._pending: dict[str, Future[V]] = {}
        self._bytes: collections.Counter[str] = collections.Counter()
        self._counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(self._bytes.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, key: str, kind: str) -> V | None:
        """The value, now the most recently used; None (a miss) when absent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        (self._observer.hit if entry is not None else self._observer.miss)(kind)
        return entry.value if entry is not None else None

    def put(self, key: str, kind: str, value: V) -> bool:
        """Store `value`, evicting least recently used entries to stay within the budget. A value larger than
        the whole budget is not stored (False)."""
        size = int(value.nbytes)
        evicted: list[str] = []
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._forget(old)
            if size > self.budget_bytes:
                stored = False
            else:
                while self._entries and sum(self._bytes.values()) + size > self.budget_bytes:
                    _, victim = self._entries.popitem(last=False)
                    self._forget(victim)
                    evicted.append(victim.kind)
                self._entries[key] = _Entry(kind, value, size)
                self._bytes[kind] += size
                self._counts[kind] += 1
                stored = True
            sizes = {k: (self._counts[k], self._bytes[k]) for k in {kind, *evicted}}
        for victim_kind in evicted:
            self._observer.evicted(victim_kind)
        for k, (entries, nbytes) in sizes.items():
            self._observer.size(k, entries, nbytes)
        return stored

    def get_or_compute(self, key: str, kind: str, compute: Callable[[], V]) -> tuple[V, bool]:
        """(value, True) from the cache, else (compute(), False) stored; concurrent callers for the same
        missing key wait for the first one's computation instead of repeating it (and count as hits)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            pending = self._pending.get(key) if entry is None else None
            owner = entry is None and pending is None
            if owner:
                pending = self._pending[key] = Future()
        if entry is not None:
            self._observer.hit(kind)
            return entry.value, True
        assert pending is not None
        if not owner:
            value = pending.result()
            self._observer.hit(kind)
            return value, True
        self._observer.miss(kind)
        try:
            value = compute()
        except BaseException as e:
            with self._lock:
                self._pending.pop(key, None)
            pending.set_exception(e)
            raise
        self.put(key, kind, value)  # before the key stops being pending: no window for a second computation
        with self._lock:
            self._pending.pop(key, None)
        pending.set_result(value)
        return value, False

    def _forget(self, entry: _Entry[V]) -> None:
        self._bytes[entry.kind] -= entry.nbytes
        self._counts[entry.kind] -= 1
