"""The direct engine channel over real loopback sockets: what an executor yields in-process is what the router
reads, cancellation reaches the executor, errors keep their class, and a lost connection is an EngineDead."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from deployments.config import EmulatorConfig
from deployments.errors import ContextLengthExceeded, EngineDead, EngineError
from deployments.executors.emulator import EmulatorExecutor
from deployments.messages import (
    FinishReason,
    GenerateRequest,
    GuidedDecodingSpec,
    RetentionRange,
    SamplingParams,
    TokenDelta,
)
from deployments.transport.channel import ChannelConnection, ChannelServer
from deployments.transport.wire import request_from_wire, request_to_wire
from tests.trtllm_support import eventually

T = TypeVar("T")
STEPPING = EmulatorConfig(ttft_ms=1, itl_ms=1, max_batch_size=64)


def request(request_id: str, max_tokens: int = 8, **kwargs: object) -> GenerateRequest:
    return GenerateRequest(
        request_id=request_id,
        prompt_token_ids=[10, 11, 12],
        max_tokens=max_tokens,
        **kwargs,  # type: ignore[arg-type]
    )


def run(body: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(body(), timeout=30))


async def read_all(stream: AsyncIterator[TokenDelta]) -> list[TokenDelta]:
    deltas = []
    async for delta in stream:
        deltas.append(delta)
        if delta.is_final:
            break
    return deltas


async def connected(address: str) -> ChannelConnection:
    connection = ChannelConnection(address)
    await connection.connect(timeout_s=5)
    return connection


def ids(deltas: list[TokenDelta]) -> list[int]:
    return [token_id for delta in deltas for token_id in delta.token_ids]


def test_a_request_crosses_the_wire_unchanged() -> None:
    full = GenerateRequest(
        request_id="r-1",
        prompt_token_ids=[1, 2, 3],
        max_tokens=7,
        sampling=SamplingParams(0.7, 0.9, 40, 1234, 0.1, 0.2, 1.1, 3, ((5, -100.0), (9, 2.5))),
        end_id=2,
        pad_id=0,
        stop_token_sequences=((5, 6), (7,)),
        return_logprobs=True,
        session_id="s-1",
        retention=RetentionRange(0, 3, 80),
        num_top_logprobs=4,
        guided_decoding=GuidedDecodingSpec("json_schema", '{"type": "object"}'),
    )
    assert request_from_wire(request_to_wire(full)) == full
    # Every field travels: a new one must be added to the wire (its fingerprint changes by itself).
    wire = request_to_wire(full)
    assert set(wire) == {f.name for f in dataclasses.fields(GenerateRequest)}
    assert len(wire["sampling"]) == len(dataclasses.fields(SamplingParams))
    assert len(wire["retention"]) == len(dataclasses.fields(RetentionRange))
    # A delta frame carries TokenDelta's six fields by position (`ChannelServer._run_stream`).
    assert len(dataclasses.fields(TokenDelta)) == 6
    assert request_from_wire(request_to_wire(request("r-2"))) == request("r-2")


async def _serve_emulator(
    model_dir: Path, body: Callable[[EmulatorExecutor, ChannelServer, str], Awaitable[T]]
) -> T:
    executor = EmulatorExecutor(STEPPING, str(model_dir))
    await executor.start()
    server = ChannelServer(executor.generate)
    address = await server.start("127.0.0.1")
    try:
        return await body(executor, server, address)
    finally:
        await server.close(drain_timeout_s=0)
        await executor.shutdown()


def test_the_router_reads_what_the_executor_yields_in_process(model_dir: Path) -> None:
    async def body(executor: EmulatorExecutor, server: ChannelServer, address: str) -> None:
        in_process = await read_all(executor.generate(request("local", max_tokens=12)))
        connection = await connected(address)
        released = []
        streams = [
            connection.open(request(f"remote-{i}", max_tokens=12), lambda: released.append(1))
            for i in range(3)
        ]
        results = await asyncio.gather(*(read_all(s) for s in streams))
        for deltas in results:
            assert ids(deltas) == ids(in_process)
            assert deltas[-1].finish_reason is FinishReason.LENGTH
            assert deltas[0].num_prompt_tokens == 3
        assert len(released) == 3 and connection.num_open_streams == 0
        assert server.num_streams_served == 3
        connection.close("test over")

    run(lambda: _serve_emulator(model_dir, body))


def test_the_cached_prompt_token_count_crosses_the_wire(model_dir: Path) -> None:
    async def body(executor: EmulatorExecutor, server: ChannelServer, address: str) -> None:
        prompt = list(range(100, 170))  # two full blocks of 32 before the last token
        await read_all(executor.generate(GenerateRequest("warm", prompt, max_tokens=2)))
        connection = await connected(address)
        again = connection.open(GenerateRequest("again", prompt, max_tokens=2), lambda: None)
        deltas = await read_all(again)
        assert (deltas[0].num_prompt_tokens, deltas[0].num_cached_tokens) == (70, 64)
        connection.close("test over")

    run(lambda: _serve_emulator(model_dir, body))


def test_cancel_reaches_the_executor_and_frees_its_slot(model_dir: Path) -> None:
    async def body(executor: EmulatorExecutor, server: ChannelServer, address: str) -> None:
        connection = await connected(address)
        stream = connection.open(request("long", max_tokens=100_000), lambda: None)
        first = await stream.__anext__()
        assert first.token_ids and not first.is_final
        stream.cancel()
        await eventually(
            lambda: (
                (executor.stats().num_cancelled_requests, executor.stats().num_active_requests)
                == (1, 0)
            )
        )
        assert executor.stats().num_cancelled_requests == 1
        assert executor.stats().num_active_requests == 0
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        connection.close("test over")

    run(lambda: _serve_emulator(model_dir, body))


def test_closing_the_connection_cancels_every_stream_on_it(model_dir: Path) -> None:
    async def body(executor: EmulatorExecutor, server: ChannelServer, address: str) -> None:
        connection = await connected(address)
        streams = [
            connection.open(request(f"r{i}", max_tokens=100_000), lambda: None) for i in range(2)
        ]
        await asyncio.gather(*(s.__anext__() for s in streams))
        connection.close("router stopping")
        await eventually(lambda: executor.stats().num_active_requests == 0)
        assert executor.stats().num_cancelled_requests == 2

    run(lambda: _serve_emulator(model_dir, body))


def test_a_delta_crosses_the_channel_with_its_logprobs_and_top_logprobs() -> None:
    def sent() -> TokenDelta:
        top = [[(4, -0.5), (7, -2.0)], [(5, -1.25), (4, -3.0)]]
        return TokenDelta([4, 5], FinishReason.LENGTH, [-0.5, -1.25], 3, 2, top)

    async def generate(request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        yield sent()

    async def body() -> TokenDelta:
        server = ChannelServer(generate)
        connection = await connected(await server.start("127.0.0.1"))
        [received] = await read_all(connection.open(request("r"), lambda: None))
        connection.close("done")
        await server.close(drain_timeout_s=0)
        return received

    assert run(body) == sent()


def test_an_engine_error_keeps_its_class_message_and_field() -> None:
    async def failing(request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        yield TokenDelta([1])
        raise ContextLengthExceeded("prompt too long for this engine", param="max_tokens")

    async def body() -> None:
        server = ChannelServer(failing)
        connection = await connected(await server.start("127.0.0.1"))
        stream = connection.open(request("r"), lambda: None)
        assert (await stream.__anext__()).token_ids == [1]
        with pytest.raises(ContextLengthExceeded) as caught:
            await stream.__anext__()
        assert caught.value.param == "max_tokens"
        assert caught.value.message == "prompt too long for this engine"
        connection.close("done")
        await server.close(drain_timeout_s=0)

    run(body)


def test_an_unexpected_engine_exception_becomes_an_engine_error() -> None:
    async def broken(request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        raise RuntimeError("kaboom")
        yield TokenDelta([])  # pragma: no cover - makes this an async generator

    async def body() -> None:
        server = ChannelServer(broken)
        connection = await connected(await server.start("127.0.0.1"))
        with pytest.raises(EngineError, match="RuntimeError: kaboom"):
            await connection.open(request("r"), lambda: None).__anext__()
        connection.close("done")
        await server.close(drain_timeout_s=0)

    run(body)


def test_a_replica_that_goes_away_mid_stream_fails_its_streams_with_engine_dead(
    model_dir: Path,
) -> None:
    async def body() -> None:
        executor = EmulatorExecutor(STEPPING, str(model_dir))
        await executor.start()
        server = ChannelServer(executor.generate)
        connection = await connected(await server.start("127.0.0.1"))
        released = []
        stream = connection.open(request("r", max_tokens=100_000), lambda: released.append(1))
        await stream.__anext__()
        await server.close(drain_timeout_s=0)  # the stream's task is cancelled: its socket closes
        await executor.shutdown()
        with pytest.raises(EngineDead, match="became unavailable"):
            while True:
                await stream.__anext__()
        assert released == [1] and connection.is_closed

    run(body)


def test_a_stream_frees_its_slot_when_the_engine_finishes_even_if_nobody_reads_it(
    model_dir: Path,
) -> None:
    async def body(executor: EmulatorExecutor, server: ChannelServer, address: str) -> None:
        connection = await connected(address)
        released: list[int] = []
        connection.open(request("unread", max_tokens=3), lambda: released.append(1))
        await eventually(lambda: released)
        assert released == [1] and connection.num_open_streams == 0
        connection.close("test over")

    run(lambda: _serve_emulator(model_dir, body))


def test_cancel_wakes_a_reader_that_is_still_waiting() -> None:
    async def silent(request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        await asyncio.Event().wait()  # never yields: a prefill that takes forever
        yield TokenDelta([])  # pragma: no cover

    async def body() -> None:
        server = ChannelServer(silent)
        connection = await connected(await server.start("127.0.0.1"))
        released: list[int] = []
        stream = connection.open(request("r"), lambda: released.append(1))
        reader = asyncio.create_task(stream.__anext__())
        await asyncio.sleep(0.05)
        stream.cancel()
        with pytest.raises(EngineError, match="cancelled"):
            await asyncio.wait_for(reader, 5)
        assert released == [1]
        await eventually(lambda: server.num_active_streams == 0)
        assert server.num_active_streams == 0  # the cancel frame reached the engine's generator
        connection.close("done")
        await server.close(drain_timeout_s=0)

    run(body)


def test_a_stopping_replica_lets_running_streams_finish_and_refuses_new_ones(
    model_dir: Path,
) -> None:
    async def body(executor: EmulatorExecutor, server: ChannelServer, address: str) -> None:
        connection = await connected(address)
        running = connection.open(request("running", max_tokens=100), lambda: None)
        await running.__anext__()
        closing = asyncio.create_task(server.close(drain_timeout_s=10))
        await asyncio.sleep(0.05)
        late = connection.open(request("late"), lambda: None)
        with pytest.raises(EngineDead) as refused:
            await late.__anext__()
        assert refused.value.code == "replica_stopping"
        assert (await read_all(running))[-1].finish_reason is FinishReason.LENGTH
        await closing

    run(lambda: _serve_emulator(model_dir, body))
