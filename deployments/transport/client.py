"""How the Router reaches Engine replicas: the direct channel (`channel.py`), with Serve's handle path
(`handle.py`) as the fallback while no replica has told this process where its channel listens.

On the direct path this class does what Serve's handle did: it ranks replicas with its own `RoutingPolicy`
(sessions stay on the replica holding their KV cache, prompts go where their prefix is cached), keeps at
most `max_ongoing_requests` of this process's requests on each replica, and queues up to
`engine.max_queued_requests` more before refusing with a 503. Membership is Serve's: the request router of
the engine handle publishes every change, and the deployment's routing settings, into the
`ReplicaDirectory` this class reads.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from typing import Any, Protocol

from deployments.errors import OverloadedError
from deployments.messages import GenerateRequest, TokenDelta
from deployments.transport.channel import ChannelConnection
from deployments.transport.handle import HandleStream
from deployments.transport.membership import ReplicaDirectory, replica_directory
from deployments.transport.policy import (
    ReplicaLoad,
    RoutingConfig,
    RoutingPolicy,
    reported_num_requests,
)
from deployments.transport.wire import WIRE_VERSION

logger = logging.getLogger(__name__)

_CONNECT_TIMEOUT_S = 2.0
# A replica whose channel refused a connection is skipped for this long, doubled after each further refusal
# up to the cap (Serve's health check replaces a dead replica; a live one, say behind a firewall, is tried
# again, and each try costs the request that makes it up to the connect timeout).
_UNREACHABLE_FOR_S = 5.0
_MAX_UNREACHABLE_FOR_S = 60.0


class EngineStream(Protocol):
    """One request's deltas, whichever path they take (`ChannelStream` or `HandleStream`).

    `__anext__` raises only `ServingError`s (or StopAsyncIteration); `cancel()` stops the engine request.
    """

    async def __anext__(self) -> TokenDelta: ...

    def cancel(self) -> None: ...


class _Replica:
    """This process's view of one engine replica on the direct path."""

    __slots__ = (
        "address",
        "connecting",
        "connection",
        "num_failed_connects",
        "num_in_flight",
        "replica_id",
        "running",
        "unreachable_until",
    )

    def __init__(self, replica_id: str, address: str, running: Any) -> None:
        self.replica_id = replica_id
        self.address = address
        self.running = running  # Serve's RunningReplica: max_ongoing_requests and routing stats
        self.connection: ChannelConnection | None = None
        self.connecting: asyncio.Future[ChannelConnection] | None = None
        self.num_in_flight = 0
        self.num_failed_connects = 0  # in a row
        self.unreachable_until = 0.0

    @property
    def max_ongoing_requests(self) -> int:
        return int(self.running.max_ongoing_requests)

    def reported_load(self) -> int:
        return reported_num_requests(self.running.routing_stats)


class EngineClient:
    """Opens one engine stream per `GenerateRequest`; `transport="serve_handle"` always uses Serve's path."""

    def __init__(self, handle: Any, *, is_direct: bool, max_queued_requests: int) -> None:
        self._handle = handle  # options(stream=True, _by_reference=False)
        self._max_queued_requests = max_queued_requests
        self._replicas: dict[str, _Replica] = {}
        self._retired: list[_Replica] = []
        self._queue: deque[_Ticket] = deque()
        self._directory: ReplicaDirectory | None = None
        self._reported_versions: set[str | None] = set()
        self._policy: RoutingPolicy | None = None
        self.num_direct_streams = 0
        self.num_handle_streams = 0
        if is_direct:
            self._loop = asyncio.get_running_loop()
            self._directory = replica_directory(handle.app_name, handle.deployment_name)
            self._directory.subscribe(self._on_membership_change)
            self._sync_replicas()

    async def open(self, request: GenerateRequest) -> EngineStream:
        """Starts the request on a replica; raises OverloadedError when this process's queue is full."""
        if self._directory is not None:
            direct = await self._open_direct(request)
            if direct is not None:
                self.num_direct_streams += 1
                return direct
        self.num_handle_streams += 1
        return HandleStream(self._handle, request)

    def stats(self) -> dict[str, int]:
        return {
            "num_direct_streams": self.num_direct_streams,
            "num_handle_streams": self.num_handle_streams,
            "num_direct_replicas": len(self._replicas),
            "num_serve_replicas": 0 if self._directory is None else len(self._directory.replicas),
            "num_queued": len(self._queue),
        }

    # ---- the direct path ------------------------------------------------------------------------------
    async def _open_direct(self, request: GenerateRequest) -> EngineStream | None:
        while True:
            replica = await self._admit(request)
            if replica is None:
                return None
            try:
                connection = await self._connection(replica)
                # From here the stream gives the slot back, when the engine is done with the request.
                return connection.open(request, on_done=functools.partial(self._release, replica))
            except (OSError, asyncio.TimeoutError) as error:
                self._release(replica)
                self._set_unreachable(replica, error)
            except BaseException:
                self._release(replica)  # cancelled while connecting, or the new connection failed
                raise

    async def _admit(self, request: GenerateRequest) -> _Replica | None:
        """A replica with room for one more of this process's requests, counted in; None for Serve's path:
        when no replica has a channel of this router's wire version, or when all that do are full while
        Serve runs others (a rolling upgrade, or replicas still starting) that its path reaches. While all
        are full, requests wait in line: a newcomer never overtakes a waiting request, and a woken request
        that finds no room keeps its place."""
        ticket: _Ticket | None = None
        try:
            while True:
                now = time.monotonic()
                candidates = [r for r in self._replicas.values() if r.unreachable_until <= now]
                if not candidates:
                    return None
                may_try = (ticket is None and not self._queue) or (
                    ticket is not None and ticket.future.done()
                )
                replica = self._choose(candidates, request) if may_try else None
                if replica is not None:
                    replica.num_in_flight += 1
                    policy = self._policy
                    if policy is not None and policy.config.is_affinity:
                        policy.record_routed(
                            replica.replica_id, request.prompt_token_ids, request.session_id
                        )
                    return replica
                if self._has_serve_only_replicas:
                    return None
                if ticket is None:
                    if len(self._queue) >= self._max_queued_requests:
                        raise OverloadedError(
                            "the engine is at capacity; retry shortly", code="engine_overloaded"
                        )
                    ticket = _Ticket()
                    self._queue.append(ticket)
                elif ticket.future.done():
                    # Woken, but the room went elsewhere: wait again, in the same place in line.
                    ticket.future = asyncio.get_running_loop().create_future()
                await ticket.future
        except asyncio.CancelledError:
            if ticket is not None and ticket.future.done() and not ticket.future.cancelled():
                self._remove_ticket(ticket)
                self._wake_one()  # woken, then cancelled: the wake-up goes to the next in line
            raise
        finally:
            if ticket is not None:
                self._remove_ticket(ticket)

    def _choose(self, candidates: list[_Replica], request: GenerateRequest) -> _Replica | None:
        assert self._policy is not None
        by_id = {r.replica_id: r for r in candidates}
        for replica in candidates:
            self._policy.observe(replica.replica_id, replica.running.routing_stats)
        loads = [
            ReplicaLoad(
                r.replica_id, max(r.num_in_flight, r.reported_load()), r.max_ongoing_requests
            )
            for r in candidates
        ]
        ranks = self._policy.rank(
            loads, session_id=request.session_id, prompt_token_ids=request.prompt_token_ids
        )
        # Admission counts only this process's requests, which it knows exactly; ranking also weighs the
        # replica's own (slightly stale) count of every router's requests.
        for rank in [*ranks, list(by_id)]:
            fitting = [
                by_id[i] for i in rank if by_id[i].num_in_flight < by_id[i].max_ongoing_requests
            ]
            if fitting:
                return min(fitting, key=lambda r: r.num_in_flight)
        return None

    async def _connection(self, replica: _Replica) -> ChannelConnection:
        if replica.connection is not None and not replica.connection.is_closed:
            return replica.connection
        if replica.connecting is None:
            replica.connecting = asyncio.ensure_future(self._connect(replica))
        return await asyncio.shield(replica.connecting)

    async def _connect(self, replica: _Replica) -> ChannelConnection:
        try:
            connection = ChannelConnection(replica.address)
            await connection.connect(_CONNECT_TIMEOUT_S)
            replica.connection = connection
            replica.num_failed_connects = 0
            return connection
        finally:
            replica.connecting = None

    def _release(self, replica: _Replica) -> None:
        replica.num_in_flight -= 1
        if replica.num_in_flight == 0 and replica in self._retired:
            self._retired.remove(replica)
            if replica.connection is not None:
                replica.connection.close("the replica left the deployment")
        self._wake_one()

    def _set_unreachable(self, replica: _Replica, error: BaseException) -> None:
        replica.num_failed_connects += 1
        skip_s = min(
            _UNREACHABLE_FOR_S * 2 ** (replica.num_failed_connects - 1), _MAX_UNREACHABLE_FOR_S
        )
        replica.unreachable_until = time.monotonic() + skip_s
        logger.warning(
            "engine replica %s: channel %s unreachable (%s); skipped for %.0f s, using the other replicas, "
            "or Serve's path when none is left",
            replica.replica_id,
            replica.address,
            type(error).__name__,
            skip_s,
        )
        # Waiting requests may go elsewhere now, and may come back when the replica is tried again.
        self._wake_all()
        asyncio.get_running_loop().call_later(skip_s, self._wake_all)

    def _wake_one(self) -> None:
        for ticket in self._queue:
            if not ticket.future.done():
                ticket.future.set_result(None)
                return

    def _wake_all(self) -> None:
        for ticket in self._queue:
            if not ticket.future.done():
                ticket.future.set_result(None)

    def _remove_ticket(self, ticket: _Ticket) -> None:
        try:
            self._queue.remove(ticket)
        except ValueError:
            pass

    def _on_membership_change(self) -> None:
        # Serve calls the request router on this loop (RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0, placement.py);
        # should it run on a thread of its own, the change still reaches this loop safely.
        try:
            is_on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            is_on_loop = False
        if is_on_loop:
            self._sync_replicas()
        else:
            self._loop.call_soon_threadsafe(self._sync_replicas)

    def _sync_replicas(self) -> None:
        """Follows Serve's membership: new replicas with a channel join; a replica Serve stopped routing to
        takes no new request and its connection closes once its last stream ends (a downscale drains, as on
        Serve's path); a replica whose actor died fails its streams at once."""
        assert self._directory is not None
        self._follow_routing_config(self._directory.routing_config)
        current: dict[str, _Replica] = {}
        is_grown = False
        for replica_id, running in self._directory.replicas.items():
            address = ReplicaDirectory.channel_address(running)
            if address is None or not self._speaks_our_wire(running):
                continue
            known = self._replicas.get(replica_id)
            if known is not None and known.address == address:
                known.running = running
                current[replica_id] = known
            else:
                current[replica_id] = _Replica(replica_id, address, running)
                is_grown = True
        for replica_id, replica in self._replicas.items():
            if current.get(replica_id) is replica:
                continue
            if replica.num_in_flight and replica_id not in self._directory.died:
                self._retired.append(replica)
            elif replica.connection is not None:
                replica.connection.close("the replica left the deployment")
        self._replicas = current
        if self._policy is not None:
            self._policy.retain(current)
        if is_grown:
            self._wake_all()  # new replicas have room

    def _follow_routing_config(self, config: RoutingConfig | None) -> None:
        """This client's own policy, built from the deployment's routing settings (Serve's router has its
        own: each predicts the prefixes it routed; sessions land alike, since the ring is the same)."""
        if config is not None and (self._policy is None or self._policy.config != config):
            self._policy = RoutingPolicy(config)

    @property
    def _has_serve_only_replicas(self) -> bool:
        """Serve runs replicas the channel cannot reach: none announced yet, or another wire version."""
        return self._directory is not None and len(self._directory.replicas) > len(self._replicas)

    def _speaks_our_wire(self, running: Any) -> bool:
        version = ReplicaDirectory.wire_version(running)
        if version == WIRE_VERSION:
            return True
        if version not in self._reported_versions:  # once per version, not per membership update
            self._reported_versions.add(version)
            logger.warning(
                "engine replica %s speaks channel wire %s, this router %s: it is reached through Serve's "
                "handle path",
                running.replica_id.unique_id,
                version,
                WIRE_VERSION,
            )
        return False


class _Ticket:
    """A request's place in line while every replica is full."""

    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
