"""Shepherd on a multi-node Ray cluster of this machine, and what happens to live conversations on it: the
harness behind `bench_multinode.py` and `tests/e2e/test_multinode.py`.

Topology (`emulator_cluster`): a head node (GCS, dashboard, Serve's controller and HTTP proxy, no replicas),
"cpu-N" nodes that host the Router replicas (custom resource `router_node`), "gpu-N" nodes that host one
Engine replica each (custom resource `gpu_node`; the emulator engine stands in for a GPU engine), and a real
`redis-server` for the sessions. Every node is a `ray start` of its own (`cluster.local.multi_node`); the
app goes on with `serve deploy`.

Load (`SessionLoad`): server-side sessions over HTTP, each turn one new user message with the session's id
(the Router keeps the history in Redis), streamed and parsed by `loadgen.OpenAIBackend`. Every turn is kept
with what the client saw, so that a scenario can count the turns that failed, how, and whether the stored
history is exactly the turns that succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.loadgen import OpenAIBackend, RequestRecord
from cluster.local import (
    RayCluster,
    RayNode,
    free_port,
    joined_ray,
    merge,
    multi_node,
    redis_server,
)
from deployments.config import EngineConfig
from deployments.transport.policy import HashRing, RoutingConfig

APP = "shepherd"
MODEL = "shepherd-tiny"
API_KEY = "multinode-key"
ROUTER_RESOURCE, ENGINE_RESOURCE = "router_node", "gpu_node"
STARTUP_TIMEOUT_S = 240.0
STATS_TIMEOUT_S = 60.0  # one Engine.stats() call through Serve's handle


# ---- the cluster and the app ----------------------------------------------------------------------------
def app_args(redis_url: str, cache_dir: str | None, **overrides: Any) -> dict[str, Any]:
    """`args` of the app: the emulator engine pinned to "gpu" nodes, two Routers on "cpu" nodes, Redis."""
    base: dict[str, Any] = {
        "model": {"path": None, "served_model_name": MODEL, "cache_dir": cache_dir},
        "engine": {
            "kind": "emulator",
            "num_cpus_per_replica": 1,
            "custom_resources": {ENGINE_RESOURCE: 1},
            "health_check_period_s": 2,
            # A new version starts its replica before an old one stops (room: a spare gpu node).
            "max_surge_percent": 50,
            "emulator": {"ttft_ms": 20, "itl_ms": 10, "max_batch_size": 64},
        },
        "router": {
            "num_replicas": 2,
            "num_cpus_per_replica": 0.5,
            "custom_resources": {ROUTER_RESOURCE: 1},
            "api_keys": [API_KEY],
        },
        # A turn cut short by a lost Router holds its session's lease until it expires: keep that short.
        "sessions": {"store": {"kind": "redis", "redis_url": redis_url}, "turn_timeout_s": 3},
    }
    args = merge(base, overrides)
    if "autoscaling" not in args["engine"]:
        args["engine"].setdefault("num_replicas", 2)
    return args


def serve_config(args: dict[str, Any], port: int) -> dict[str, Any]:
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {"name": APP, "route_prefix": "/", "import_path": "deployments:build_app", "args": args}
        ],
    }


@dataclass
class EmulatorCluster:
    """The running cluster and app; `deploy` rolls out new `args` as `serve deploy` does."""

    cluster: RayCluster
    redis_url: str
    port: int
    cache_dir: str | None
    args: dict[str, Any] = field(default_factory=dict)
    num_deploys: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def deploy(self, args: dict[str, Any]) -> None:
        """`serve deploy` of the app with `args` (the config is kept in the cluster's workdir)."""
        self.num_deploys += 1
        config = serve_config(args, self.port)
        path = self.cluster.workdir / f"serve_config.v{self.num_deploys}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.cluster.deploy(config)
        self.args = args

    def replicas(self, deployment: str) -> list[dict[str, Any]]:
        return self.cluster.replicas(APP, deployment)

    def replica_ids(self, deployment: str) -> set[str]:
        return {replica["replica_id"] for replica in self.replicas(deployment)}

    def replica_ids_of(self, deployments: Sequence[str]) -> dict[str, set[str]]:
        """`replica_ids` of several deployments, from one look at Serve's status."""
        return {
            name: {replica["replica_id"] for replica in replicas}
            for name, replicas in self.cluster.replicas_of(APP, deployments).items()
        }

    def node_of_replica(self, replica: dict[str, Any]) -> RayNode:
        node = self.cluster.node_of(int(replica["pid"]))
        assert node is not None, (
            f"no node runs replica {replica['replica_id']} (pid {replica['pid']})"
        )
        return node

    def wait_replicas(
        self, deployment: str, count: int, *, timeout_s: float = STARTUP_TIMEOUT_S
    ) -> float:
        """Waits until exactly `count` replicas of `deployment` run and no other is starting or stopping."""

        def settled() -> bool:
            try:
                details = self.cluster.serve_details()["applications"][APP]["deployments"]
            except (KeyError, OSError):
                return False
            states = [r["state"] for r in details.get(deployment, {}).get("replicas", [])]
            return states.count("RUNNING") == count and len(states) == count

        return self.cluster.wait_until(
            settled, timeout_s=timeout_s, what=f"{count} {deployment} replicas running"
        )

    def wait_app_running(self, *, timeout_s: float = STARTUP_TIMEOUT_S) -> float:
        def running() -> bool:
            try:
                return bool(
                    self.cluster.serve_details()["applications"][APP]["status"] == "RUNNING"
                )
            except (KeyError, OSError):
                return False

        return self.cluster.wait_until(running, timeout_s=timeout_s, what="the app running")

    def engine_stats(self, replica_ids: set[str] | None = None) -> dict[str, Any]:
        """`Engine.stats()` of every running Engine replica (or of `replica_ids`, when the caller knows them),
        by replica id (this process joins the cluster as a Ray driver). Serve's handle picks the replica of
        each call, so calls go out until all have answered: one at a time, since calls queued in a handle
        count as load for the Engine's autoscaling. Each call carries a session id that the replica not yet
        heard from owns on the Engine's hash ring, so that the session-affine router sends it there (most of
        the time: its load view may send it elsewhere, and the next call asks again)."""
        from ray import serve

        wanted = set(replica_ids) if replica_ids is not None else self.replica_ids("Engine")
        handle = serve.get_deployment_handle("Engine", app_name=APP)
        found: dict[str, Any] = {}
        for attempt in range(1, 201):
            missing = sorted(wanted - set(found))
            session_id = _session_owned_by(missing[0], wanted) if missing else None
            call = handle.options(session_id=session_id) if session_id else handle
            stats = call.stats.remote().result(timeout_s=STATS_TIMEOUT_S)
            found[stats.replica_id] = stats
            if wanted <= set(found):
                return {replica_id: found[replica_id] for replica_id in wanted}
            if attempt % 10 == 0:  # a replica may have stopped meanwhile
                wanted = self.replica_ids("Engine")
        raise RuntimeError(f"Engine.stats() never reached replicas {wanted - set(found)}")


def _session_owned_by(replica_id: str, replica_ids: set[str]) -> str | None:
    """A session id whose owner on the Routers' hash ring of `replica_ids` is `replica_id`."""
    ring = HashRing(replica_ids, RoutingConfig().virtual_nodes)
    return next(
        (key for i in range(10_000) if ring.walk(key := f"stats-{i}")[0] == replica_id), None
    )


@contextlib.contextmanager
def emulator_cluster(
    *,
    num_engine_nodes: int = 2,
    cache_dir: str | None = None,
    workdir: Path | None = None,
    **overrides: Any,
) -> Iterator[EmulatorCluster]:
    """Redis; a head (Serve's controller and proxy, room for one Router and one Engine replica, as a GPU head
    node would have); a "cpu-1" node for the other Router; `num_engine_nodes` "gpu" nodes with room for one
    Engine replica each; the app deployed and running, and this process a Ray driver of the cluster. The app
    is deployed once the head runs and the other nodes start together meanwhile. Everything is stopped after.

    Every node has room for exactly one replica of a kind, so where replicas run is known: the Routers run on
    the head and on cpu-1 (a rollout stops a Router before it starts its successor: `router.max_surge_percent`
    is 0), and no node runs two Engine replicas.
    """

    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(redis_server(workdir))
        cluster = stack.enter_context(
            multi_node(
                workdir=workdir,
                # Serve's proxy sends every request to a Router on its own node when there is one; here
                # it spreads them over both, as a load balancer in front of a proxy per node would.
                env={"RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"},
                head_num_cpus=2,
                head_resources={ROUTER_RESOURCE: 1, ENGINE_RESOURCE: 1},
            )
        )
        # The app goes on as soon as the head runs: Serve starts what fits there while the other nodes join.
        app = EmulatorCluster(cluster, redis_url, free_port(), cache_dir)
        app.deploy(app_args(redis_url, cache_dir, **overrides))
        cluster.add_nodes(
            {
                "cpu-1": (1, {ROUTER_RESOURCE: 1}),
                **{
                    f"gpu-{index}": (1, {ENGINE_RESOURCE: 1})
                    for index in range(1, num_engine_nodes + 1)
                },
            }
        )
        app.wait_app_running()
        stack.enter_context(joined_ray(cluster.address))
        yield app


# ---- sessions over HTTP ---------------------------------------------------------------------------------
_SESSION_ID: ContextVar[str] = ContextVar("session_id")


class SessionBackend(OpenAIBackend):
    """`OpenAIBackend` for server-side sessions: each turn sends only its new user message and the session's
    id; the Router loads and stores the conversation."""

    def __init__(self, base_url: str, *, max_tokens: int, timeout_s: float = 60) -> None:
        super().__init__(
            base_url,
            MODEL,
            endpoint="chat",
            max_tokens=max_tokens,
            api_key=API_KEY,
            extra_body={"ignore_eos": True},
            timeout_s=timeout_s,
        )
        self._base_url = base_url.rstrip("/")

    def body(
        self, text: str, token_ids: list[int] | None, history: list[dict[str, str]]
    ) -> dict[str, Any]:
        return {**super().body(text, token_ids, []), "session_id": _SESSION_ID.get()}

    async def create_session(self) -> str:
        async with self._session.post(
            f"{self._base_url}/v1/sessions", json={"system_prompt": "Be brief."}
        ) as response:
            response.raise_for_status()
            session_id: str = (await response.json())["id"]
            return session_id

    async def get_session(self, session_id: str) -> dict[str, Any]:
        async with self._session.get(f"{self._base_url}/v1/sessions/{session_id}") as response:
            response.raise_for_status()
            view: dict[str, Any] = await response.json()
            return view

    async def turn(self, session_id: str, text: str) -> RequestRecord:
        record = RequestRecord(start=time.perf_counter())
        token = _SESSION_ID.set(session_id)
        try:
            await self.send(text, None, [], record)
        except (
            Exception
        ) as error:  # a connection the server dropped (a lost Router) is a failed turn
            record.error = f"{type(error).__name__}: {error}"[:200]
        finally:
            _SESSION_ID.reset(token)
        return record


@dataclass(frozen=True)
class SessionTurn:
    """One turn as the client saw it; times on `time.monotonic()`'s clock."""

    session_id: str
    text: str
    record: RequestRecord
    started_at: float
    ended_at: float

    @property
    def is_ok(self) -> bool:
        return self.record.ok

    @property
    def is_cut(self) -> bool:
        """Failed after the stream had started (an in-band error, or a dropped connection)."""
        return not self.record.ok and self.record.num_chunks > 0

    @property
    def status(self) -> str:
        """ "ok", "cut", or what refused it ("HTTP 409", "HTTP 503", an exception name)."""
        if self.is_ok:
            return "ok"
        if self.is_cut:
            return "cut"
        return (self.record.error or "").split(":", 1)[0]


@dataclass(frozen=True)
class HistoryCheck:
    """Stored conversations against the turns the clients saw."""

    num_sessions: int
    num_turns_stored: int
    num_turns_committed: int  # turns the client saw succeed
    num_cut_turns_stored: int  # turns the client saw cut that the Router had committed already
    mismatched: list[str]  # sessions whose stored messages differ from those turns

    @property
    def is_exact(self) -> bool:
        """Every turn a client saw succeed is stored, exactly, and nothing else but committed cut turns."""
        num_expected = self.num_turns_committed + self.num_cut_turns_stored
        return not self.mismatched and self.num_turns_stored == num_expected


class SessionLoad:
    """Multi-turn sessions driven over HTTP; every turn kept (`turns`), in the order they ended."""

    def __init__(self, backend: SessionBackend, session_ids: Sequence[str]) -> None:
        self.backend = backend
        self.session_ids = list(session_ids)
        self.turns: list[SessionTurn] = []
        self._num_sent: dict[str, int] = dict.fromkeys(self.session_ids, 0)

    @classmethod
    async def open(cls, backend: SessionBackend, num_sessions: int) -> SessionLoad:
        session_ids = [await backend.create_session() for _ in range(num_sessions)]
        return cls(backend, session_ids)

    async def turn(self, session_id: str, backend: SessionBackend | None = None) -> SessionTurn:
        """One turn of the session, through `backend` (another max_tokens, say) or the load's own."""
        self._num_sent[session_id] += 1
        text = f"session {session_id[-6:]} turn {self._num_sent[session_id]}: go on"
        started_at = time.monotonic()
        record = await (backend or self.backend).turn(session_id, text)
        turn = SessionTurn(session_id, text, record, started_at, time.monotonic())
        self.turns.append(turn)
        return turn

    async def run(
        self,
        *,
        until: Callable[[], bool],
        think_s: float = 0.0,
        backend: SessionBackend | None = None,
    ) -> None:
        """Every session takes turns, one after another, until `until()` is true; a failed turn is counted and
        the session goes on (a refused turn waits `think_s` at least, as a client retrying would)."""

        async def session(session_id: str) -> None:
            while not until():
                turn = await self.turn(session_id, backend)
                await asyncio.sleep(think_s if turn.is_ok else max(think_s, 0.2))

        await asyncio.gather(*(session(session_id) for session_id in self.session_ids))

    async def one_round(self) -> list[SessionTurn]:
        """One turn of every session, all at once."""
        return list(await asyncio.gather(*(self.turn(sid) for sid in self.session_ids)))

    def since(self, moment: float) -> list[SessionTurn]:
        """Turns started after `moment`."""
        return [turn for turn in self.turns if turn.started_at > moment]

    def spanning(self, start: float, end: float) -> list[SessionTurn]:
        """Turns in flight at some moment between `start` and `end`."""
        return [turn for turn in self.turns if turn.started_at <= end and turn.ended_at > start]

    async def check_histories(self) -> HistoryCheck:
        """Each session's stored messages are its succeeded turns, in order, user text then reply, exactly
        (less the oldest messages it evicted to fit the context window). A turn the client saw cut may be
        stored too: a Router commits a turn before its last bytes reach the client, so losing the Router in
        between cuts a committed turn (a client's retry then continues from it; nothing is lost)."""
        mismatched: list[str] = []
        num_stored = num_committed = num_cut_stored = 0
        for session_id in self.session_ids:
            view = await self.backend.get_session(session_id)
            stored = [(m["role"], m["content"]) for m in view["messages"]]
            stored_texts = {content for role, content in stored if role == "user"}
            turns = [t for t in self.turns if t.session_id == session_id]
            turns.sort(key=lambda t: t.started_at)
            kept = [t for t in turns if t.is_ok or (t.is_cut and t.text in stored_texts)]
            # A cut turn's reply is what the engine wrote, not what the client saw: any text matches.
            expected = [
                message
                for t in kept
                for message in (("user", t.text), ("assistant", t.record.text if t.is_ok else None))
            ][view["num_evicted_messages"] :]
            is_match = len(stored) == len(expected) and all(
                want[0] == got[0] and want[1] in (None, got[1])
                for want, got in zip(expected, stored, strict=True)
            )
            num_stored += int(view["num_turns"])
            num_committed += sum(1 for t in kept if t.is_ok)
            num_cut_stored += sum(1 for t in kept if not t.is_ok)
            if not is_match:
                mismatched.append(session_id)
        return HistoryCheck(
            len(self.session_ids), num_stored, num_committed, num_cut_stored, mismatched
        )


def count_statuses(turns: Sequence[SessionTurn]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for turn in turns:
        counts[turn.status] = counts.get(turn.status, 0) + 1
    return counts


def _stats_period_s(args: dict[str, Any]) -> float:
    """A little over how often each Router hears every Engine replica's load (Serve pulls it every
    `engine.routing_stats_period_s`, give or take 10%, then passes it on)."""
    default_s = EngineConfig.model_fields["routing_stats_period_s"].default
    return float(args["engine"].get("routing_stats_period_s", default_s)) * 1.1 + 0.2


# ---- scenarios ----------------------------------------------------------------------------------------------
@dataclass
class NodeLoss:
    """A node killed under a multi-turn load, and what the sessions saw."""

    node: str
    deployment: str
    num_pids_killed: int
    num_sessions: int
    in_flight: dict[str, int]  # turns in flight while the node was killed, by outcome
    later: dict[str, int]  # turns started once it was dead, by outcome
    num_later_sessions_served: int  # sessions with a successful turn after the kill
    num_streams_on_lost_replica: int  # Engine: its channel streams in flight just before the kill
    recovery_s: float | None  # until Serve runs a replacement (None: no node had room for one)
    history: HistoryCheck
    turns: list[SessionTurn] = field(repr=False, default_factory=list)


async def node_loss(
    app: EmulatorCluster,
    deployment: str,
    *,
    num_sessions: int = 8,
    max_tokens: int = 48,
    num_turns_after: int = 3,
    think_s: float = 0.2,
) -> NodeLoss:
    """Kills the worker node of one `deployment` replica while every session is mid-conversation (for the
    Engine: the replica with the most streams in flight, once it has one), then goes on until every session
    has had `num_turns_after` turns succeed since the kill (or STARTUP_TIMEOUT_S passed) and, where some node
    has room for it, Serve runs a replacement."""
    backend = SessionBackend(app.base_url, max_tokens=max_tokens)
    try:
        load = await SessionLoad.open(backend, num_sessions)
        await load.one_round()
        num_replicas = len(app.replicas(deployment))
        is_done = False
        driving = asyncio.create_task(load.run(until=lambda: is_done, think_s=think_s))
        await asyncio.sleep(1.0)
        replica, num_streams = await asyncio.to_thread(_busiest_replica, app, deployment)
        node = app.node_of_replica(replica)
        has_room = _has_room_for_replacement(app, deployment, node)
        # The node dies somewhere between these two moments (its pids are listed, then all killed).
        kill_started_at = time.monotonic()
        pids = await asyncio.to_thread(app.cluster.remove_node, node.name)
        killed_at = time.monotonic()
        recovery_s = None
        if has_room:
            lost_id = replica["replica_id"]

            def replaced() -> bool:
                running = app.replica_ids(deployment)
                return lost_id not in running and len(running) == num_replicas

            recovery_s = await asyncio.to_thread(
                app.cluster.wait_until, replaced, timeout_s=STARTUP_TIMEOUT_S, what="a replacement"
            )

        def served_enough() -> bool:
            later = load.since(killed_at)
            return all(
                sum(1 for t in later if t.session_id == session_id and t.is_ok) >= num_turns_after
                for session_id in load.session_ids
            )

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not served_enough() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        is_done = True
        await driving
        later = load.since(killed_at)
        return NodeLoss(
            node=node.name,
            deployment=deployment,
            num_pids_killed=len(pids),
            num_sessions=num_sessions,
            in_flight=count_statuses(load.spanning(kill_started_at, killed_at)),
            later=count_statuses(later),
            num_later_sessions_served=len({t.session_id for t in later if t.is_ok}),
            num_streams_on_lost_replica=num_streams,
            recovery_s=None if recovery_s is None else round(recovery_s, 2),
            history=await load.check_histories(),
            turns=load.turns,
        )
    finally:
        await backend.close()


def _busiest_replica(app: EmulatorCluster, deployment: str) -> tuple[dict[str, Any], int]:
    """The replica of `deployment` on a worker node (the head holds the cluster) with the most streams in
    flight, as soon as it has one, and how many (Routers: the first, and 0)."""
    replicas = [r for r in app.replicas(deployment) if app.node_of_replica(r).name != "head"]
    if deployment != "Engine":
        return replicas[0], 0
    for _ in range(50):
        stats = app.engine_stats()
        busiest = max(
            (stats[r["replica_id"]] for r in replicas), key=lambda s: s.num_channel_streams_active
        )
        if busiest.num_channel_streams_active > 0:
            break
        time.sleep(0.1)
    replica = next(r for r in replicas if r["replica_id"] == busiest.replica_id)
    return replica, busiest.num_channel_streams_active


def _has_room_for_replacement(app: EmulatorCluster, deployment: str, lost: RayNode) -> bool:
    """Whether a node other than `lost` advertises the deployment's resource and runs no replica of it."""
    resource = ENGINE_RESOURCE if deployment == "Engine" else ROUTER_RESOURCE
    used = {app.node_of_replica(r).name for r in app.replicas(deployment)}
    return any(
        node.name != lost.name and resource in node.resources and node.name not in used
        for node in app.cluster.nodes.values()
    )


@dataclass
class Rollout:
    """`serve deploy` of new args under a multi-turn load."""

    num_sessions: int
    rollout_s: float  # from `serve deploy` until only new replicas run
    during: dict[str, int]  # turns that ended while old replicas still ran, by outcome
    after: dict[str, int]  # turns started once only new replicas ran
    num_turns_on_new_engines: int  # generate requests the new Engine replicas counted
    is_every_replica_new: bool
    history: HistoryCheck
    turns: list[SessionTurn] = field(repr=False, default_factory=list)


async def rolling_update(
    app: EmulatorCluster,
    new_args: dict[str, Any],
    *,
    num_sessions: int = 8,
    max_tokens: int = 48,
    num_turns_after: int = 2,
    think_s: float = 0.2,
) -> Rollout:
    """Deploys `new_args` while every session keeps talking; waits until every Router and Engine replica is
    new and the counts settle, then until every session has taken `num_turns_after` turns on them."""
    backend = SessionBackend(app.base_url, max_tokens=max_tokens)
    try:
        load = await SessionLoad.open(backend, num_sessions)
        await load.one_round()
        old = app.replica_ids_of(["Router", "Engine"])
        is_done = False
        driving = asyncio.create_task(load.run(until=lambda: is_done, think_s=think_s))
        await asyncio.sleep(1.0)
        deployed_at = time.monotonic()
        await asyncio.to_thread(app.deploy, new_args)

        def only_new() -> bool:
            current = app.replica_ids_of(list(old))
            return all(current[name] and not current[name] & old[name] for name in old)

        await asyncio.to_thread(
            app.cluster.wait_until, only_new, timeout_s=STARTUP_TIMEOUT_S, what="a rollout"
        )
        await asyncio.to_thread(app.wait_app_running)
        done_at = time.monotonic()
        while not all(
            sum(1 for t in load.since(done_at) if t.session_id == sid) >= num_turns_after
            for sid in load.session_ids
        ):
            await asyncio.sleep(0.1)
        is_done = True
        await driving
        new_engines = await asyncio.to_thread(app.engine_stats)
        current = app.replica_ids_of(list(old))
        return Rollout(
            num_sessions=num_sessions,
            rollout_s=round(done_at - deployed_at, 2),
            during=count_statuses([t for t in load.turns if deployed_at < t.ended_at <= done_at]),
            after=count_statuses(load.since(done_at)),
            num_turns_on_new_engines=sum(
                s.executor.num_submitted_requests for s in new_engines.values()
            ),
            is_every_replica_new=all(not current[name] & old[name] for name in old),
            history=await load.check_histories(),
            turns=load.turns,
        )
    finally:
        await backend.close()


@dataclass
class Autoscale:
    """Engine replicas following a burst of sessions up and back down, and where each session was served."""

    num_sessions: int
    replicas: list[int]  # running Engine replicas: before, at the peak, after
    scale_up_s: float  # from the burst until the extra replica runs
    scale_down_s: float  # from the end of the burst until it is gone
    burst: dict[str, int]  # turns of the burst, by outcome
    moved_on_scale_up: int  # sessions served elsewhere than before
    moved_to_new_replica: int  # ... of which to the replica that was added
    moved_on_scale_down: int
    homed_on_removed_replica: int  # sessions whose replica was removed
    moved_although_kept: int  # sessions that moved although their replica stayed
    off_owner: list[int]  # sessions not served by their ring owner: before, at the peak, after
    placement_s: list[float]  # how long placing every session took: before, at the peak, after
    history: HistoryCheck


async def autoscale(
    app: EmulatorCluster,
    *,
    num_sessions: int = 12,
    max_tokens: int = 32,
    burst_max_tokens: int | None = None,
    max_replicas: int = 3,
) -> Autoscale:
    """A burst of sessions (no think time; turns of `burst_max_tokens`, else `max_tokens`) until Serve runs
    `max_replicas` Engine replicas, then idle until it is back to what it ran before. Where each session's turn
    lands is measured three times (before, at the peak, after) with one turn at a time, each attributed by the
    Engine replicas' request counters.

    Longer burst turns hold the engines as busy for fewer requests, which leaves more of a small machine's CPU
    to starting the new replica."""
    backend = SessionBackend(app.base_url, max_tokens=max_tokens)
    burst_backend = SessionBackend(app.base_url, max_tokens=burst_max_tokens or max_tokens)
    try:
        load = await SessionLoad.open(backend, num_sessions)
        num_before = len(app.replicas("Engine"))
        placed_at = time.monotonic()
        homes_before, off_before = await _homes(app, load)
        placement_s = [time.monotonic() - placed_at]
        is_done = False
        burst_at = time.monotonic()
        driving = asyncio.create_task(load.run(until=lambda: is_done, backend=burst_backend))
        scale_up_s = await asyncio.to_thread(app.wait_replicas, "Engine", max_replicas)
        is_done = True
        await driving
        burst = load.since(burst_at)
        idle_at = time.monotonic()
        homes_peak, off_peak = await _homes(app, load)
        placement_s.append(time.monotonic() - idle_at)
        await asyncio.to_thread(app.wait_replicas, "Engine", num_before)
        scale_down_s = time.monotonic() - idle_at
        placed_at = time.monotonic()
        homes_after, off_after = await _homes(app, load)
        placement_s.append(time.monotonic() - placed_at)
        added = set(homes_peak.values()) - set(homes_before.values())
        moved_up = [sid for sid in load.session_ids if homes_peak[sid] != homes_before[sid]]
        kept = set(homes_after.values())
        moved_down = [sid for sid in load.session_ids if homes_after[sid] != homes_peak[sid]]
        return Autoscale(
            num_sessions=num_sessions,
            replicas=[num_before, max_replicas, len(app.replicas("Engine"))],
            scale_up_s=round(scale_up_s, 2),
            scale_down_s=round(scale_down_s, 2),
            burst=count_statuses(burst),
            moved_on_scale_up=len(moved_up),
            moved_to_new_replica=sum(1 for sid in moved_up if homes_peak[sid] in added),
            moved_on_scale_down=len(moved_down),
            homed_on_removed_replica=sum(1 for r in homes_peak.values() if r not in kept),
            moved_although_kept=sum(1 for sid in moved_down if homes_peak[sid] in kept),
            off_owner=[off_before, off_peak, off_after],
            placement_s=[round(seconds, 2) for seconds in placement_s],
            history=await load.check_histories(),
        )
    finally:
        await backend.close()
        await burst_backend.close()


async def _homes(app: EmulatorCluster, load: SessionLoad) -> tuple[dict[str, str], int]:
    """The Engine replica that serves each session's next turn, and how many sessions were served elsewhere
    than by their owner on the hash ring. One turn at a time, each attributed to the replica whose request
    counter it moved.

    A replica reports its load to each Router once per routing-stats period. A report taken during a turn
    makes the replica look busy until the next one, and at this load (one request in the cluster) one request
    is over the bounded-load limit of three replicas, so a session whose owner served the turn just before
    would be sent to the next replica on the ring. So the turns go round the owners (the ring is the Routers'
    own, from the same replica ids), and an owner's next turn waits out that period.
    """
    replica_ids = sorted(app.replica_ids("Engine"))
    ring = HashRing(replica_ids, RoutingConfig().virtual_nodes)
    owners = {session_id: ring.walk(session_id)[0] for session_id in load.session_ids}
    by_owner = [[s for s in load.session_ids if owners[s] == r] for r in replica_ids]
    ordered = [s for group in itertools.zip_longest(*by_owner) for s in group if s is not None]
    homes: dict[str, str] = {}
    last_turn_at: dict[str, float] = {}
    stats_period_s = _stats_period_s(app.args)
    counts = await asyncio.to_thread(_submitted, app, set(replica_ids))
    for session_id in ordered:
        wait_s = last_turn_at.get(owners[session_id], 0.0) + stats_period_s - time.monotonic()
        await asyncio.sleep(max(0.0, wait_s))
        turn = await load.turn(session_id)
        last_turn_at[owners[session_id]] = turn.ended_at
        assert turn.is_ok, f"a turn failed while idle: {turn.record.error}"
        now = await asyncio.to_thread(_submitted, app, set(replica_ids))
        moved = [rid for rid, n in now.items() if n != counts.get(rid, 0)]
        assert len(moved) == 1, f"one turn moved the counters of {moved}"
        homes[session_id], counts = moved[0], now
    still = sorted(await asyncio.to_thread(app.replica_ids, "Engine"))
    assert still == replica_ids, (
        f"Engine replicas changed while sessions were being placed ({replica_ids} -> {still}): "
        "the autoscaler's downscale delay is shorter than one placement round"
    )
    return homes, sum(1 for s in load.session_ids if homes[s] != owners[s])


def _submitted(app: EmulatorCluster, replica_ids: set[str]) -> dict[str, int]:
    return {
        rid: s.executor.num_submitted_requests for rid, s in app.engine_stats(replica_ids).items()
    }


@dataclass
class Throughput:
    """Closed-loop multi-turn sessions: every session takes its turns back to back, all sessions at once."""

    num_engine_replicas: int
    num_sessions: int
    num_turns: int
    duration_s: float
    statuses: dict[str, int]
    num_sessions_completed: int  # sessions whose every turn succeeded
    num_output_tokens: int
    ttft_ms_p50: float

    @property
    def sessions_per_s(self) -> float:
        return self.num_sessions_completed / self.duration_s

    @property
    def tokens_per_s(self) -> float:
        return self.num_output_tokens / self.duration_s


async def throughput(
    app: EmulatorCluster, *, num_sessions: int, num_turns: int, max_tokens: int
) -> Throughput:
    backend = SessionBackend(app.base_url, max_tokens=max_tokens, timeout_s=300)
    try:
        load = await SessionLoad.open(backend, num_sessions)

        async def session(session_id: str) -> None:
            for _ in range(num_turns):
                await load.turn(session_id)

        started = time.monotonic()
        await asyncio.gather(*(session(sid) for sid in load.session_ids))
        duration_s = time.monotonic() - started
        ok = [turn for turn in load.turns if turn.is_ok]
        failed_sessions = {turn.session_id for turn in load.turns if not turn.is_ok}
        ttfts = sorted(turn.record.ttft * 1000 for turn in ok)
        return Throughput(
            num_engine_replicas=len(app.replicas("Engine")),
            num_sessions=num_sessions,
            num_turns=num_turns,
            duration_s=round(duration_s, 3),
            statuses=count_statuses(load.turns),
            num_sessions_completed=num_sessions - len(failed_sessions),
            num_output_tokens=sum(turn.record.num_output_tokens for turn in ok),
            ttft_ms_p50=round(ttfts[len(ttfts) // 2], 1) if ttfts else float("nan"),
        )
    finally:
        await backend.close()
