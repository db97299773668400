"""Admission at the router: a request body size cap and concurrency limits that refuse instead of queueing.

`RequestGuard` is pure ASGI middleware (no Ray, no FastAPI), so it is unit-testable on its own:

- a body over `max_body_bytes` gets 413, by its Content-Length before anything is read, or as soon as a
  chunked body passes the cap; a body that stalls for `body_timeout_s` gets 408 (a slow upload must not
  hold a slot forever);
- past `max_in_flight` requests on this replica: 503 `overloaded_error` with `Retry-After`;
- past `max_in_flight_per_key` requests of one API key: 429 `rate_limit_error` with `Retry-After`.

A limit never waits: the only queues are Serve's, bounded by `max_queued_requests`. Keys are only ever held
as a hash. `error_response` is the single place that turns a `ServingError` into an HTTP answer, adding
`Retry-After` to every 429/503 that is worth retrying.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from deployments import metrics
from deployments.errors import OverloadedError, RequestError, ServingError, to_error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_JSON_DEPTH = 64
# Refusals by their error code, for `shepherd_rejected_requests_total{reason}`.
_REJECTION_REASONS = {
    "request_too_large": "body_too_large",
    "server_overloaded": "replica_full",
    "concurrency_limit_exceeded": "key_limit",
    "engine_overloaded": "engine_full",
}


class PayloadTooLarge(RequestError):
    status_code = 413

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, param=param, code=code or "request_too_large")


class RequestTimeout(RequestError):
    status_code = 408

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, param=param, code=code or "request_timeout")


class KeyConcurrencyExceeded(ServingError):
    """429: one API key has too many requests in flight; retry after `retry_after_s`."""

    status_code = 429
    error_type = "rate_limit_error"


@dataclass(frozen=True, slots=True)
class LimitSettings:
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES
    max_in_flight: int | None = None
    max_in_flight_per_key: int | None = None
    retry_after_s: float = 1.0
    body_timeout_s: float | None = 30.0
    # Probes must answer even when the replica is full.
    exempt_paths: frozenset[str] = field(default_factory=lambda: frozenset({"/health", "/metrics"}))


def retry_after_header(error: ServingError, default_s: float = 1.0) -> dict[str, str]:
    """`Retry-After` (whole seconds, at least 1) for errors a client should retry: 503s and the key limit."""
    if error.status_code == 503 or isinstance(error, KeyConcurrencyExceeded):
        seconds = getattr(error, "retry_after_s", None) or default_s
        return {"retry-after": str(max(1, math.ceil(seconds)))}
    return {}


def _count_rejection(error: ServingError) -> None:
    reason = _REJECTION_REASONS.get(str(error.code))
    if reason is None and error.status_code == 503:
        reason = "engine_unavailable"
    if reason is not None:
        metrics.REJECTIONS.inc(1, {"reason": reason})


def error_response(error: ServingError, *, retry_after_s: float = 1.0) -> Any:
    """The OpenAI-shaped JSON answer for `error`, as a Starlette response (the router's exception handler)."""
    from starlette.responses import JSONResponse

    _count_rejection(error)
    return JSONResponse(
        to_error_body(error),
        status_code=error.status_code,
        headers=retry_after_header(error, retry_after_s),
    )


async def send_error(send: Send, error: ServingError, *, retry_after_s: float = 1.0) -> None:
    """Answers with `error` straight from ASGI (before the app has seen the request)."""
    _count_rejection(error)
    body = json.dumps(to_error_body(error)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [
        (k.encode(), v.encode()) for k, v in retry_after_header(error, retry_after_s).items()
    ]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def key_id(authorization: str | None) -> str | None:
    """A stable, non-reversible id of the bearer key (None without one); the key itself is never kept."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        return None
    return hashlib.sha256(value.encode()).hexdigest()[:24]


class Permit:
    """One admitted request; `release()` is idempotent."""

    __slots__ = ("_key", "_limiter")

    def __init__(self, limiter: ConcurrencyLimiter, key: str | None) -> None:
        self._limiter: ConcurrencyLimiter | None = limiter
        self._key = key

    def release(self) -> None:
        if self._limiter is not None:
            limiter, self._limiter = self._limiter, None
            limiter._release(self._key)


class ConcurrencyLimiter:
    """Counts requests in flight, in all and per key. `acquire` answers at once: a permit or an error.

    Threading: one event loop (a router replica's); no awaits, so no locks.
    """

    def __init__(
        self,
        max_in_flight: int | None,
        max_in_flight_per_key: int | None,
        *,
        retry_after_s: float = 1.0,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.max_in_flight_per_key = max_in_flight_per_key
        self.retry_after_s = retry_after_s
        self.num_in_flight = 0
        self._per_key: dict[str, int] = {}

    def in_flight_of(self, key: str) -> int:
        return self._per_key.get(key, 0)

    def acquire(self, key: str | None) -> Permit:
        """Raises OverloadedError (503) when the replica is full, KeyConcurrencyExceeded (429) for the key."""
        if self.max_in_flight is not None and self.num_in_flight >= self.max_in_flight:
            error = OverloadedError(
                f"the server is at capacity ({self.max_in_flight} requests in flight); retry shortly",
                code="server_overloaded",
            )
            error.retry_after_s = self.retry_after_s  # type: ignore[attr-defined]
            raise error
        if key is not None and self.max_in_flight_per_key is not None:
            if self._per_key.get(key, 0) >= self.max_in_flight_per_key:
                limit_error = KeyConcurrencyExceeded(
                    f"this API key already has {self.max_in_flight_per_key} requests in flight; "
                    "wait for one to finish",
                    code="concurrency_limit_exceeded",
                )
                limit_error.retry_after_s = self.retry_after_s  # type: ignore[attr-defined]
                raise limit_error
        self.num_in_flight += 1
        if key is not None:
            self._per_key[key] = self._per_key.get(key, 0) + 1
        return Permit(self, key)

    def _release(self, key: str | None) -> None:
        self.num_in_flight -= 1
        if key is not None:
            remaining = self._per_key.get(key, 0) - 1
            if remaining > 0:
                self._per_key[key] = remaining
            else:
                self._per_key.pop(key, None)  # bounded: only keys with requests in flight stay


class RequestGuard:
    """ASGI middleware enforcing `LimitSettings` (see the module docstring).

    Settings come from the constructor, or else from `RequestGuard.configure(...)`, which the Router calls
    in its constructor: FastAPI builds its middleware before the Router has read its config.
    """

    default_settings: ClassVar[LimitSettings] = LimitSettings()

    def __init__(self, app: ASGIApp, settings: LimitSettings | None = None) -> None:
        self.app = app
        self._settings = settings
        self._limiter: ConcurrencyLimiter | None = None
        self._limiter_settings: LimitSettings | None = None

    @classmethod
    def configure(cls, settings: LimitSettings) -> None:
        cls.default_settings = settings

    @property
    def settings(self) -> LimitSettings:
        return self._settings or RequestGuard.default_settings

    @property
    def limiter(self) -> ConcurrencyLimiter:
        settings = self.settings
        if self._limiter is None or self._limiter_settings is not settings:
            self._limiter = ConcurrencyLimiter(
                settings.max_in_flight,
                settings.max_in_flight_per_key,
                retry_after_s=settings.retry_after_s,
            )
            self._limiter_settings = settings
        return self._limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = self.settings
        if scope["type"] != "http" or scope.get("path") in settings.exempt_paths:
            await self.app(scope, receive, send)
            return
        # 1) A declared body over the cap is refused before a byte of it is read.
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        cap = settings.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await send_error(send, RequestError("the Content-Length header is not a number"))
                return
            if cap is not None and length > cap:
                await send_error(send, _too_large(cap))
                return
        # 2) Admission: answer at once when full (no queue of our own).
        try:
            permit = self.limiter.acquire(key_id(_text(headers.get(b"authorization"))))
        except ServingError as error:
            await send_error(send, error, retry_after_s=settings.retry_after_s)
            return
        # 3) A chunked (or lying) body is counted as it arrives, and must keep arriving. Once it is complete,
        # receive() can only be waiting for the client to disconnect (sse.py): no timeout then.
        num_bytes = 0
        is_body_complete = False
        timeout_s = settings.body_timeout_s

        async def capped_receive() -> Message:
            nonlocal num_bytes, is_body_complete
            if is_body_complete or timeout_s is None:
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), timeout_s)
                except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
                    raise RequestTimeout(
                        f"the request body did not arrive within {timeout_s:g} s"
                    ) from None
            if message["type"] == "http.request":
                num_bytes += len(message.get("body", b""))
                is_body_complete = not message.get("more_body", False)
                if cap is not None and num_bytes > cap:
                    raise _too_large(cap)
            return message

        is_started = False

        async def tracked_send(message: Message) -> None:
            nonlocal is_started
            is_started = is_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, capped_receive, tracked_send)
        except (PayloadTooLarge, RequestTimeout) as error:
            # Normally the router's ServingError handler answers; this covers apps without one.
            if is_started:
                raise
            await send_error(send, error)
        finally:
            permit.release()


def _too_large(cap: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body is larger than the limit of {cap} bytes")


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


# ---- JSON bodies ---------------------------------------------------------------------------------------
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json(raw: bytes) -> Any:
    """Decodes a request body, refusing (400) what would fail later in the pipeline rather than here:
    nesting deeper than MAX_JSON_DEPTH (json.loads itself raises RecursionError near 1,000 levels, and
    templates re-serialise tools) and unpaired UTF-16 surrogates (`"\\ud800"`), which tokenizers and
    UTF-8 encoders reject.
    """
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(f"the request body is not valid JSON: {error}") from None
    except RecursionError:
        raise _too_deep() from None
    # Both walks are skipped (C-speed scans) for the usual body that cannot have the problem.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _depth(body) > MAX_JSON_DEPTH:
        raise _too_deep()
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(body):
        raise RequestError(
            "the request body contains an unpaired UTF-16 surrogate escape (\\ud800-\\udfff)"
        )
    return body


def _too_deep() -> RequestError:
    return RequestError(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels")


def _children(value: Any) -> list[Any]:
    if isinstance(value, dict):
        # Keys are strings too: they matter to the surrogate check.
        return [*value.keys(), *value.values()]
    if isinstance(value, list):
        return value
    return []


def _depth(value: Any) -> int:
    """Levels of nested arrays/objects (a scalar is 0, `[]` is 1), counted up to MAX_JSON_DEPTH + 1."""
    depth, level = 0, [value]
    while depth <= MAX_JSON_DEPTH:
        containers = [node for node in level if isinstance(node, dict | list)]
        if not containers:
            break
        depth += 1
        level = [child for node in containers for child in _children(node)]
    return depth


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return True
        else:
            stack.extend(_children(node))
    return False
