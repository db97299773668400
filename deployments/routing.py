"""Which Engine replica serves a request: a pure affinity policy, and the thin RequestRouter that calls it.

Order of preference (`RoutingPolicy.rank`):
1) a request with a `session_id` goes to its owner on a consistent-hash ring, with bounded load
   (Mirrokni, Thorup, Zadimoghaddam 2018): an owner over the bound is skipped for the next replica clockwise,
   and the session returns as soon as the owner is back under it. Every router process builds the same
   ring from the same replica ids, so all proxies and handles agree without shared state;
2) a request without a session goes to the replica whose predicted KV cache shares the longest prefix of
   chained block hashes with the prompt, while queue lengths are balanced;
3) otherwise power of two choices on load.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import math
import random
import struct
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

if TYPE_CHECKING:
    from ray.serve._private.replica_result import ReplicaResult  # public, but not in `__all__`


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

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.virtual_nodes < 1 or self.max_prefix_entries < 1:
            raise ValueError(
                f"block_size, virtual_nodes and max_prefix_entries must be >= 1: {self}"
            )
        if self.load_epsilon < 0 or self.imbalance_threshold < 1:
            raise ValueError(f"load_epsilon must be >= 0 and imbalance_threshold >= 1: {self}")


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

    def record_routed(self, replica_id: str, prompt_token_ids: Sequence[int]) -> None:
        """The replica took the request: it now caches the prompt's blocks (a prediction, not a report)."""
        index = self._prefixes.get(replica_id)
        if index is None:
            index = self._prefixes[replica_id] = PrefixIndex(self.config.max_prefix_entries)
        index.insert(self.prompt_block_hashes(prompt_token_ids))

    def retain(self, replica_ids: Iterable[str]) -> None:
        """Forget every replica not in `replica_ids` (the ring follows the candidates in `rank`)."""
        keep = set(replica_ids)
        for replica_id in [r for r in self._prefixes if r not in keep]:
            del self._prefixes[replica_id]

    def forget(self, replica_id: str) -> None:
        self._prefixes.pop(replica_id, None)

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
        # ceil((1 + epsilon) * average); the least loaded replica always fits, so the walk ends.
        total = sum(r.num_ongoing_requests for r in replicas) + 1
        capacity = math.ceil((1 + self.config.load_epsilon) * total / len(replicas))
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
        index = self._prefixes.get(replica_id)
        return 0 if index is None else index.match(block_hashes)


def _request_keys(pending_request: PendingRequest | None) -> tuple[str | None, Sequence[int]]:
    """(session_id, prompt_token_ids) of a pending `Engine.generate(GenerateRequest)` call.

    The session comes from `handle.options(session_id=...)`, else from the GenerateRequest itself.
    Attributes are read duck-typed: this module is cloudpickled into every proxy and handle and should
    not need the rest of `deployments` there.
    """
    if pending_request is None:
        return None, ()
    request = pending_request.args[0] if pending_request.args else None
    prompt_token_ids = getattr(request, "prompt_token_ids", None)
    session_id = pending_request.metadata.session_id or getattr(request, "session_id", None)
    return (
        session_id if isinstance(session_id, str) and session_id else None,
        prompt_token_ids if isinstance(prompt_token_ids, list | tuple) else (),
    )


def reported_num_requests(routing_stats: Mapping[str, Any]) -> int:
    """An Engine replica's own last count of its requests (every router's), from `Engine.record_routing_stats`."""
    counts = [routing_stats.get("num_active_requests"), routing_stats.get("num_queued_requests")]
    return sum(count for count in counts if isinstance(count, int))


class SessionAffinityRouter(RequestRouter):
    """Serve's hooks around `RoutingPolicy`; replicas are keyed by `replica_id.unique_id`.

    No FIFOMixin on purpose: the base router hands a chosen replica to the request it was chosen for
    (matched by internal request id), never to an older queued request of another session.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._policy = RoutingPolicy()
        # Futures of requests already ranked once (see `RoutingPolicy.rank(is_first_pass=...)`); weak, so a
        # request that is cancelled before it is routed leaves nothing behind.
        self._ranked_futures: weakref.WeakSet[asyncio.Future[RunningReplica]] = weakref.WeakSet()

    def initialize_state(self, **kwargs: Any) -> None:
        self._policy = RoutingPolicy(RoutingConfig(**kwargs))

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        is_first_pass = False
        if pending_request is not None:
            # Back off between passes when every rank is full, instead of spinning.
            pending_request.routing_context.should_backoff = True
            is_first_pass = pending_request.future not in self._ranked_futures
            self._ranked_futures.add(pending_request.future)
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        loads = [
            ReplicaLoad(
                unique_id, self._num_ongoing_requests(replica), replica.max_ongoing_requests
            )
            for unique_id, replica in by_id.items()
        ]
        session_id, prompt_token_ids = _request_keys(pending_request)
        ranks = self._policy.rank(
            loads,
            session_id=session_id,
            prompt_token_ids=prompt_token_ids,
            is_first_pass=is_first_pass,
        )
        return [[by_id[unique_id] for unique_id in rank] for rank in ranks]

    def _fulfill_next_pending_request(
        self, replica: RunningReplica, request_metadata: Any = None
    ) -> None:
        """Serve indexes pending requests by internal request id, once per id; but the engine calls of one HTTP
        request (n > 1 choices) share their parent's id, so only the first sibling is indexed and the others
        would wait forever. Hand the replica to the oldest unfulfilled sibling instead (Ray 2.60 internals)."""
        if request_metadata is None or self._get_pending_request_matching_internal_request_id(
            request_metadata
        ):
            super()._fulfill_next_pending_request(replica, request_metadata)
            return
        for pending in self._pending_requests_to_fulfill:
            if (
                not pending.future.done()
                and pending.metadata.internal_request_id == request_metadata.internal_request_id
            ):
                self._cancel_routing_task_for_pending_request(pending)
                self._record_queue_wait_time(pending)
                pending.future.set_result(replica)
                return

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        _, prompt_token_ids = _request_keys(pending_request)
        self._policy.record_routed(replica_id.unique_id, prompt_token_ids)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._policy.retain(replica.replica_id.unique_id for replica in replicas)
        self._publish(replicas=replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._policy.forget(replica_id.unique_id)
        self._publish(removed=replica_id.unique_id)

    def _publish(
        self, replicas: list[RunningReplica] | None = None, removed: str | None = None
    ) -> None:
        """Tells this process's direct channel (engine_client.py) what Serve told this router."""
        try:
            # Imported at call time, by name: this class travels by value (cloudpickle), and a registry
            # reached through its pickled globals would be a private copy no one else sees.
            from deployments.replica_directory import replica_directory
        except ImportError:  # a process without the `deployments` package has no direct channel
            return
        directory = replica_directory(self._deployment_id.app_name, self._deployment_id.name)
        if replicas is not None:
            directory.update(replicas, self._policy)
        if removed is not None:
            directory.remove(removed)

    def _num_ongoing_requests(self, replica: RunningReplica) -> int:
        """The router's live count (sends, completions, replica replies); else the replica's last stats."""
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        if cached is not None:
            return int(cached)
        return reported_num_requests(replica.routing_stats)


_DEFAULTS = RoutingConfig()


def engine_request_router_config(
    *,
    block_size: int = _DEFAULTS.block_size,
    virtual_nodes: int = _DEFAULTS.virtual_nodes,
    load_epsilon: float = _DEFAULTS.load_epsilon,
    imbalance_threshold: int = _DEFAULTS.imbalance_threshold,
    max_prefix_entries: int = _DEFAULTS.max_prefix_entries,
    request_routing_stats_period_s: float = 1.0,
    is_affinity: bool = _DEFAULTS.is_affinity,
) -> RequestRouterConfig:
    """`request_router_config` for the Engine deployment; the kwargs are validated here, once, rather than
    in every proxy and handle that builds the router."""
    config = RoutingConfig(
        block_size,
        virtual_nodes,
        load_epsilon,
        imbalance_threshold,
        max_prefix_entries,
        is_affinity,
    )
    options: dict[str, Any] = {
        "request_router_class": f"{__name__}:{SessionAffinityRouter.__name__}",
        "request_router_kwargs": {
            name: getattr(config, name) for name in RoutingConfig.__dataclass_fields__
        },
        "request_routing_stats_period_s": request_routing_stats_period_s,
    }
    return RequestRouterConfig(**options)
