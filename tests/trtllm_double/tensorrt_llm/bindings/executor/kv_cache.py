"""`tensorrt_llm.bindings.executor.kv_cache`: KV-cache event classes and the event manager.

Read-only data classes as bound in nanobind/executor/bindings.cpp@a35c38f3 (reference §2.3-2.4). The
manager drains a bounded queue that drops the oldest events when full (kvCacheEventManager.cpp).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class UniqueToken:
    token_id: int
    token_extra_id: int = 0


@dataclass(frozen=True)
class KVCacheStoredBlockData:
    block_hash: int
    tokens: list[UniqueToken]
    lora_id: int | None
    cache_level: int
    priority: int


@dataclass(frozen=True)
class KVCacheStoredData:
    parent_hash: int | None
    blocks: list[KVCacheStoredBlockData]


@dataclass(frozen=True)
class KVCacheRemovedData:
    block_hashes: list[int]


@dataclass(frozen=True)
class KVCacheCreatedData:
    num_blocks_per_cache_level: list[int]


@dataclass(frozen=True)
class KVCacheEventDiffInt:
    old_value: int
    new_value: int


@dataclass(frozen=True)
class KVCacheUpdatedData:
    block_hash: int
    cache_level: KVCacheEventDiffInt | None = None
    priority: KVCacheEventDiffInt | None = None


EventData = KVCacheCreatedData | KVCacheStoredData | KVCacheRemovedData | KVCacheUpdatedData


@dataclass(frozen=True)
class KVCacheEvent:
    event_id: int
    data: EventData
    window_size: int
    attention_dp_rank: int | None = None


@dataclass
class _EventQueue:
    """Engine side of the manager: bounded, oldest dropped first, event ids strictly increasing."""

    max_size: int
    window_size: int
    _events: collections.deque[KVCacheEvent] = field(default_factory=collections.deque)
    _next_id: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition)
    num_dropped: int = 0

    def push(self, data: EventData) -> None:
        with self._cond:
            self._events.append(KVCacheEvent(self._next_id, data, self.window_size))
            self._next_id += 1
            while len(self._events) > self.max_size:
                self._events.popleft()
                self.num_dropped += 1
            self._cond.notify_all()

    def drain(self, timeout_s: float | None, is_shut_down: threading.Event) -> list[KVCacheEvent]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while not self._events and not is_shut_down.is_set():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._cond.wait(0.05 if remaining is None else min(remaining, 0.05))
            events = list(self._events)
            self._events.clear()
            return events


class KVCacheEventManager:
    """Without an event buffer (event_buffer_max_size == 0) every call returns [] immediately."""

    def __init__(self, queue: _EventQueue | None, is_shut_down: threading.Event) -> None:
        self._queue = queue
        self._is_shut_down = is_shut_down

    def get_latest_events(self, timeout_ms: float | None = None) -> list[KVCacheEvent]:
        """`timeout_ms` is milliseconds as a float (ints convert); None blocks until events."""
        if timeout_ms is not None and (
            not isinstance(timeout_ms, (int, float)) or isinstance(timeout_ms, bool)
        ):
            raise TypeError("get_latest_events(): incompatible function arguments")
        if self._queue is None:
            return []
        timeout_s = None if timeout_ms is None else max(0.0, float(timeout_ms)) / 1000.0
        return self._queue.drain(timeout_s, self._is_shut_down)
