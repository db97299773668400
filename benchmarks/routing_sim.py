"""Routing of multi-turn sessions over many engine replicas, simulated in virtual time on one CPU.

The router ranks replicas with the real `deployments.transport.policy.RoutingPolicy`; each replica is an
`engine_model.EngineModel`: a step model of an in-flight batching engine (chunked prefill under a token
budget, decode steps, costs fit to TensorRT-LLM's published figures) around the emulator's own prefix cache
model (`deployments.executors.prefix_cache.PrefixCache`). One heap of events, ties broken by insertion order,
and seeded draws make a run deterministic. `benchmarks/bench_routing_sim.py` runs and reports it.
"""

from __future__ import annotations

import array
import collections
import functools
import heapq
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from benchmarks.engine_model import EngineModel, SimRequest, StepCost
from deployments.config import TrtllmConfig
from deployments.executors.prefix_cache import PrefixCache, num_leading_blocks
from deployments.transport.policy import ReplicaLoad, RoutingConfig, RoutingPolicy

POLICIES = ("session", "pow2", "prefix", "kv_events", "kv_reports")
POLICY_LABELS = {
    "session": "session affinity",
    "pow2": "power of two",
    "prefix": "prefix prediction",
    "kv_events": "KV events, oracle",
    "kv_reports": "KV events, reported",
}


@dataclass(frozen=True)
class SimConfig:
    """The workload, the fleet, and the engine model of one simulation."""

    num_replicas: int = 32
    num_sessions: int = 1000
    num_turns: int = 8
    system_tokens: tuple[int, int] = (1000, 4000)  # per session, uniform
    turn_tokens: tuple[int, int] = (200, 500)  # new user tokens per turn, uniform
    output_tokens: tuple[int, int] = (32, 256)  # per turn, uniform
    think_time_s: float = 5.0  # mean of an exponential pause after each answer
    arrival_window_s: float = 60.0  # sessions start uniformly within it
    num_kv_blocks: int = 16384  # per replica (the emulator's default)
    tokens_per_block: int = 32
    max_batch_size: int = 256  # running requests per replica
    max_num_tokens: int = 8192  # tokens per step (TensorRT-LLM's default max_num_tokens)
    max_ongoing_requests: int = 256  # what the router may send a replica (the Engine's default)
    load_epsilon: float = RoutingConfig().load_epsilon  # bounded load of session affinity
    load_slack: int = RoutingConfig().load_slack  # its absolute slack, in requests
    routing_stats_period_s: float = (
        1.0  # how often Serve polls replicas' routing stats (its default)
    )
    routing_block_hashes: int = (
        TrtllmConfig().routing_block_hashes
    )  # newest blocks a report carries
    is_step_by_step: bool = False  # one event per decode step: slower, same timings (for tests)
    gpu: str = "h200"
    vocab_size: int = 32000
    seed: int = 0


# A unit test's workload (well under a second per policy), still large enough for routing to matter.
TINY = SimConfig(
    num_replicas=8,
    num_sessions=48,
    num_turns=4,
    system_tokens=(256, 1024),
    turn_tokens=(64, 160),
    output_tokens=(8, 32),
    think_time_s=1.0,
    arrival_window_s=5.0,
    num_kv_blocks=4096,
    tokens_per_block=16,
)


@dataclass(frozen=True)
class SessionPlan:
    """One conversation, drawn before any policy runs so that every policy serves the same workload."""

    session_id: str
    start_s: float
    num_system_tokens: int
    num_turn_tokens: tuple[int, ...]
    num_output_tokens: tuple[int, ...]
    think_s: tuple[float, ...]
    token_seed: int  # the session's own token ids, drawn in turn order whatever the policy


def plan_sessions(config: SimConfig) -> list[SessionPlan]:
    rng = random.Random(config.seed)
    plans = []
    for index in range(config.num_sessions):
        turns = range(config.num_turns)
        plans.append(
            SessionPlan(
                session_id=f"session-{index}",
                start_s=rng.uniform(0, config.arrival_window_s),
                num_system_tokens=rng.randint(*config.system_tokens),
                num_turn_tokens=tuple(rng.randint(*config.turn_tokens) for _ in turns),
                num_output_tokens=tuple(rng.randint(*config.output_tokens) for _ in turns),
                think_s=tuple(rng.expovariate(1 / config.think_time_s) for _ in turns),
                token_seed=rng.getrandbits(64),
            )
        )
    return plans


class KvEventIndex:
    """One replica's cache as its KV events describe it, rebuilt only from the stored/removed events, in
    storage order (like `executors.trtllm_kv_events.KvBlockIndex`: a reused block is not stored again)."""

    def __init__(self) -> None:
        self.block_hashes: dict[int, None] = {}

    def on_stored(self, block_hashes: list[int]) -> None:
        self.block_hashes.update(dict.fromkeys(block_hashes))

    def on_removed(self, block_hashes: list[int]) -> None:
        for block_hash in block_hashes:
            del self.block_hashes[block_hash]

    def match(self, block_hashes: Sequence[int]) -> int:
        return num_leading_blocks(self.block_hashes, block_hashes)

    def recent_hashes(self, limit: int) -> list[int]:
        """What a TensorRT-LLM replica reports in `routing_stats()`: the last `limit` stored, newest first."""
        return list(itertools.islice(reversed(self.block_hashes), limit))


class KvEventRoutingPolicy(RoutingPolicy):
    """`RoutingPolicy`'s prefix ranking, matched against every block each replica holds at the moment of the
    decision (an oracle: the deployable path, `observe` of periodic reports, is the `kv_reports` policy)."""

    def __init__(
        self, indexes: dict[str, KvEventIndex], config: RoutingConfig, rng: random.Random
    ) -> None:
        super().__init__(config, rng=rng)
        self._indexes = indexes

    def _match(self, replica_id: str, block_hashes: Sequence[int]) -> int:
        return self._indexes[replica_id].match(block_hashes)


@dataclass
class PolicyRun:
    """What one policy did to the workload: every request, and per-replica totals."""

    policy: str
    requests: list[SimRequest]
    num_served: dict[str, int]
    busy_s: dict[str, float]
    num_owned_sessions: dict[str, int]
    num_spilled: int
    num_router_queued: int
    num_evicted_blocks: int
    end_s: float


class Simulation:
    """Runs one policy over the planned sessions; `run` returns a `PolicyRun`."""

    def __init__(self, config: SimConfig, policy: str, plans: Sequence[SessionPlan]) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}: one of {POLICIES}")
        self.config = config
        self.policy_name = policy
        self._plans = plans
        cost = StepCost.published(config.gpu)
        self.replica_ids = [f"replica-{i:02d}" for i in range(config.num_replicas)]
        self.indexes = {replica_id: KvEventIndex() for replica_id in self.replica_ids}
        self.engines = {
            replica_id: EngineModel(
                replica_id,
                PrefixCache(
                    config.num_kv_blocks, config.tokens_per_block, self.indexes[replica_id]
                ),
                cost,
                max_batch_size=config.max_batch_size,
                max_num_tokens=config.max_num_tokens,
                is_step_by_step=config.is_step_by_step,
            )
            for replica_id in self.replica_ids
        }
        routing = RoutingConfig(
            block_size=config.tokens_per_block,
            load_epsilon=config.load_epsilon,
            load_slack=config.load_slack,
            is_affinity=policy != "pow2",
        )
        # The slack only changes session affinity; the other policies keep their seeds.
        slack = f"-{config.load_slack}" if config.load_slack and policy == "session" else ""
        rng = random.Random(f"{config.seed}-{policy}-{config.load_epsilon}{slack}")
        self.policy: RoutingPolicy = (
            KvEventRoutingPolicy(self.indexes, routing, rng)
            if policy == "kv_events"
            else RoutingPolicy(routing, rng=rng)
        )
        self._events: list[tuple[float, int, Callable[[float], None]]] = []
        self._num_events = 0
        self._router_queue: collections.deque[SimRequest] = collections.deque()
        self._num_router_queued = 0
        self._num_spilled = 0
        self._requests: list[SimRequest] = []
        self._num_sessions_left = len(plans)
        # Per session: its token ids so far and their cache keys (the same on every replica).
        self._tokens: list[list[int]] = [[] for _ in plans]
        self._hashes: list[list[int]] = [[] for _ in plans]
        self._streams = [random.Random(plan.token_seed) for plan in plans]
        self._block_hashes = self.engines[self.replica_ids[0]].cache.block_hashes

    def run(self) -> PolicyRun:
        for index, plan in enumerate(self._plans):
            self._at(plan.start_s, functools.partial(self._start_turn, index, 0))
        if self.policy_name == "kv_reports":
            self._at(0.0, self._report_kv_blocks)
        now = 0.0
        while self._events:
            now, _, action = heapq.heappop(self._events)
            action(now)
        owners = collections.Counter(
            self.policy.session_order(self.replica_ids, plan.session_id)[0] for plan in self._plans
        )
        return PolicyRun(
            policy=self.policy_name,
            requests=self._requests,
            num_served={r: e.num_served for r, e in self.engines.items()},
            busy_s={r: e.busy_s for r, e in self.engines.items()},
            num_owned_sessions={r: owners.get(r, 0) for r in self.replica_ids},
            num_spilled=self._num_spilled,
            num_router_queued=self._num_router_queued,
            num_evicted_blocks=sum(e.cache.num_evicted_blocks for e in self.engines.values()),
            end_s=now,
        )

    # ---- sessions ------------------------------------------------------------------------------------
    def _start_turn(self, index: int, turn: int, now: float) -> None:
        plan = self._plans[index]
        stream = self._streams[index]
        vocab = self.config.vocab_size
        tokens = self._tokens[index]
        num_new = plan.num_turn_tokens[turn] + (plan.num_system_tokens if turn == 0 else 0)
        # Chained keys make a previous turn's blocks the most any replica can hold of this prompt.
        num_reusable = len(self._hashes[index]) * self.config.tokens_per_block
        tokens.extend(_token_ids(stream, num_new, vocab))
        prompt_token_ids = list(tokens)
        block_hashes = self._block_hashes(prompt_token_ids, known=self._hashes[index])
        output_token_ids = _token_ids(stream, plan.num_output_tokens[turn], vocab)
        request = SimRequest(
            request_id=f"{plan.session_id}-turn-{turn}",
            session_index=index,
            turn=turn,
            prompt_token_ids=prompt_token_ids,
            block_hashes=block_hashes,
            output_token_ids=output_token_ids,
            arrival_s=now,
            num_reusable_tokens=num_reusable,
        )
        self._requests.append(request)
        self._route(request, now)

    def _end_turn(self, request: SimRequest, now: float) -> None:
        index = request.session_index
        tokens = self._tokens[index]
        tokens.extend(request.output_token_ids)
        self._hashes[index] = self._block_hashes(tokens, known=request.block_hashes)
        turn = request.turn + 1
        if turn < self.config.num_turns:
            think_s = self._plans[index].think_s[request.turn]
            self._at(now + think_s, functools.partial(self._start_turn, index, turn))
        else:
            self._num_sessions_left -= 1

    def _report_kv_blocks(self, now: float) -> None:
        """Serve's periodic `record_routing_stats` poll, as a TensorRT-LLM Engine answers it."""
        for replica_id, index in self.indexes.items():
            hashes = index.recent_hashes(self.config.routing_block_hashes)
            kv_blocks = {"has_kv_events": True, "kv_block_hashes": hashes}
            self.policy.observe(replica_id, {"kv_blocks": kv_blocks})
        if self._num_sessions_left:
            self._at(now + self.config.routing_stats_period_s, self._report_kv_blocks)

    # ---- the router ----------------------------------------------------------------------------------
    def _route(self, request: SimRequest, now: float) -> None:
        """Serve's choice over the policy's ranks: the least loaded non-full replica of the first rank that
        has one; with every replica full the request waits in the router's queue."""
        loads = [
            ReplicaLoad(r, self.engines[r].num_ongoing_requests, self.config.max_ongoing_requests)
            for r in self.replica_ids
        ]
        session_id = (
            self._plans[request.session_index].session_id if self.policy_name == "session" else None
        )
        ranks = self.policy.rank(
            loads, session_id=session_id, prompt_token_ids=request.prompt_token_ids
        )
        by_id = {load.replica_id: load for load in loads}
        for rank in ranks:
            fitting = [by_id[r] for r in rank if not by_id[r].is_full]
            if fitting:
                chosen = min(fitting, key=lambda load: load.num_ongoing_requests).replica_id
                break
        else:
            self._router_queue.append(request)
            self._num_router_queued += 1
            return
        if (
            session_id is not None
            and chosen != self.policy.session_order(self.replica_ids, session_id)[0]
        ):
            self._num_spilled += 1
        if self.policy_name in ("prefix", "kv_reports"):
            # Serve's `on_request_routed`: only prefix ranking reads the prediction it feeds.
            self.policy.record_routed(chosen, request.prompt_token_ids)
        engine = self.engines[chosen]
        engine.submit(request)
        if not engine.is_stepping:
            self._step(engine, now)
        else:
            end_s = engine.interrupt(now)
            if end_s is not None:
                self._at_step_end(engine, end_s)

    # ---- engines -------------------------------------------------------------------------------------
    def _step(self, engine: EngineModel, now: float) -> None:
        self._at_step_end(engine, engine.start_step(now))

    def _at_step_end(self, engine: EngineModel, end_s: float) -> None:
        self._at(end_s, functools.partial(self._end_step, engine, engine.version))

    def _end_step(self, engine: EngineModel, version: int, now: float) -> None:
        if version != engine.version:
            return  # a run of steps that was cut short; its new end is another event
        finished = engine.end_step(now)
        for request in finished:
            self._end_turn(request, now)
        if finished and self._router_queue:
            for _ in range(len(self._router_queue)):
                self._route(self._router_queue.popleft(), now)
        if engine.has_work and not engine.is_stepping:
            self._step(engine, now)

    def _at(self, time_s: float, action: Callable[[float], None]) -> None:
        self._num_events += 1
        heapq.heappush(self._events, (time_s, self._num_events, action))


def _token_ids(stream: random.Random, num_tokens: int, vocab_size: int) -> list[int]:
    return [
        token_id % vocab_size for token_id in array.array("I", stream.randbytes(4 * num_tokens))
    ]


def simulate(config: SimConfig, policies: Sequence[str] = POLICIES) -> dict[str, PolicyRun]:
    """Every policy over one planned workload."""
    plans = plan_sessions(config)
    return {policy: Simulation(config, policy, plans).run() for policy in policies}
