"""Which Engine replica serves a request: a pure policy, shared by the Router's engine client and Serve's
request router (`serve_router.py`).

Order of preference (`RoutingPolicy.rank`):
1) a request with a `session_id` goes to its owner on a consistent-hash ring, with bounded load
   (Mirrokni, Thorup, Zadimoghaddam 2018): an owner over the bound is skipped for the next replica clockwise,
   and the session returns as soon as the owner is back under it. Every router process builds the same
   ring from the same replica ids, so all proxies and handles agree without shared state;
2) a request without a session goes to the replica whose KV cache shares the longest prefix of chained
   block hashes with the prompt, while queue lengths are balanced: the blocks a replica reports holding
   (TensorRT-LLM's KV events), else the blocks predicted from the prompts routed to it;
3) otherwise power of two choices on load.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import struct
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def _hash64(data: bytes) -> int:
    """A 64-bit hash that is the same in every process (Python's `hash(str)` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def chain_block_hashes(
    token_ids: Sequence[int], block_size: int, parent_hash: int | None = None
) -> list[int]:
    """Chained 64-bit hashes of the *full* blocks of `token_ids`; a partial tail block is ignored.

    Block i hashes (hash of block i-1, block i's tokens), like nano-vllm `BlockManager.compute_hash` and
    vLLM, so equal hashes at position i mean the whole prefix up to block i is equal. Byte-identical to
    `executors.trtllm_kv_events.chain_block_hashes`, so engine KV events can feed the same index.
    """
    hashes: list[int] = []
    parent = parent_hash
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start : start + block_size]
        data = b"" if parent is None else parent.to_bytes(8, "little")
        parent = _hash64(data + struct.pack(f"<{len(block)}q", *block))
        hashes.append(parent)
    return hashes


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """Policy knobs (the `request_router_kwargs` of the Engine deployment)."""

    block_size: int = 32  # TensorRT-LLM's default tokens_per_block
    virtual_nodes: int = 100
    load_epsilon: float = 0.25
    imbalance_threshold: int = 8
    max_prefix_entries: int = 65536
    is_affinity: bool = True  # False: `engine.request_router: power_of_two`, load only
    # Bounded load never sets a replica's capacity below the average plus this many requests
    # (benchmarks/bench_routing_sim.py: with 0, light load moved a third of the turns off their owner).
    load_slack: int = 8

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.virtual_nodes < 1 or self.max_prefix_entries < 1:
            raise ValueError(
                f"block_size, virtual_nodes and max_prefix_entries must be >= 1: {self}"
            )
        if self.load_epsilon < 0 or self.load_slack < 0 or self.imbalance_threshold < 1:
            raise ValueError(
                f"load_epsilon and load_slack must be >= 0 and imbalance_threshold >= 1: {self}"
            )


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """One candidate replica as the policy sees it."""

    replica_id: str
    num_ongoing_requests: int
    max_ongoing_requests: int

    @property
    def is_full(self) -> bool:
        return self.num_ongoing_requests >= self.max_ongoing_requests


class HashRing:
    """A consistent-hash ring with `virtual_nodes` points per replica."""

    def __init__(self, replica_ids: Iterable[str], virtual_nodes: int) -> None:
        self.replica_ids = frozenset(replica_ids)
        points = sorted(
            (_hash64(f"{replica_id}#{i}".encode()), replica_id)
            for replica_id in self.replica_ids
            for i in range(virtual_nodes)
        )
        self._hashes = [point for point, _ in points]
        self._owners = [owner for _, owner in points]

    def walk(self, key: str) -> list[str]:
        """Every replica once, clockwise from `key`'s point: the owner first, then its fallbacks."""
        order: list[str] = []
        seen: set[str] = set()
        start = bisect.bisect_right(self._hashes, _hash64(key.encode()))
        for offset in range(len(self._owners)):
            owner = self._owners[(start + offset) % len(self._owners)]
            if owner not in seen:
                seen.add(owner)
                order.append(owner)
                if len(order) == len(self.replica_ids):
                    break
        return order


class PrefixIndex:
    """The block hashes one replica is predicted to cache: an LRU set capped at `max_entries`."""

    def __init__(self, max_entries: int) -> None:
        self._max_entries = max_entries
        self._hashes: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._hashes)

    def match(self, block_hashes: Sequence[int]) -> int:
        """How many leading blocks are cached (chained hashes make any hit a whole-prefix hit)."""
        num_blocks = 0
        for block_hash in block_hashes:
            if block_hash not in self._hashes:
                break
            num_blocks += 1
        return num_blocks

    def insert(self, block_hashes: Sequence[int]) -> None:
        # Touch the chain back to front: the first blocks end up most recent and are evicted last,
        # as an engine frees a sequence's tail blocks before the prefix other requests share.
        for block_hash in reversed(block_hashes):
            self._hashes[block_hash] = None
            self._hashes.move_to_end(block_hash)
        while len(self._hashes) > self._max_entries:
            self._hashes.popitem(last=False)


# Sessions whose last prompt's block hashes `record_routed` keeps, so that a turn hashes only its new blocks.
# Each holds a reference to that prompt's id list (shared with the request that carried it).
_MAX_SESSION_CHAINS = 1024


class RoutingPolicy:
    """Ranks candidate replicas for one request; holds the ring and one `PrefixIndex` per replica.

    Threading: not thread-safe; Serve calls every router hook on the router's one event loop.
    """

    def __init__(
        self, config: RoutingConfig | None = None, *, rng: random.Random | None = None
    ) -> None:
        self.config = config or RoutingConfig()
        self._rng = rng or random.Random()
        self._ring = HashRing((), self.config.virtual_nodes)
        self._prefixes: dict[str, PrefixIndex] = {}
        # Replicas that report the KV blocks they hold (TensorRT-LLM's KV events): (the reported list,
        # as a set). Their prefix matches come from what they hold, not from what was routed to them.
        self._held: dict[str, tuple[object, frozenset[int]]] = {}
        # session_id -> (its last prompt, that prompt's block hashes), least recently routed first.
        self._session_chains: OrderedDict[str, tuple[Sequence[int], list[int]]] = OrderedDict()

    def observe(self, replica_id: str, routing_stats: Mapping[str, Any]) -> None:
        """Takes in a replica's last routing stats (`Engine.record_routing_stats`, polled by Serve)."""
        kv_blocks = routing_stats.get("kv_blocks")
        if not isinstance(kv_blocks, Mapping) or not kv_blocks.get("has_kv_events"):
            self._held.pop(replica_id, None)
            return
        hashes = kv_blocks.get("kv_block_hashes") or ()
        held = self._held.get(replica_id)
        if held is None or held[0] is not hashes:  # a new report: build its set once
            self._held[replica_id] = (hashes, frozenset(hashes))

    def prompt_block_hashes(self, prompt_token_ids: Sequence[int]) -> list[int]:
        # The last prompt token is never in a cached block key (the engine must run it to sample).
        return chain_block_hashes(prompt_token_ids[:-1], self.config.block_size)

    def rank(
        self,
        replicas: Sequence[ReplicaLoad],
        *,
        session_id: str | None,
        prompt_token_ids: Sequence[int],
        is_first_pass: bool = False,
    ) -> list[list[str]]:
        """Ranks of replica ids, most preferred first; Serve takes the least loaded non-full replica of the
        first rank that has one, and retries with backoff when every rank is full.

        Args:
            replicas: the candidates with their current load (an empty list yields no ranks).
            session_id: the conversation key; None or "" for a request without a session.
            prompt_token_ids: the prompt, for prefix affinity.
            is_first_pass: True on a request's first pass: a session then gets only its first fitting replica,
                so an owner that is slow to answer Serve's queue-length probe (0.1 s deadline, doubled on
                each pass) is asked again rather than the session moving away from its KV cache.
        """
        if not replicas:
            return []
        if not self.config.is_affinity:
            return self._pow2(replicas)
        if session_id:
            ranks = self._rank_session(replicas, session_id)
            return ranks[:1] if is_first_pass else ranks
        loads = [replica.num_ongoing_requests for replica in replicas]
        if max(loads) - min(loads) < self.config.imbalance_threshold:
            block_hashes = self.prompt_block_hashes(prompt_token_ids)
            matches = {r.replica_id: self._match(r.replica_id, block_hashes) for r in replicas}
            best = max(matches.values())
            if best > 0:
                return [
                    [r.replica_id for r in replicas if matches[r.replica_id] == best],
                    *self._pow2(replicas),
                ]
        return self._pow2(replicas)

    def record_routed(
        self, replica_id: str, prompt_token_ids: Sequence[int], session_id: str | None = None
    ) -> None:
        """The replica took the request: it now caches the prompt's blocks (a prediction, not a report;
        replicas that report their blocks are not predicted). With a `session_id`, only the blocks past
        the session's last prompt are hashed, when this prompt continues it."""
        if replica_id in self._held:
            return
        index = self._prefixes.get(replica_id)
        if index is None:
            index = self._prefixes[replica_id] = PrefixIndex(self.config.max_prefix_entries)
        if session_id:
            block_hashes = self._session_block_hashes(session_id, prompt_token_ids)
        else:
            block_hashes = self.prompt_block_hashes(prompt_token_ids)
        index.insert(block_hashes)

    def _session_block_hashes(self, session_id: str, prompt_token_ids: Sequence[int]) -> list[int]:
        """`prompt_block_hashes(prompt_token_ids)`, reusing the hashes of the session's last prompt for the
        blocks this prompt shares with it: a turn's cost grows with its new tokens, not its history."""
        block_size = self.config.block_size
        reused: list[int] = []
        known = self._session_chains.pop(session_id, None)
        if known is not None:
            last_prompt, last_hashes = known
            num_tokens = len(last_hashes) * block_size
            # The same full blocks of prompt[:-1] (a C-speed comparison), or none reused.
            if (
                num_tokens
                and len(prompt_token_ids) > num_tokens
                and prompt_token_ids[:num_tokens] == last_prompt[:num_tokens]
            ):
                reused = last_hashes
        start = len(reused) * block_size
        block_hashes = reused + chain_block_hashes(
            prompt_token_ids[start:-1], block_size, reused[-1] if reused else None
        )
        self._session_chains[session_id] = (prompt_token_ids, block_hashes)
        while len(self._session_chains) > _MAX_SESSION_CHAINS:
            self._session_chains.popitem(last=False)
        return block_hashes

    def retain(self, replica_ids: Iterable[str]) -> None:
        """Forget every replica not in `replica_ids` (the ring follows the candidates in `rank`)."""
        keep = set(replica_ids)
        for replica_id in [r for r in self._prefixes if r not in keep]:
            del self._prefixes[replica_id]
        for replica_id in [r for r in self._held if r not in keep]:
            del self._held[replica_id]

    def forget(self, replica_id: str) -> None:
        self._prefixes.pop(replica_id, None)
        self._held.pop(replica_id, None)

    def num_prefix_entries(self, replica_id: str) -> int:
        index = self._prefixes.get(replica_id)
        return 0 if index is None else len(index)

    def session_order(self, replica_ids: Iterable[str], session_id: str) -> list[str]:
        """The ring walk for a session over these replicas: its owner first, then the clockwise fallbacks."""
        ids = frozenset(replica_ids)
        if ids != self._ring.replica_ids:
            self._ring = HashRing(ids, self.config.virtual_nodes)
        return self._ring.walk(session_id)

    def _rank_session(self, replicas: Sequence[ReplicaLoad], session_id: str) -> list[list[str]]:
        by_id = {r.replica_id: r for r in replicas}
        order = self.session_order(by_id, session_id)
        # Bounded load: with the new request counted, no replica may hold more than
        # ceil((1 + epsilon) * average), nor need hold fewer than ceil(average) + slack; the least
        # loaded replica always fits, so the walk ends. The slack keeps a lightly loaded fleet's
        # sessions home, where a few more requests in a batch cost far less than prefilling a history.
        total = sum(r.num_ongoing_requests for r in replicas) + 1
        average = total / len(replicas)
        capacity = max(
            math.ceil((1 + self.config.load_epsilon) * average),
            math.ceil(average) + self.config.load_slack,
        )
        fits = [
            i for i in order if by_id[i].num_ongoing_requests < capacity and not by_id[i].is_full
        ]
        fitting = set(fits)
        rest = [i for i in order if i not in fitting]  # last resort when our load view is stale
        return [[replica_id] for replica_id in fits + rest]

    def _pow2(self, replicas: Sequence[ReplicaLoad]) -> list[list[str]]:
        pool = [r for r in replicas if not r.is_full] or list(replicas)
        chosen = self._rng.sample(pool, 2) if len(pool) > 1 else pool
        chosen.sort(key=lambda r: r.num_ongoing_requests)
        return [[r.replica_id for r in chosen]]

    def _match(self, replica_id: str, block_hashes: Sequence[int]) -> int:
        held = self._held.get(replica_id)
        if held is not None:
            blocks = held[1]
            return next(
                (i for i, block_hash in enumerate(block_hashes) if block_hash not in blocks),
                len(block_hashes),
            )
        index = self._prefixes.get(replica_id)
        return 0 if index is None else index.match(block_hashes)


def reported_num_requests(routing_stats: Mapping[str, Any]) -> int:
    """An Engine replica's own last count of its requests (every router's), from `Engine.record_routing_stats`."""
    counts = [routing_stats.get("num_active_requests"), routing_stats.get("num_queued_requests")]
    return sum(count for count in counts if isinstance(count, int))
