"""Server-sent-event framing for OpenAI streams, and a streaming response that always closes its source."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

logger = logging.getLogger(__name__)
DONE = b"data: [DONE]\n\n"


def encode_chunk(chunk: BaseModel) -> bytes:
    return b"data: " + chunk.model_dump_json().encode() + b"\n\n"


def encode_event(name: str, event: BaseModel) -> bytes:
    """A named event, as the Responses API streams them (`event: response.created`, then its data)."""
    return b"event: " + name.encode() + b"\ndata: " + event.model_dump_json().encode() + b"\n\n"


def encode_error(body: dict[str, object]) -> bytes:
    """An error after the stream started: the status is already 200, so the error travels as an event."""
    return b"data: " + json.dumps(body).encode() + b"\n\n"


# Ray Serve's opt-out: with this request header, Serve does not watch for the client leaving.
_DISCONNECT_DISABLED = (b"x-request-disconnect-disabled", b"?1")


class EventStreamResponse(StreamingResponse):
    """`text/event-stream` that sends from the handler's own task and always closes its body generator.

    Starlette's streaming response runs a second task that waits on `receive()` for the client's disconnect
    from the start (ASGI spec < 2.4, which both Serve ingresses announce). Under Ray Serve a client that
    leaves is noticed without it: Serve cancels the request's task, with its proxy and with HAProxy
    (tests/e2e: test_cancellation_and_handles, test_ingress). Serve does not cancel it when its proxy
    itself goes away (a shutdown kills the proxies first), so once the first chunk is out a watcher reads
    `receive()` too: a disconnect, or the error Serve raises there for a dead proxy, ends the stream. The
    first chunk goes out without the extra task. A client that sends Serve's opt-out header gets Starlette's
    listener from the start.

    Cancelled while `send` waits, the generator is left suspended at its `yield`: its `finally` blocks
    (cancel the engine request, release a session's turn) would wait for garbage collection, so it is closed
    here.
    """

    def __init__(self, content: Any) -> None:
        super().__init__(content, media_type="text/event-stream")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if _DISCONNECT_DISABLED in scope.get("headers", ()):
                await super().__call__(scope, receive, send)
            else:
                await self._stream_watching(receive, send)
        except BaseException as error:
            logger.info("event stream ended early: %s", type(error).__name__)
            raise
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                # Shielded: the cleanup must finish even though this task is being cancelled.
                await asyncio.shield(aclose())

    async def _stream_watching(self, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        watcher: asyncio.Task[None] | None = None
        is_client_gone = is_done = False

        async def watch() -> None:
            nonlocal is_client_gone
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            except Exception as error:  # Serve's proxy is gone (RayActorError)
                logger.info("event stream lost its client: %s", type(error).__name__)
            # A client that leaves after [DONE] has everything (and the turn may be committing meanwhile).
            if not is_done:
                is_client_gone = True
                task.cancel()

        async def send_then_watch(message: Message) -> None:
            nonlocal watcher, is_done
            # Before the send: the client may read [DONE] and leave before `send` returns.
            is_done = is_done or message.get("body") == DONE
            await send(message)
            if watcher is None and message["type"] == "http.response.body":
                watcher = asyncio.create_task(watch(), name="event-stream-disconnect-watcher")

        try:
            await self.stream_response(send_then_watch)
        except asyncio.CancelledError:
            # Our own cancel (the client is gone) ends the response; anyone else's goes on up.
            if not is_client_gone or task.uncancel() > 0:
                raise
        finally:
            if watcher is not None:
                watcher.cancel()
