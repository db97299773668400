"""The double's paged KV cache: blocks, per-request sequences, reuse by chained hash, KV events.

Follows TensorRT-LLM's reuse rules closely enough for routing tests: full blocks are stored with
chained hashes after the context phase and at completion, reuse matches full blocks of
`prompt[:-1]`, and unreferenced blocks are evicted lowest priority first, then least recently used,
each eviction producing a "removed" event.
"""

from __future__ import annotations

import collections
import hashlib
import math
import struct
from dataclasses import dataclass, field

from ._request import KvCacheRetentionConfig, Request
from ._stats import KvCacheStats
from .kv_cache import (
    KVCacheCreatedData,
    KVCacheRemovedData,
    KVCacheStoredBlockData,
    KVCacheStoredData,
    UniqueToken,
    _EventQueue,
)

DEFAULT_PRIORITY = 35


def block_hash(parent_hash: int | None, token_ids: list[int]) -> int:
    """Chained 64-bit block hash (the engine's own; opaque to routers, like BlockKeyHasher)."""
    data = (parent_hash or 0).to_bytes(8, "little") + struct.pack(f"<{len(token_ids)}I", *token_ids)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


@dataclass(eq=False)
class _Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set while the block is stored for reuse
    priority: int = DEFAULT_PRIORITY
    last_used: int = 0


@dataclass(eq=False)
class RequestState:
    request_id: int
    request: Request
    prompt: list[int]
    max_new_tokens: int
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    blocks: list[_Block] = field(default_factory=list)
    num_stored: int = 0
    reserved: int = 0
    is_cancelled: bool = False
    is_context_done: bool = False
    # KvCacheMetrics of the request, set at admission (kvCacheManager addSequence).
    num_total_blocks: int = 0
    num_new_blocks: int = 0
    num_reused_blocks: int = 0

    @property
    def num_computed_tokens(self) -> int:
        # KV exists for the prompt and every generated token but the newest.
        return len(self.prompt) + max(0, len(self.generated) - 1)


class BlockManager:
    """Paged KV blocks with a reuse table keyed by chained hash, and KV event production."""

    def __init__(
        self,
        num_blocks: int,
        tokens_per_block: int,
        *,
        enable_reuse: bool,
        events: _EventQueue | None,
    ) -> None:
        self.num_blocks = num_blocks
        self.tokens_per_block = tokens_per_block
        self.enable_reuse = enable_reuse
        self._events = events
        self._free: collections.deque[_Block] = collections.deque(
            _Block(i) for i in range(num_blocks)
        )
        self._stored: dict[int, _Block] = {}
        self._reserved = 0
        self._removed: list[int] = []
        self.tick = 0
        self.alloc_total_blocks = 0
        self.alloc_new_blocks = 0
        self.reused_blocks = 0
        self.missed_blocks = 0
        if events is not None:
            events.push(KVCacheCreatedData(num_blocks_per_cache_level=[num_blocks, 0]))

    def num_free(self) -> int:
        return len(self._free) + sum(1 for b in self._stored.values() if b.ref_count == 0)

    def try_admit(self, seq: RequestState) -> bool:
        """Reserve every block the request may need (GUARANTEED_NO_EVICT) and set up its prompt."""
        tpb = self.tokens_per_block
        matched = self._match(seq.prompt) if self.enable_reuse else []
        total_needed = math.ceil((len(seq.prompt) + seq.max_new_tokens) / tpb)
        new_needed = total_needed - len(matched)
        num_idle_matched = sum(1 for b in matched if b.ref_count == 0)
        if new_needed > self.num_free() - num_idle_matched - self._reserved:
            return False
        for block in matched:
            block.ref_count += 1
            block.last_used = self.tick
        seq.blocks = list(matched)
        seq.num_stored = len(matched)
        seq.reserved = new_needed
        self._reserved += new_needed
        num_prompt_blocks = math.ceil(len(seq.prompt) / tpb)
        self.ensure_capacity(seq, len(seq.prompt))
        seq.num_total_blocks = num_prompt_blocks
        seq.num_new_blocks = num_prompt_blocks - len(matched)
        seq.num_reused_blocks = len(matched)
        self.alloc_total_blocks += num_prompt_blocks
        self.alloc_new_blocks += num_prompt_blocks - len(matched)
        self.reused_blocks += len(matched)
        self.missed_blocks += num_prompt_blocks - len(matched)
        return True

    def ensure_capacity(self, seq: RequestState, num_tokens: int) -> None:
        while len(seq.blocks) * self.tokens_per_block < num_tokens:
            block = self._take_free_block()
            block.ref_count = 1
            block.last_used = self.tick
            seq.blocks.append(block)
            if seq.reserved > 0:
                seq.reserved -= 1
                self._reserved -= 1

    def store(self, seq: RequestState) -> None:
        """Make every full block with computed KV reusable; one stored event per chain segment."""
        if not self.enable_reuse:
            return
        tpb = self.tokens_per_block
        tokens = (seq.prompt + seq.generated)[: seq.num_computed_tokens]
        num_full = len(tokens) // tpb
        parent = self._chain_hash(seq, seq.num_stored)
        segment: list[KVCacheStoredBlockData] = []
        segment_parent = parent
        for i in range(seq.num_stored, num_full):
            chunk = tokens[i * tpb : (i + 1) * tpb]
            digest = block_hash(parent, chunk)
            block = seq.blocks[i]
            if digest in self._stored:  # an identical block was stored meanwhile: keep ours private
                self._emit_stored(segment_parent, segment)
                segment, segment_parent = [], digest
            else:
                block.hash = digest
                block.priority = self._priority(seq, i)
                self._stored[digest] = block
                segment.append(
                    KVCacheStoredBlockData(
                        block_hash=digest,
                        tokens=[UniqueToken(t, 0) for t in chunk],
                        lora_id=None,
                        cache_level=0,
                        priority=block.priority,
                    )
                )
            parent = digest
        self._emit_stored(segment_parent, segment)
        seq.num_stored = max(seq.num_stored, num_full)

    def release(self, seq: RequestState) -> None:
        for block in seq.blocks:
            block.ref_count -= 1
            block.last_used = self.tick
            if block.ref_count == 0 and block.hash is None:
                self._free.append(block)
        self._reserved -= seq.reserved
        seq.reserved = 0
        seq.blocks = []

    def flush_events(self) -> None:
        if self._removed and self._events is not None:
            self._events.push(KVCacheRemovedData(block_hashes=self._removed))
        self._removed = []

    def stats(self) -> KvCacheStats:
        num_free = self.num_free()
        lookups = self.reused_blocks + self.missed_blocks
        return KvCacheStats(
            max_num_blocks=self.num_blocks,
            free_num_blocks=num_free,
            used_num_blocks=self.num_blocks - num_free,
            tokens_per_block=self.tokens_per_block,
            alloc_total_blocks=self.alloc_total_blocks,
            alloc_new_blocks=self.alloc_new_blocks,
            reused_blocks=self.reused_blocks,
            missed_blocks=self.missed_blocks,
            cache_hit_rate=self.reused_blocks / lookups if lookups else 0.0,
        )

    # ---- internals ------------------------------------------------------------------------------
    def _match(self, prompt: list[int]) -> list[_Block]:
        """Stored blocks matching full blocks of prompt[:-1]: the last token is never in a key."""
        tpb = self.tokens_per_block
        key_tokens = prompt[:-1]
        matched: list[_Block] = []
        parent: int | None = None
        for i in range(len(key_tokens) // tpb):
            digest = block_hash(parent, key_tokens[i * tpb : (i + 1) * tpb])
            block = self._stored.get(digest)
            if block is None:
                break
            matched.append(block)
            parent = digest
        return matched

    def _chain_hash(self, seq: RequestState, index: int) -> int | None:
        """Hash of block index-1 of the sequence, recomputed (private duplicates have no .hash)."""
        if index == 0:
            return None
        tpb = self.tokens_per_block
        tokens = seq.prompt + seq.generated
        parent: int | None = None
        for i in range(index):
            parent = block_hash(parent, tokens[i * tpb : (i + 1) * tpb])
        return parent

    def _priority(self, seq: RequestState, index: int) -> int:
        retention: KvCacheRetentionConfig | None = seq.request.kv_cache_retention_config
        start, end = index * self.tokens_per_block, (index + 1) * self.tokens_per_block
        if retention is None:
            return DEFAULT_PRIORITY
        priority = retention.decode_retention_priority if end > len(seq.prompt) else None
        for token_range in retention.token_range_retention_configs:
            range_end = token_range.token_end if token_range.token_end is not None else 1 << 62
            if token_range.token_start < end and start < range_end:
                priority = max(priority or 0, token_range.priority)
        return DEFAULT_PRIORITY if priority is None else priority

    def _take_free_block(self) -> _Block:
        if self._free:
            return self._free.popleft()
        idle = [b for b in self._stored.values() if b.ref_count == 0]
        if not idle:
            raise RuntimeError(
                "[TensorRT-LLM][ERROR] no free KV cache block"
            )  # reserved: unreachable
        victim = min(idle, key=lambda b: (b.priority, b.last_used))
        assert victim.hash is not None
        del self._stored[victim.hash]
        self._removed.append(victim.hash)
        victim.hash = None
        victim.priority = DEFAULT_PRIORITY
        return victim

    def _emit_stored(self, parent: int | None, blocks: list[KVCacheStoredBlockData]) -> None:
        if blocks and self._events is not None:
            self._events.push(KVCacheStoredData(parent_hash=parent, blocks=blocks))
