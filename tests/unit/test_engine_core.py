"""The engine core in the replica and in its own process (`executor_process: subprocess`): the same tokens
either way, over the replica's relay and over a router's direct connection; the child's death fails its
streams and the health check; a replica that goes away takes its child with it; a drain finishes streams."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from deployments.config import EmulatorConfig, EngineConfig
from deployments.engine_channel import ChannelConnection
from deployments.engine_core import EngineCore
from deployments.engine_core_process import EngineCoreProcess
from deployments.errors import EngineDead
from deployments.messages import FinishReason, GenerateRequest, SamplingParams, TokenDelta

T = TypeVar("T")
TRANSFORMERS = EngineConfig.model_validate(
    {"kind": "transformers", "transformers": {"device": "cpu", "num_blocks": 32}}
)
EMULATOR = EngineConfig(kind="emulator", emulator=EmulatorConfig(ttft_ms=1, itl_ms=5))


def run(body: Callable[[], Awaitable[T]], timeout_s: float = 120) -> T:
    return asyncio.run(asyncio.wait_for(body(), timeout=timeout_s))


def request(request_id: str, max_tokens: int = 12) -> GenerateRequest:
    return GenerateRequest(
        request_id=request_id,
        prompt_token_ids=[5, 17, 23, 42, 8],
        max_tokens=max_tokens,
        sampling=SamplingParams(temperature=0.0),
    )


async def read_all(stream: AsyncIterator[TokenDelta]) -> tuple[list[int], FinishReason | None]:
    token_ids: list[int] = []
    finish = None
    async for delta in stream:
        token_ids += delta.token_ids
        finish = delta.finish_reason
        if delta.is_final:
            break
    return token_ids, finish


async def router_connection(address: str | None) -> ChannelConnection:
    assert address is not None
    connection = ChannelConnection(address)
    await connection.connect(timeout_s=5)
    return connection


async def wait_for_exit(core: EngineCoreProcess, timeout_s: float = 30) -> int:
    assert core.pid is not None
    process = core._process
    assert process is not None
    return await asyncio.wait_for(process.wait(), timeout_s)


def test_a_core_in_its_own_process_streams_what_the_core_in_the_replica_streams(
    model_dir: Path,
) -> None:
    async def body() -> None:
        local = EngineCore(TRANSFORMERS, str(model_dir), "replica-a")
        await local.start(channel_host=None)
        try:
            expected = await read_all(local.generate(request("local")))
        finally:
            await local.close(drain_timeout_s=0)
        assert expected[1] is FinishReason.LENGTH and len(expected[0]) == 12

        core = EngineCoreProcess(TRANSFORMERS, str(model_dir), "replica-b")
        await core.start(channel_host="127.0.0.1")
        try:
            assert await read_all(core.generate(request("relayed"))) == expected
            connection = await router_connection(core.channel_address)
            stream = connection.open(request("direct"), lambda: None)
            assert await read_all(stream) == expected
            connection.close("test over")

            assert core.capabilities == local.capabilities
            stats = await core.stats()
            assert (stats.num_submitted_requests, stats.num_finished_requests) == (2, 2)
            recent = await core.recent_requests()
            assert [r["request_id"] for r in recent] == ["relayed", "direct"]
            assert {r["replica_id"] for r in recent} == {"replica-b"}
            channel = await core.channel_stats()
            assert channel["pid"] == core.pid != os.getpid()
            assert (channel["num_streams_served"], channel["num_active_streams"]) == (2, 0)
            await core.check_health()
        finally:
            await core.close(drain_timeout_s=5)
        assert await wait_for_exit(core) == 0

    run(body)


def test_a_core_without_a_public_channel_announces_none_but_still_serves_the_replica(
    model_dir: Path,
) -> None:
    async def body() -> None:
        core = EngineCoreProcess(EMULATOR, str(model_dir), "replica")
        await core.start(channel_host=None)
        try:
            assert core.channel_address is None  # transport: serve_handle, nothing for routers
            token_ids, finish = await read_all(core.generate(request("r", max_tokens=4)))
            assert len(token_ids) == 4 and finish is FinishReason.LENGTH
        finally:
            await core.close(drain_timeout_s=1)

    run(body)


def test_a_dead_core_process_fails_its_streams_and_the_health_check(model_dir: Path) -> None:
    async def body() -> None:
        core = EngineCoreProcess(EMULATOR, str(model_dir), "replica")
        await core.start(channel_host="127.0.0.1")
        try:
            stream = core.generate(request("r", max_tokens=1000))
            assert (await stream.__anext__()).token_ids
            assert core.pid is not None
            os.kill(core.pid, signal.SIGKILL)
            with pytest.raises(EngineDead):
                while True:
                    await stream.__anext__()
            await wait_for_exit(core)
            with pytest.raises(EngineDead, match="exited with code -9"):
                await core.check_health()
        finally:
            await core.close(drain_timeout_s=0)

    run(body)


def test_a_core_process_stops_at_once_when_its_replica_is_gone(model_dir: Path) -> None:
    async def body() -> None:
        core = EngineCoreProcess(EMULATOR, str(model_dir), "replica")
        await core.start(channel_host="127.0.0.1")
        connection = await router_connection(core.channel_address)
        stream = connection.open(request("r", max_tokens=10_000), lambda: None)
        assert (await stream.__anext__()).token_ids
        process = core._process
        assert process is not None and process.stdin is not None
        process.stdin.close()  # what the kernel does when the replica process dies
        assert await wait_for_exit(core, timeout_s=20) == 0
        with pytest.raises(EngineDead):
            await read_all(stream)

    run(body)


def test_a_draining_core_process_finishes_running_streams_and_refuses_new_ones(
    model_dir: Path,
) -> None:
    async def body() -> None:
        core = EngineCoreProcess(EMULATOR, str(model_dir), "replica")
        await core.start(channel_host="127.0.0.1")
        connection = await router_connection(core.channel_address)
        running = connection.open(request("running", max_tokens=100), lambda: None)
        await running.__anext__()
        closing = asyncio.create_task(core.close(drain_timeout_s=20))
        await asyncio.sleep(0.3)
        late = connection.open(request("late"), lambda: None)
        with pytest.raises(EngineDead) as refused:
            await late.__anext__()
        assert refused.value.code == "replica_stopping"
        assert (await read_all(running))[1] is FinishReason.LENGTH
        await closing
        assert await wait_for_exit(core) == 0

    run(body)


def test_a_core_that_cannot_start_is_reported_with_its_exit_code(tmp_path: Path) -> None:
    async def body() -> None:
        core = EngineCoreProcess(TRANSFORMERS, str(tmp_path / "no-model-here"), "replica")
        with pytest.raises(EngineDead, match="exited with code 1 before serving"):
            await core.start(channel_host="127.0.0.1")

    run(body)
