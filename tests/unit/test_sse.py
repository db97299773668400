"""The SSE response: what it sends, who watches for the client leaving, and that a cancelled stream closes
its body generator at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from deployments import sse

SCOPE: dict[str, Any] = {"type": "http", "headers": [(b"accept", b"text/event-stream")]}


async def _never_receive() -> dict[str, Any]:
    """A client that stays connected: `receive()` has nothing to say until it leaves."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def test_sends_headers_then_each_chunk_then_the_end() -> None:
    async def body() -> AsyncGenerator[bytes, None]:
        yield b"data: 1\n\n"
        yield sse.DONE

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    response = sse.EventStreamResponse(body())
    asyncio.run(response(SCOPE, _never_receive, send))

    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]
    assert [m.get("body") for m in sent[1:]] == [b"data: 1\n\n", sse.DONE, b""]
    assert [m.get("more_body") for m in sent[1:]] == [True, True, False]


def test_cancelled_while_sending_runs_the_generators_cleanup_before_it_ends() -> None:
    cleaned_up = asyncio.Event()

    async def body() -> AsyncGenerator[bytes, None]:
        try:
            yield b"data: first\n\n"
            yield b"data: second\n\n"
        finally:
            await asyncio.sleep(0)  # cleanup that itself awaits (releasing a session's turn)
            cleaned_up.set()

    async def main() -> None:
        first_sent = asyncio.Event()

        async def send(message: dict[str, Any]) -> None:
            if message.get("body"):
                first_sent.set()
                await asyncio.Event().wait()  # a slow client: the cancel lands here, mid-send

        response = sse.EventStreamResponse(body())
        task = asyncio.create_task(response(SCOPE, _never_receive, send))
        await first_sent.wait()
        task.cancel()  # what Serve does when the client disconnects
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cleaned_up.is_set()

    asyncio.run(main())


def test_with_serves_opt_out_header_the_response_itself_notices_the_client_leave() -> None:
    cleaned_up = asyncio.Event()

    async def body() -> AsyncGenerator[bytes, None]:
        try:
            yield b"data: first\n\n"
            await asyncio.sleep(3600)  # waiting for the engine's next token
            yield b"data: never\n\n"
        finally:
            cleaned_up.set()

    async def main() -> None:
        first_sent = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await first_sent.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message.get("body"):
                first_sent.set()

        scope = {**SCOPE, "headers": [(b"x-request-disconnect-disabled", b"?1")]}
        response = sse.EventStreamResponse(body())
        await asyncio.wait_for(response(scope, receive, send), timeout=10)
        assert cleaned_up.is_set()

    asyncio.run(main())


def test_a_proxy_that_dies_mid_stream_ends_the_stream_and_its_cleanup_runs() -> None:
    """Serve's proxy dies first on shutdown; Serve then does not cancel the request, but `receive()` raises
    (RayActorError). The stream must end there, so that its turn aborts instead of running on unseen."""
    cleaned_up = asyncio.Event()
    first_sent = asyncio.Event()

    async def body() -> AsyncGenerator[bytes, None]:
        try:
            yield b"data: first\n\n"
            await asyncio.sleep(3600)  # waiting for the engine's next token
            yield b"data: never\n\n"
        finally:
            await asyncio.sleep(0)
            cleaned_up.set()

    async def receive() -> dict[str, Any]:
        await first_sent.wait()
        raise RuntimeError("the proxy actor died")

    async def send(message: dict[str, Any]) -> None:
        if message.get("body"):
            first_sent.set()

    async def main() -> None:
        await asyncio.wait_for(sse.EventStreamResponse(body())(SCOPE, receive, send), timeout=10)
        assert cleaned_up.is_set()

    asyncio.run(main())


def test_a_client_that_leaves_after_done_does_not_cut_what_follows_it() -> None:
    """The session commits after [DONE] was written; a client closing the connection then must not
    cancel that."""
    committed = asyncio.Event()
    done_sent = asyncio.Event()

    async def body() -> AsyncGenerator[bytes, None]:
        yield b"data: first\n\n"
        yield sse.DONE
        await asyncio.sleep(0.05)  # the commit
        committed.set()

    async def receive() -> dict[str, Any]:
        await done_sent.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message.get("body") == sse.DONE:
            done_sent.set()
        await asyncio.sleep(0)

    async def main() -> None:
        await asyncio.wait_for(sse.EventStreamResponse(body())(SCOPE, receive, send), timeout=10)
        assert committed.is_set()

    asyncio.run(main())
