"""Admission at the router: a request body size cap and concurrency limits that refuse instead of queueing.

`RequestGuard` is pure ASGI middleware (no Ray, no FastAPI), so it is unit-testable on its own:

- a body over `max_body_bytes` gets 413, by its Content-Length before anything is read, or as soon as a
  chunked body passes the cap; a body that stalls for `body_timeout_s` gets 408 (a slow upload must not
  hold a slot forever);
- past `max_in_flight` requests on this replica: 503 `overloaded_error` with `Retry-After`;
- past `max_in_flight_per_key` requests of one API key: 429 `rate_limit_error` with `Retry-After`.

A limit never waits: the only queues are Serve's, bounded by `max_queued_requests`. Keys are only ever held
as a hash, computed once per request here and left in the ASGI scope (`SCOPE_KEY_DIGEST`) for the Router.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from deployments import metrics
from deployments.auth import SCOPE_KEY_DIGEST, key_digest
from deployments.errors import (
    KeyConcurrencyExceeded,
    OverloadedError,
    PayloadTooLarge,
    RequestError,
    RequestTimeout,
    ServingError,
    error_headers,
    to_error_body,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_JSON_DEPTH = 64


@dataclass(frozen=True, slots=True)
class LimitSettings:
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES
    max_in_flight: int | None = None
    max_in_flight_per_key: int | None = None
    retry_after_s: float = 1.0
    body_timeout_s: float | None = 30.0
    # Probes must answer even when the replica is full.
    exempt_paths: frozenset[str] = field(default_factory=lambda: frozenset({"/health", "/metrics"}))


async def send_error(send: Send, error: ServingError, *, retry_after_s: float = 1.0) -> None:
    """Answers with `error` straight from ASGI (before the app has seen the request)."""
    metrics.count_rejection(error)
    body = json.dumps(to_error_body(error)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in error_headers(error, retry_after_s).items()]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


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
            raise OverloadedError(
                f"the server is at capacity ({self.max_in_flight} requests in flight); retry shortly",
                code="server_overloaded",
                retry_after_s=self.retry_after_s,
            )
        if key is not None and self.max_in_flight_per_key is not None:
            if self._per_key.get(key, 0) >= self.max_in_flight_per_key:
                raise KeyConcurrencyExceeded(
                    f"this API key already has {self.max_in_flight_per_key} requests in flight; "
                    "wait for one to finish",
                    code="concurrency_limit_exceeded",
                    retry_after_s=self.retry_after_s,
                )
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
        digest = key_digest(_text(headers.get(b"authorization")))
        scope.setdefault("state", {})[SCOPE_KEY_DIGEST] = digest
        try:
            permit = self.limiter.acquire(digest)
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

    - bytes that are not valid UTF-8 (or the UTF-16/32 a BOM-less JSON text may use): `json.loads(bytes)`
      decodes with `surrogatepass`, so raw surrogate bytes (ED A0 80) would pass and break tokenizers,
      UTF-8 encoders and the response serialiser later;
    - unpaired UTF-16 surrogate escapes (`"\\ud800"`), for the same reason;
    - integers longer than Python's int-string limit (`ValueError: Exceeds the limit (4300 digits)`);
    - NaN, Infinity and numbers that overflow to infinity: not JSON (RFC 8259), and a schema that stored
      one would echo it as `null`;
    - nesting deeper than MAX_JSON_DEPTH (json.loads itself raises RecursionError near 1,000 levels, and
      templates re-serialise tools).
    """
    encoding = json.detect_encoding(raw)
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as error:
        raise RequestError(
            f"the request body is not valid JSON: it is not valid {error.encoding.upper()} at byte "
            f"{error.start} ({error.reason})"
        ) from None
    try:
        body = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as error:
        raise RequestError(f"the request body is not valid JSON: {error}") from None
    except _NonFiniteConstant as error:
        raise _non_finite(text, error.name) from None
    except RecursionError:
        raise _too_deep() from None
    except ValueError as error:
        if "integer string conversion" not in str(error):
            raise
        raise RequestError(
            "the request body is not valid JSON: it has an integer of more than "
            f"{sys.get_int_max_str_digits()} digits"
        ) from None
    # Both walks are skipped (C-speed scans) for the usual body that cannot have the problem.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _depth(body) > MAX_JSON_DEPTH:
        raise _too_deep()
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(body):
        raise RequestError(
            "the request body contains an unpaired UTF-16 surrogate escape (\\ud800-\\udfff)"
        )
    return body


def _refuse_constant(name: str) -> Any:
    raise _NonFiniteConstant(name)


class _NonFiniteConstant(ValueError):
    """NaN or Infinity in a body: json.loads does not say under which key, so the caller looks for it."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


# `"key": NaN` (or -Infinity): the field a client's serializer wrote a non-finite float into.
_CONSTANT_KEY = re.compile(r'"((?:[^"\\]|\\.){1,128})"\s*:\s*-?(?:NaN|Infinity)\b')


def _non_finite(text: str, name: str) -> RequestError:
    found = _CONSTANT_KEY.search(text)
    field = found.group(1) if found else None
    where = f"{field}: " if field else ""
    return RequestError(
        f"{where}{name} is not a JSON number (the request body is not valid JSON)", param=field
    )


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RequestError(
            f"the request body is not valid JSON: the number {text[:40]} overflows a 64-bit float"
        )
    return value


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
