"""The access log: one structured line per request (HTTP, through the middleware, or a handle call), and the
request counters by route template and status. Never logs keys, headers, bodies or message text."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

from deployments import metrics
from deployments.metrics import RequestRecord

# A child of Serve's logger: inside a replica its records reach Serve's handlers (the replica log file, with
# Serve's request id; JSON when the deployment's logging_config says so) at INFO. Others default to WARNING.
access_logger = logging.getLogger("ray.serve.shepherd.access")


def log_request(fields: Mapping[str, Any]) -> None:
    """One structured line per request: ids, route, status, timings, token counts; never keys or text."""
    access_logger.info(json.dumps(fields, separators=(",", ":")))


def log_fields(
    record: RequestRecord, duration_s: float, *, event: str = "request"
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "event": event,
        "request_id": record.request_id,
        "method": record.method,
        "route": record.route,
        "status": record.status,
        "duration_ms": round(duration_s * 1000, 2),
    }
    if record.finish_reason is not None:
        fields.update(
            finish_reason=record.finish_reason,
            ttft_ms=None if record.ttft_s is None else round(record.ttft_s * 1000, 2),
            prompt_tokens=record.num_prompt_tokens,
            completion_tokens=record.num_completion_tokens,
        )
    if record.session_id is not None:
        fields["session_id"] = record.session_id
    return fields


def _serve_request_id() -> str | None:
    try:
        from ray.serve import context

        request_id: str = context._get_serve_request_context().request_id
        return request_id or None
    except Exception:
        return None


@contextlib.contextmanager
def handle_call(route: str) -> Iterator[RequestRecord]:
    """A Python-handle call as one logged request (no HTTP middleware sees it); `route` names the method."""
    record = RequestRecord(_serve_request_id() or f"req-{time.time_ns():x}", "handle", route)
    token = metrics.enter_request(record)
    try:
        yield record
        record.status = 200
    except BaseException as error:
        record.status = getattr(error, "status_code", 500)
        raise
    finally:
        metrics.leave_request(token)
        log_request(log_fields(record, time.monotonic() - record.started_at, event="handle_call"))


_SAFE_ID = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")
_MAX_ID_LEN = 128


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's `X-Request-Id` (Serve's proxy sets one when absent), unless it is unsafe to log as is."""
    for name, value in headers:
        if name.lower() == b"x-request-id":
            text = value.decode("latin-1")
            if 0 < len(text) <= _MAX_ID_LEN and set(text) <= _SAFE_ID:
                return text
            break
    return _serve_request_id() or f"req-{time.time_ns():x}"


_KNOWN_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/sessions",
        "/health",
        "/metrics",
        "/openapi.json",
    }
)


def route_of(scope: Mapping[str, Any]) -> str:
    """The matched route's template (never the raw path: ids in paths would make unbounded label sets)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    raw = str(scope.get("path", ""))
    if raw in _KNOWN_PATHS:
        return raw
    if raw.startswith("/v1/sessions/"):
        return "/v1/sessions/{session_id}"
    return "unmatched"


class RequestObserver:
    """ASGI middleware: request id, status counts, in-flight gauge and one access-log line per HTTP request.

    It is outermost, so it also sees the 413/429/503 answers of `limits.RequestGuard`. Headers and bodies
    are never logged; the log line carries the request id, the route template and the session id if any.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(
            request_id_from(scope.get("headers", [])), scope.get("method", ""), ""
        )
        token = metrics.enter_request(record)
        metrics.requests_in_flight.add(1)

        async def observed_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                record.status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except asyncio.CancelledError:
            record.status = record.status or 499  # the client left before any answer
            raise
        except BaseException:
            record.status = record.status or 500
            raise
        finally:
            metrics.leave_request(token)
            metrics.requests_in_flight.add(-1)
            record.route = route_of(scope)
            status = record.status or 499  # no response started: the client left first
            metrics.REQUESTS.inc(1, {"route": record.route, "status": str(status)})
            if record.route not in ("/health", "/metrics"):
                record.status = status
                log_request(log_fields(record, time.monotonic() - record.started_at))
