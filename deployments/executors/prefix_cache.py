"""A model of an engine's reusable KV blocks: chained block hashes, a capacity in blocks, LRU eviction.

Shared by the emulator engine and the routing simulation (`benchmarks/routing_sim.py`), so both see the
same hits. Blocks are keyed like the router keys prompts (`transport.policy.RoutingPolicy.prompt_block_hashes`):
full blocks of a sequence without its last token, chained, so a hit on block i means the whole prefix
up to block i is cached. A block a running request uses is pinned; only unpinned blocks are evicted,
least recently used first (vLLM's free-block queue; TensorRT-LLM's block reuse evicts the same way).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Sequence
from typing import Protocol

from deployments.executors.trtllm_kv_events import chain_block_hashes


def num_leading_blocks(held: Container[int], block_hashes: Sequence[int]) -> int:
    """How many leading blocks `held` has (chained keys make that a whole-prefix hit)."""
    num_blocks = 0
    for block_hash in block_hashes:
        if block_hash not in held:
            break
        num_blocks += 1
    return num_blocks


class KvEventListener(Protocol):
    """Receives the cache's stored and removed blocks in order, as an engine's KV events would report them."""

    def on_stored(self, block_hashes: list[int]) -> None: ...

    def on_removed(self, block_hashes: list[int]) -> None: ...


class PrefixCache:
    """The reusable KV blocks of one engine replica.

    A request's lifecycle: `acquire` on admission (pins its cached prefix and returns its length),
    `store` once blocks are computed (after prefill, and with the output at the end), `release` when it
    ends. Running requests' blocks count against `num_blocks`; a block that finds no room (every block
    pinned) is computed but not kept, like an engine that cannot reuse it. Partial blocks are never kept.

    Threading: not thread-safe; the emulator calls it from its one event loop.
    """

    def __init__(
        self, num_blocks: int, tokens_per_block: int, listener: KvEventListener | None = None
    ) -> None:
        if num_blocks < 1 or tokens_per_block < 1:
            raise ValueError(
                f"num_blocks and tokens_per_block must be >= 1: {num_blocks}, {tokens_per_block}"
            )
        self.num_blocks = num_blocks
        self.tokens_per_block = tokens_per_block
        self._listener = listener
        self._num_refs: dict[int, int] = {}  # every held block -> requests pinning it
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unpinned blocks, LRU first
        self._pinned_by: dict[str, list[int]] = {}
        self.num_evicted_blocks = 0

    def __len__(self) -> int:
        return len(self._num_refs)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._num_refs

    @property
    def usage(self) -> float:
        return len(self._num_refs) / self.num_blocks

    @property
    def num_pinned_blocks(self) -> int:
        return len(self._num_refs) - len(self._evictable)

    def block_hashes(self, token_ids: Sequence[int], known: Sequence[int] = ()) -> list[int]:
        """Keys of the full blocks of `token_ids[:-1]`; the last token is never in a key (the engine has yet
        to run it). `known` are keys of a prefix of the same sequence (a previous turn): only the rest is
        hashed, which keeps hashing linear over a conversation."""
        num_blocks = (len(token_ids) - 1) // self.tokens_per_block if token_ids else 0
        num_known = min(len(known), num_blocks)
        start = num_known * self.tokens_per_block
        end = num_blocks * self.tokens_per_block
        parent = known[num_known - 1] if num_known else None
        return [
            *known[:num_known],
            *chain_block_hashes(token_ids[start:end], self.tokens_per_block, parent),
        ]

    def match(self, block_hashes: Sequence[int]) -> int:
        """How many leading blocks are held (no side effect)."""
        return num_leading_blocks(self._num_refs, block_hashes)

    def acquire(self, request_id: str, block_hashes: Sequence[int]) -> int:
        """Pins the cached leading blocks of a new request; returns how many prompt tokens they cover.

        Args:
            request_id: unique among running requests.
            block_hashes: the prompt's keys (`block_hashes(prompt_token_ids)`).
        """
        if request_id in self._pinned_by:
            raise ValueError(f"request {request_id!r} already holds blocks")
        num_cached_blocks = self.match(block_hashes)
        pinned = list(block_hashes[:num_cached_blocks])
        for block_hash in pinned:
            self._pin(block_hash)
        self._pinned_by[request_id] = pinned
        return num_cached_blocks * self.tokens_per_block

    def store(self, request_id: str, block_hashes: Sequence[int]) -> int:
        """The request has computed these blocks (a chain extending what it pinned): keep them for reuse,
        pinned until `release`, evicting least recently used unpinned blocks for room. Returns how many
        leading blocks of the chain are held afterwards."""
        pinned = self._pinned_by[request_id]
        stored: list[int] = []
        num_held = len(pinned)
        for block_hash in block_hashes[len(pinned) :]:
            if block_hash in self._num_refs:
                self._pin(block_hash)  # computed meanwhile by another request: share it
            elif len(self._num_refs) < self.num_blocks or self._evict_one():
                self._num_refs[block_hash] = 1
                stored.append(block_hash)
            else:
                break  # no room: the rest of the chain cannot be kept without this block
            pinned.append(block_hash)
            num_held += 1
        if stored and self._listener is not None:
            self._listener.on_stored(stored)
        return num_held

    def release(self, request_id: str) -> None:
        """Unpins the request's blocks; they stay cached until evicted. No-op for an unknown request."""
        pinned = self._pinned_by.pop(request_id, None)
        if pinned is None:
            return
        # Back to front: a chain's tail becomes evictable before its head, which other requests share
        # (vLLM frees a request's blocks in reverse order for the same reason).
        for block_hash in reversed(pinned):
            self._num_refs[block_hash] -= 1
            if self._num_refs[block_hash] == 0:
                self._evictable[block_hash] = None

    def _pin(self, block_hash: int) -> None:
        self._num_refs[block_hash] += 1
        self._evictable.pop(block_hash, None)

    def _evict_one(self) -> bool:
        if not self._evictable:
            return False
        block_hash, _ = self._evictable.popitem(last=False)
        del self._num_refs[block_hash]
        self.num_evicted_blocks += 1
        if self._listener is not None:
            self._listener.on_removed([block_hash])
        return True
