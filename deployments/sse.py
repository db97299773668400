"""Server-sent-event framing for OpenAI streams, and a streaming response that always closes its source."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

logger = logging.getLogger(__name__)
DONE = b"data: [DONE]\n\n"


def encode_chunk(chunk: BaseModel) -> bytes:
    return b"data: " + chunk.model_dump_json().encode() + b"\n\n"


def encode_error(body: dict[str, object]) -> bytes:
    """An error after the stream started: the status is already 200, so the error travels as an event."""
    return b"data: " + json.dumps(body).encode() + b"\n\n"


# Ray Serve's opt-out: with this request header, Serve does not watch for the client leaving.
_DISCONNECT_DISABLED = (b"x-request-disconnect-disabled", b"?1")


class EventStreamResponse(StreamingResponse):
    """`text/event-stream` that sends from the handler's own task and always closes its body generator.

    Starlette's streaming response runs a second task that waits on `receive()` for the client's disconnect
    (ASGI spec < 2.4, which both Serve ingresses announce). Under Ray Serve that task is redundant: Serve
    cancels the request's task when the client leaves, with its proxy and with HAProxy (tests/e2e:
    test_cancellation_and_handles, test_haproxy_ingress). Skipping it saves a task and a loop turn before the
    first chunk (benchmarks/RESULTS.md, R5.1). A client that sends Serve's opt-out header still gets
    Starlette's listener, since nothing else would notice it leave.

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
                await self.stream_response(send)
        except BaseException as error:
            logger.info("event stream ended early: %s", type(error).__name__)
            raise
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                # Shielded: the cleanup must finish even though this task is being cancelled.
                await asyncio.shield(aclose())
