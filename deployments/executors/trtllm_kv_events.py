"""Which KV blocks an engine holds, rebuilt from its KV events, in the form the router matches on.

Engine block hashes are opaque (TensorRT-LLM's BlockKeyHasher), so, like Dynamo's KV router, every
stored block is re-hashed from the tokens its event carries with `chain_block_hashes`. A router
hashes a prompt the same way and counts leading matches. Engine hashes are kept only to apply
removals.
"""

from __future__ import annotations

import collections
import hashlib
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def chain_block_hashes(
    token_ids: Sequence[int], tokens_per_block: int, parent_hash: int | None = None
) -> list[int]:
    """64-bit chained hashes of the *full* blocks of `token_ids` (a partial tail is ignored).

    To predict reuse of a prompt, hash `prompt_token_ids[:-1]`: TensorRT-LLM never puts a prompt's
    last token in a block key.
    """
    hashes: list[int] = []
    parent = parent_hash
    for start in range(0, len(token_ids) - tokens_per_block + 1, tokens_per_block):
        block = token_ids[start : start + tokens_per_block]
        data = b"" if parent is None else parent.to_bytes(8, "little")
        data += struct.pack(f"<{len(block)}q", *block)
        parent = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
        hashes.append(parent)
    return hashes


class KvBlockIndex:
    """Bounded map engine block hash -> routing hash, most recently stored last.

    Events for blocks whose parent is unknown (dropped from the engine's event buffer or from this
    bounded index) are skipped: without the parent the prefix chain cannot be re-hashed.
    Threading: `apply` runs on the KV-event thread, readers on the event loop; a lock guards both.
    """

    def __init__(self, *, tokens_per_block: int, max_blocks: int) -> None:
        self._tokens_per_block = tokens_per_block
        self._max_blocks = max_blocks
        self._routing_hash: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.num_events = 0
        self.num_skipped_blocks = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._routing_hash)

    def apply(self, events: Iterable[Any]) -> None:
        """Applies `kv_cache.KVCacheEvent`s in order (dispatching on the data's attributes)."""
        with self._lock:
            for event in events:
                self.num_events += 1
                data = event.data
                if hasattr(data, "num_blocks_per_cache_level"):  # created: a (re)started engine
                    self._routing_hash.clear()
                elif hasattr(data, "blocks"):
                    blocks = [(b.block_hash, [t.token_id for t in b.tokens]) for b in data.blocks]
                    self._store(data.parent_hash, blocks)
                elif hasattr(data, "block_hashes"):
                    self._remove(data.block_hashes)

    def apply_serialized(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Applies the LLM API's events: `KVCacheEventSerializer` dicts, e.g. `{"event_id": 3,
        "data": {"type": "stored", "parent_hash": None, "blocks": [{"block_hash": ..., "tokens":
        [{"token_id": ...}, ...]}, ...]}, "window_size": ...}` (tensorrt_llm/_utils.py)."""
        with self._lock:
            for event in events:
                self.num_events += 1
                data = event.get("data") or {}
                kind = data.get("type")
                if kind == "created":
                    self._routing_hash.clear()
                elif kind == "stored":
                    blocks = [
                        (b["block_hash"], [t["token_id"] for t in b.get("tokens", [])])
                        for b in data.get("blocks", [])
                    ]
                    self._store(data.get("parent_hash"), blocks)
                elif kind == "removed":
                    self._remove(data.get("block_hashes", []))

    def recent_hashes(self, limit: int) -> list[int]:
        """Up to `limit` routing hashes, most recently stored first."""
        with self._lock:
            snapshot = list(self._routing_hash.values())
        return snapshot[::-1][:limit]

    def _remove(self, engine_hashes: Iterable[int]) -> None:
        for engine_hash in engine_hashes:
            self._routing_hash.pop(engine_hash, None)

    def _store(
        self, parent_engine_hash: int | None, blocks: Sequence[tuple[int, list[int]]]
    ) -> None:
        parent: int | None = None
        if parent_engine_hash is not None:
            parent = self._routing_hash.get(parent_engine_hash)
            if parent is None:
                self.num_skipped_blocks += len(blocks)
                return
        for engine_hash, token_ids in blocks:
            if len(token_ids) < self._tokens_per_block:
                break  # partial blocks are never matched by a prefix
            parent = chain_block_hashes(token_ids, self._tokens_per_block, parent)[0]
            self._routing_hash[engine_hash] = parent
            self._routing_hash.move_to_end(engine_hash)
        while len(self._routing_hash) > self._max_blocks:
            self._routing_hash.popitem(last=False)


def routing_stats(
    stats: Any, index: KvBlockIndex, *, tokens_per_block: int, has_kv_events: bool, num_hashes: int
) -> dict[str, Any]:
    """What a KV-aware router needs from a TensorRT-LLM replica (both executors; cheap, loop-safe).

    `kv_block_hashes` are routing hashes (`chain_block_hashes`) of the most recently stored blocks, at most
    `num_hashes`. When `has_kv_events` is False (orchestrator mode, or events disabled) the router must
    predict prefixes itself. `stats` is the executor's `ExecutorStats`.
    """
    return {
        "queue_depth": stats.num_queued_requests,
        "num_active_requests": stats.num_active_requests,
        "kv_cache_usage": stats.kv_cache_usage,
        "prefix_cache_hit_rate": stats.prefix_cache_hit_rate,
        "tokens_per_block": tokens_per_block,
        "has_kv_events": has_kv_events,
        "num_tracked_blocks": len(index),
        "kv_block_hashes": index.recent_hashes(num_hashes),
    }
