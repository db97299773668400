"""The Router's EngineClient: it routes over real channels to the replicas Serve announced, with Serve's
admission rules (max ongoing per replica, a bounded queue, then 503), and falls back to Serve's path."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest

from deployments.errors import EngineDead, OverloadedError
from deployments.messages import FinishReason, GenerateRequest, TokenDelta
from deployments.transport.channel import ChannelServer
from deployments.transport.client import EngineClient
from deployments.transport.membership import (
    CHANNEL_METADATA_KEY,
    WIRE_VERSION_METADATA_KEY,
    ReplicaDirectory,
    channel_metadata,
    replica_directory,
)
from deployments.transport.policy import RoutingConfig, RoutingPolicy
from deployments.transport.wire import WIRE_VERSION
from tests.trtllm_support import eventually

T = TypeVar("T")
_apps = itertools.count()


def run(body: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(body(), timeout=30))


def request(request_id: str, session_id: str | None = None) -> GenerateRequest:
    return GenerateRequest(
        request_id=request_id, prompt_token_ids=[1, 2, 3], max_tokens=2, session_id=session_id
    )


class GatedEngine:
    """A replica's `generate`: one token at once, the final one when the test opens the gate."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.request_ids: list[str] = []

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        self.request_ids.append(request.request_id)
        yield TokenDelta([7], num_prompt_tokens=len(request.prompt_token_ids))
        await self.gate.wait()
        yield TokenDelta([8], FinishReason.LENGTH)


class FakeHandle:
    """Serve's handle where the test needs only the fallback call it receives."""

    def __init__(self, app_name: str) -> None:
        self.app_name, self.deployment_name = app_name, "Engine"
        self.calls: list[tuple[str | None, str]] = []
        self._session_id: str | None = None

    def options(self, *, session_id: str) -> FakeHandle:
        handle = FakeHandle(self.app_name)
        handle.calls, handle._session_id = self.calls, session_id
        return handle

    @property
    def generate(self) -> Any:
        return SimpleNamespace(remote=self._remote)

    def _remote(self, request: GenerateRequest) -> Any:
        self.calls.append((self._session_id, request.request_id))
        return SimpleNamespace(cancel=lambda: None)


def running_replica(replica_id: str, address: str | None, max_ongoing: int = 8) -> Any:
    return SimpleNamespace(
        replica_id=SimpleNamespace(unique_id=replica_id),
        replica_metadata=channel_metadata(address, WIRE_VERSION) if address else {},
        max_ongoing_requests=max_ongoing,
        routing_stats={},
    )


async def start_replicas(n: int) -> tuple[list[GatedEngine], list[ChannelServer], list[str]]:
    engines = [GatedEngine() for _ in range(n)]
    servers = [ChannelServer(engine.generate) for engine in engines]
    addresses = [await server.start("127.0.0.1") for server in servers]
    return engines, servers, addresses


def client_for(
    replicas: list[Any], *, max_queued: int = 16
) -> tuple[EngineClient, FakeHandle, Any]:
    handle = FakeHandle(f"app-{next(_apps)}")
    directory = replica_directory(handle.app_name, handle.deployment_name)
    directory.update(replicas, RoutingConfig())
    return EngineClient(handle, is_direct=True, max_queued_requests=max_queued), handle, directory


async def finish(stream: Any) -> list[TokenDelta]:
    deltas = []
    while not deltas or not deltas[-1].is_final:
        deltas.append(await stream.__anext__())
    return deltas


def test_replicas_without_a_channel_leave_requests_to_serves_path_with_their_session() -> None:
    async def body() -> None:
        client, handle, _ = client_for([running_replica("a", None)])
        await client.open(request("r1", session_id="s"))
        await client.open(request("r2"))
        assert handle.calls == [("s", "r1"), (None, "r2")]
        assert client.stats()["num_handle_streams"] == 2

    run(body)


def test_a_replica_of_another_wire_version_is_reached_through_serves_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A rolling upgrade: the old replica (announcing another wire, or none, as releases before the
    version did) gets Serve's handle path; the replica of this router's version gets the channel, and
    once it is full, Serve's path takes the overflow instead of a queue that would leave the old idle."""

    async def body() -> None:
        engines, servers, addresses = await start_replicas(3)
        for engine in engines:
            engine.gate.set()
        old = running_replica("old", addresses[0])
        old.replica_metadata[WIRE_VERSION_METADATA_KEY] = "0-000000000000"
        older = running_replica("older", None)
        older.replica_metadata = {CHANNEL_METADATA_KEY: addresses[1]}
        client, handle, _ = client_for([old, older])
        await client.open(request("r1"))
        assert handle.calls == [(None, "r1")]
        assert servers[0].num_streams_served == servers[1].num_streams_served == 0
        new = running_replica("new", addresses[2], max_ongoing=1)
        client, handle, directory = client_for([old, older, new])
        await finish(await client.open(request("r2")))
        assert handle.calls == [] and servers[2].num_streams_served == 1
        engines[2].gate.clear()
        held = await client.open(request("r3"))  # takes the new replica's only slot
        await client.open(request("r4"))
        assert handle.calls == [(None, "r4")] and client.stats()["num_queued"] == 0
        directory.update([old, older, new], RoutingConfig())  # another membership update
        engines[2].gate.set()
        await finish(held)
        for server in servers:
            await server.close(drain_timeout_s=0)

    with caplog.at_level("WARNING", logger="deployments.transport.client"):
        run(body)
    warnings = [r.getMessage() for r in caplog.records if "speaks channel wire" in r.getMessage()]
    # Each of the two clients warns once per version it meets ("0-000000000000", and None: no version),
    # not again on the second client's later membership update.
    assert len(warnings) == 4, warnings


def test_serve_handle_transport_never_opens_a_channel() -> None:
    async def body() -> None:
        _, servers, addresses = await start_replicas(1)
        handle = FakeHandle(f"app-{next(_apps)}")
        replica_directory(handle.app_name, "Engine").update(
            [running_replica("a", addresses[0])], RoutingConfig()
        )
        client = EngineClient(handle, is_direct=False, max_queued_requests=4)
        await client.open(request("r1"))
        assert handle.calls == [(None, "r1")] and servers[0].num_streams_served == 0

    run(body)


def test_a_full_replica_queues_then_refuses_past_max_queued_and_serves_the_queued_in_order() -> (
    None
):
    async def body() -> None:
        engines, _, addresses = await start_replicas(1)
        client, _, _ = client_for([running_replica("a", addresses[0], max_ongoing=1)], max_queued=1)
        first = await client.open(request("first"))
        assert (await first.__anext__()).token_ids == [7]
        queued = asyncio.create_task(client.open(request("queued")))
        await asyncio.sleep(0.05)
        assert not queued.done() and client.stats()["num_queued"] == 1
        with pytest.raises(OverloadedError) as refused:
            await client.open(request("refused"))
        assert refused.value.status_code == 503 and refused.value.code == "engine_overloaded"
        engines[0].gate.set()
        await finish(first)
        second = await asyncio.wait_for(queued, 5)
        assert [t for d in await finish(second) for t in d.token_ids] == [7, 8]
        assert engines[0].request_ids == ["first", "queued"]

    run(body)


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    async def body() -> None:
        engines, _, addresses = await start_replicas(1)
        client, _, _ = client_for([running_replica("a", addresses[0], max_ongoing=1)], max_queued=1)
        first = await client.open(request("first"))
        waiting = asyncio.create_task(client.open(request("gave-up")))
        await asyncio.sleep(0.05)
        waiting.cancel()
        await asyncio.sleep(0)
        assert client.stats()["num_queued"] == 0
        engines[0].gate.set()
        await finish(first)
        await finish(await client.open(request("next")))
        assert engines[0].request_ids == ["first", "next"]

    run(body)


def test_a_session_stays_on_one_replica() -> None:
    async def body() -> None:
        engines, _, addresses = await start_replicas(3)
        for engine in engines:
            engine.gate.set()
        replicas = [running_replica(name, a) for name, a in zip("abc", addresses, strict=True)]
        client, _, _ = client_for(replicas)
        for i in range(6):
            await finish(await client.open(request(f"r{i}", session_id="conversation-1")))
        counts = sorted(len(engine.request_ids) for engine in engines)
        assert counts == [0, 0, 6]
        assert client.stats()["num_direct_streams"] == 6

    run(body)


def test_an_unreachable_replica_is_skipped_and_with_none_left_serves_path_takes_over() -> None:
    async def body() -> None:
        engines, servers, addresses = await start_replicas(2)
        engines[1].gate.set()
        await servers[0].close(drain_timeout_s=0)  # its port now refuses connections
        replicas = [running_replica("a", addresses[0]), running_replica("b", addresses[1])]
        client, handle, directory = client_for(replicas)
        for i in range(4):
            await finish(await client.open(request(f"r{i}")))
        assert len(engines[1].request_ids) == 4 and handle.calls == []
        directory.update([replicas[0]], RoutingConfig())
        await client.open(request("fallback"))
        assert handle.calls == [(None, "fallback")]

    run(body)


def test_a_replica_that_keeps_refusing_is_skipped_for_longer_each_time_up_to_a_minute() -> None:
    async def body() -> None:
        _, servers, addresses = await start_replicas(1)
        await servers[0].close(drain_timeout_s=0)  # its port now refuses connections
        client, handle, _ = client_for([running_replica("a", addresses[0])])
        skips = []
        for i in range(6):
            replica = client._replicas["a"]
            replica.unreachable_until = 0.0  # as if its skip had run out
            await client.open(request(f"r{i}"))  # refused: Serve's path serves it
            skips.append(round(replica.unreachable_until - time.monotonic()))
        assert skips == [5, 10, 20, 40, 60, 60]
        assert len(handle.calls) == 6

    run(body)


def test_the_directory_keeps_only_recent_dead_replica_ids() -> None:
    directory = ReplicaDirectory()
    for i in range(5000):
        directory.remove(f"r{i}")
    assert len(directory.died) == 4096 and "r4999" in directory.died and "r0" not in directory.died


def test_a_replica_serve_removes_finishes_its_streams_then_its_connection_closes() -> None:
    async def body() -> None:
        engines, _, addresses = await start_replicas(2)
        engines[1].gate.set()
        replicas = [running_replica("a", addresses[0]), running_replica("b", addresses[1])]
        client, _, directory = client_for(replicas)
        streams = [await client.open(request(f"r{i}")) for i in range(4)]
        for stream in streams:
            await stream.__anext__()  # each replica has seen its requests
        on_a = [s for i, s in enumerate(streams) if f"r{i}" in engines[0].request_ids]
        assert on_a, "the least-loaded choice spreads four requests over both replicas"
        directory.update([replicas[1]], RoutingConfig())  # Serve dropped replica a
        for i in range(3):
            await finish(await client.open(request(f"after-{i}")))
        assert not any(rid.startswith("after") for rid in engines[0].request_ids)
        retired = next(r for r in client._retired if r.replica_id == "a")
        assert retired.connection is not None and not retired.connection.is_closed
        engines[0].gate.set()
        for stream in on_a:
            assert (await finish(stream))[-1].finish_reason is FinishReason.LENGTH
        assert retired.connection.is_closed and not client._retired

    run(body)


def test_a_membership_change_from_another_thread_is_applied_on_the_clients_loop() -> None:
    async def body() -> None:
        _, _, addresses = await start_replicas(2)
        replicas = [running_replica("a", addresses[0]), running_replica("b", addresses[1])]
        client, _, directory = client_for(replicas[:1])
        applied_on: list[int] = []
        sync = client._sync_replicas

        def recording_sync() -> None:
            applied_on.append(threading.get_ident())
            sync()

        client._sync_replicas = recording_sync  # type: ignore[method-assign]
        await asyncio.to_thread(directory.update, replicas, RoutingConfig())
        await eventually(lambda: applied_on)
        assert applied_on == [threading.get_ident()]
        assert client.stats()["num_direct_replicas"] == 2

    run(body)


def test_waiting_requests_are_served_in_arrival_order() -> None:
    async def body() -> None:
        engines, _, addresses = await start_replicas(1)
        client, _, _ = client_for([running_replica("a", addresses[0], max_ongoing=1)])
        first = await client.open(request("first"))
        queued = []
        for name in ("A", "B", "C"):
            queued.append(asyncio.create_task(client.open(request(name))))
            await asyncio.sleep(0.01)
        engines[0].gate.set()
        await finish(first)
        for task in queued:
            await finish(await asyncio.wait_for(task, 5))
        assert engines[0].request_ids == ["first", "A", "B", "C"]

    run(body)


def test_a_request_cancelled_before_its_first_token_frees_its_slot() -> None:
    async def body() -> None:
        engines, _, addresses = await start_replicas(1)
        client, _, _ = client_for([running_replica("a", addresses[0], max_ongoing=1)])
        starting = await client.open(request("gave-up"))
        starting.cancel()  # as Generation.close() does when the client leaves during prefill
        engines[0].gate.set()
        await finish(await asyncio.wait_for(client.open(request("next")), 5))
        assert engines[0].request_ids[-1] == "next"

    run(body)


def test_a_request_cancelled_while_connecting_frees_its_slot() -> None:
    async def body() -> None:
        engines, _, addresses = await start_replicas(1)
        engines[0].gate.set()
        client, _, _ = client_for([running_replica("a", addresses[0], max_ongoing=1)])
        connecting = asyncio.create_task(client.open(request("gave-up")))
        await asyncio.sleep(0)  # admitted, now awaiting the connection
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connecting
        await finish(await asyncio.wait_for(client.open(request("next")), 5))
        assert engines[0].request_ids == ["next"]

    run(body)


def test_requests_queued_behind_a_refused_connection_move_on_instead_of_hanging() -> None:
    async def body() -> None:
        _, servers, addresses = await start_replicas(1)
        await servers[0].close(drain_timeout_s=0)
        client, handle, _ = client_for([running_replica("a", addresses[0], max_ongoing=1)])
        names = ["admitted", "queued-1", "queued-2"]
        await asyncio.wait_for(asyncio.gather(*(client.open(request(n)) for n in names)), 5)
        assert sorted(rid for _, rid in handle.calls) == sorted(names)

    run(body)


def test_streams_on_a_replica_whose_actor_died_fail_at_once() -> None:
    async def body() -> None:
        _, _, addresses = await start_replicas(1)
        client, _, directory = client_for([running_replica("a", addresses[0])])
        stream = await client.open(request("r"))
        await stream.__anext__()
        directory.remove("a")  # Serve's on_replica_actor_died
        with pytest.raises(EngineDead):
            await asyncio.wait_for(stream.__anext__(), 5)

    run(body)


def test_a_failing_listener_neither_reaches_serve_nor_stops_the_others() -> None:
    directory = replica_directory(f"app-{next(_apps)}", "Engine")
    heard: list[str] = []

    def failing() -> None:
        raise RuntimeError("listener bug")

    directory.subscribe(failing)
    directory.subscribe(lambda: heard.append("second"))
    directory.update(
        [running_replica("a", "127.0.0.1:1")], RoutingConfig()
    )  # as Serve's hook calls it
    assert heard == ["second"] and list(directory.replicas) == ["a"]


def test_a_request_without_session_follows_the_kv_blocks_a_replica_reports_holding() -> None:
    async def body() -> None:
        engines, _, addresses = await start_replicas(2)
        for engine in engines:
            engine.gate.set()
        prompt = list(range(100, 170))  # two full blocks of 32 before the last token
        blocks = RoutingPolicy(RoutingConfig()).prompt_block_hashes(prompt)
        replicas = [running_replica("a", addresses[0]), running_replica("b", addresses[1])]

        def report(a_holds: list[int], b_holds: list[int]) -> None:
            for replica, holds in zip(replicas, (a_holds, b_holds), strict=True):
                replica.routing_stats = {
                    "kv_blocks": {"has_kv_events": True, "kv_block_hashes": holds}
                }

        report(blocks, [])
        client, _, _ = client_for(replicas)
        for i in range(4):
            if i == 2:
                report([], blocks)  # a evicted the prefix, b now holds it
            ask = GenerateRequest(request_id=f"r{i}", prompt_token_ids=prompt, max_tokens=2)
            await finish(await client.open(ask))
        assert (engines[0].request_ids, engines[1].request_ids) == (["r0", "r1"], ["r2", "r3"])

    run(body)
