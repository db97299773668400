"""The direct token stream between a Router process and an Engine replica: one TCP connection per (router
process, engine replica), with every request of that pair multiplexed on it (frames: `wire.py`).

Serve still places, health-checks and replaces Engine replicas, and tells each router which replicas run
and where their channel listens (`Engine.record_replica_metadata`, read through `membership.py`). Only the
stream skips Serve's handle path, which adds its routing and Ray calls to TTFT and CPU per item in both
processes.
vLLM's API server and engine core, and SGLang's tokenizer manager and scheduler, are split the same way
(over ZMQ there).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from deployments import errors
from deployments.messages import DeltaCollector, FinishReason, GenerateRequest, TokenDelta
from deployments.transport.wire import (
    encode_frame,
    error_frame,
    error_from_wire,
    read_frame,
    request_from_wire,
    request_to_wire,
)

logger = logging.getLogger(__name__)

# Past this many unsent bytes, a stream waits for the router to read (one slow router must not grow
# the engine's memory without bound).
_WRITE_HIGH_WATER_BYTES = 4 << 20


class ChannelServer:
    """The Engine replica's end: runs `generate` for each stream a router opens and sends its deltas back.

    A stream ends with its final delta, an error frame, a cancel frame, or the connection closing (which
    cancels every stream of that router)."""

    def __init__(
        self, generate: Callable[[GenerateRequest], AsyncGenerator[TokenDelta, None]]
    ) -> None:
        self._generate = generate
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._is_closing = False
        self.num_streams_served = 0

    async def start(self, host: str) -> str:
        """Listens on an ephemeral port of `host`; returns "host:port" for routers to connect to."""
        self._server = await asyncio.start_server(self._serve_connection, host, 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"{host}:{port}"

    @property
    def num_active_streams(self) -> int:
        return len(self._tasks)

    async def close(self, drain_timeout_s: float) -> None:
        """Stops accepting, lets running streams finish for up to `drain_timeout_s`, then closes every
        connection: routers fail what is left with EngineDead instead of waiting."""
        # Routers that have not heard of the stop yet get an error, not a cut stream.
        self._is_closing = True
        if self._server is not None:
            self._server.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=drain_timeout_s)
        left = list(self._tasks)
        for task in left:
            task.cancel()
        # Their generators close, so the executor cancels their requests before it shuts down.
        await asyncio.gather(*left, return_exceptions=True)
        for writer in list(self._writers):
            writer.close()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        streams: dict[int, asyncio.Task[None]] = {}
        outbox = _Outbox(writer)
        self._writers.add(writer)
        try:
            while True:
                frame = await read_frame(reader)
                kind, seq = frame[0], frame[1]
                if not isinstance(seq, int) or (kind == "g" and seq in streams):
                    raise ValueError(f"bad stream number {seq!r}")
                if kind == "g" and self._is_closing:
                    error = errors.EngineDead(
                        "the engine replica is stopping", code="replica_stopping"
                    )
                    outbox.send(error_frame(seq, error))
                elif kind == "g":
                    task = asyncio.create_task(self._run_stream(seq, frame[2], outbox))
                    streams[seq] = task
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                    task.add_done_callback(functools.partial(_forget_stream, streams, seq))
                elif kind == "c" and seq in streams:
                    streams.pop(seq).cancel()
        except (asyncio.IncompleteReadError, OSError):
            pass  # the router closed the connection (or its process ended)
        except Exception:
            logger.exception("closing an engine channel connection that sent a malformed frame")
        finally:
            for task in list(streams.values()):
                task.cancel()
            self._writers.discard(writer)
            writer.close()

    async def _run_stream(self, seq: int, wire: Any, outbox: _Outbox) -> None:
        self.num_streams_served += 1
        try:
            deltas = self._generate(request_from_wire(wire))
            # A cancel frame cancels this task, which closes the generator: the executor cancels.
            async with aclosing(deltas):
                async for delta in deltas:
                    finish = None if delta.finish_reason is None else delta.finish_reason.value
                    frame = [
                        "d",
                        seq,
                        delta.token_ids,
                        finish,
                        delta.logprobs,
                        delta.num_prompt_tokens,
                        delta.num_cached_tokens,
                        delta.top_logprobs,
                    ]
                    if not outbox.send(frame):
                        return
                    if outbox.is_backed_up:
                        await outbox.drain()
        except (asyncio.CancelledError, ConnectionError):
            pass  # cancelled by the router, or the router is gone: nothing to report
        except Exception as error:
            if not isinstance(error, errors.ServingError):
                logger.exception("engine stream %s failed", seq)
                error = errors.EngineError(f"the engine failed: {type(error).__name__}: {error}")
            outbox.send(error_frame(seq, error))


def _forget_stream(streams: dict[int, asyncio.Task[None]], seq: int, _: object) -> None:
    streams.pop(seq, None)


class _Outbox:
    """Frames sent during one turn of the event loop leave in one write: one system call per engine step
    and connection, not one per token and request."""

    __slots__ = ("_frames", "_writer")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._frames: list[bytes] = []

    def send(self, frame: list[Any]) -> bool:
        return self.send_encoded(encode_frame(frame))

    def send_encoded(self, data: bytes) -> bool:
        if self._writer.is_closing():
            return False
        if not self._frames:
            asyncio.get_running_loop().call_soon(self._flush)
        self._frames.append(data)
        return True

    @property
    def is_backed_up(self) -> bool:
        return self._writer.transport.get_write_buffer_size() > _WRITE_HIGH_WATER_BYTES

    async def drain(self) -> None:
        await self._writer.drain()

    def _flush(self) -> None:
        frames, self._frames = self._frames, []
        if frames and not self._writer.is_closing():
            self._writer.write(b"".join(frames))


class ChannelStream:
    """One request's deltas as the router reads them; `cancel()` stops the engine request.

    Deltas merge while the router lags (the executor's one-slot mailbox), so a busy router reads fewer,
    larger items instead of queueing them. The stream gives its admission slot back (`on_done`) as soon as
    the engine is done with the request: its final delta or error arrived, it was cancelled, or the
    connection closed, whether or not anyone reads what is left."""

    __slots__ = ("_connection", "_is_read_to_end", "_is_released", "_mailbox", "_on_done", "_seq")

    def __init__(
        self, connection: ChannelConnection, seq: int, on_done: Callable[[], None]
    ) -> None:
        self._connection = connection
        self._seq = seq
        self._mailbox = DeltaCollector()
        self._is_read_to_end = False
        self._is_released = False
        self._on_done = on_done

    def __aiter__(self) -> ChannelStream:
        return self

    async def __anext__(self) -> TokenDelta:
        if self._is_read_to_end:
            raise StopAsyncIteration
        try:
            delta = await self._mailbox.get()
        except asyncio.CancelledError:
            raise  # the reader was cancelled, not the stream: `cancel()` decides
        except BaseException:
            self._is_read_to_end = True  # the engine failed the request, or the connection dropped
            raise
        if delta.is_final:
            self._is_read_to_end = True
        return delta

    def cancel(self) -> None:
        """Stops the engine request; a reader still waiting gets an EngineError (as Serve's cancel raises)."""
        if not self._is_released:
            self._connection.send_cancel(self._seq)
            self.end(errors.EngineError("the request was cancelled", code="cancelled"))
        self._is_read_to_end = True

    def put(self, delta: TokenDelta) -> None:
        self._mailbox.put(delta)
        if delta.is_final:
            self.end(None)

    def end(self, error: BaseException | None) -> None:
        """The engine is done with this request (an error, if any, is what a reader gets next)."""
        if error is not None:
            self._mailbox.fail(error)
        if not self._is_released:
            self._is_released = True
            self._connection.forget(self._seq)
            self._on_done()


class ChannelConnection:
    """The router's end of one engine replica's channel. Connection loss fails every open stream with
    EngineDead, as a dead replica does on Serve's path; the next request opens a new connection. TCP
    keepalive notices an engine host that vanished without closing the connection."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._outbox: _Outbox | None = None
        self._read_task: asyncio.Task[None] | None = None
        self._streams: dict[int, ChannelStream] = {}
        self._next_seq = 0
        self.is_closed = False

    async def connect(self, timeout_s: float) -> None:
        host, port = self.address.rsplit(":", 1)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout_s)
        self._reader, self._writer = reader, writer
        _enable_keepalive(writer.get_extra_info("socket"))
        self._outbox = _Outbox(writer)
        self._read_task = asyncio.create_task(self._read_loop())

    @property
    def num_open_streams(self) -> int:
        return len(self._streams)

    def open(self, request: GenerateRequest, on_done: Callable[[], None]) -> ChannelStream:
        if self.is_closed or self._outbox is None:
            raise errors.EngineDead("the engine replica's channel is closed")
        seq = self._next_seq
        data = encode_frame(["g", seq, request_to_wire(request)])  # fails before the stream exists
        self._next_seq += 1
        stream = ChannelStream(self, seq, on_done)
        self._streams[seq] = stream
        self._outbox.send_encoded(data)
        return stream

    def send_cancel(self, seq: int) -> None:
        if not self.is_closed and self._outbox is not None:
            self._outbox.send(["c", seq])

    def forget(self, seq: int) -> None:
        self._streams.pop(seq, None)

    def close(self, reason: str) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        for stream in list(self._streams.values()):
            stream.end(errors.EngineDead(f"the engine replica became unavailable: {reason}"))
        self._streams.clear()
        if self._writer is not None:
            self._writer.close()
        if self._read_task is not None and self._read_task is not asyncio.current_task():
            self._read_task.cancel()

    async def _read_loop(self) -> None:
        assert self._reader is not None
        reason = "its channel connection closed"
        try:
            while True:
                frame = await read_frame(self._reader)
                stream = self._streams.get(frame[1])
                if stream is None:
                    continue  # a stream cancelled here; the engine's last frames crossed the cancel
                if frame[0] == "d":
                    (
                        _,
                        _,
                        token_ids,
                        finish,
                        logprobs,
                        num_prompt_tokens,
                        num_cached_tokens,
                        top_logprobs,
                    ) = frame
                    stream.put(
                        TokenDelta(
                            token_ids,
                            None if finish is None else FinishReason(finish),
                            logprobs,
                            num_prompt_tokens,
                            num_cached_tokens,
                            None
                            if top_logprobs is None
                            else [[(t, lp) for t, lp in step] for step in top_logprobs],
                        )
                    )
                elif frame[0] == "e":
                    stream.end(error_from_wire(frame))
        except (asyncio.IncompleteReadError, OSError) as error:
            reason = f"its channel connection closed ({type(error).__name__})"
        except asyncio.CancelledError:
            return
        except Exception as error:
            logger.exception("malformed frame from engine channel %s", self.address)
            reason = f"malformed frame ({type(error).__name__})"
        self.close(reason)


def _enable_keepalive(sock: socket.socket | None) -> None:
    """Probes an idle connection after 10 s, every 5 s, and gives up after 3 misses (Linux options)."""
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
