"""RequestGuard and ConcurrencyLimiter: 413 for big bodies, 503/429 with Retry-After when full, never a queue."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from deployments.auth import key_digest
from deployments.errors import EngineDead, KeyConcurrencyExceeded, OverloadedError
from deployments.limits import ConcurrencyLimiter, LimitSettings, RequestGuard

AUTH_A = [(b"authorization", b"Bearer key-a")]
AUTH_B = [(b"authorization", b"Bearer key-b")]


def http_scope(
    path: str = "/v1/chat/completions", headers: list[tuple[bytes, bytes]] | None = None
) -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": path, "headers": headers or []}


class EchoApp:
    """Reads the whole body, then answers 200 with its length; `gate` holds requests open while set."""

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None
        self.num_calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.num_calls += 1
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if self.gate is not None:
            await self.gate.wait()
        payload = json.dumps({"length": len(body)}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": payload})


async def call(
    app: Any, scope: dict[str, Any], chunks: list[bytes] | None = None, *, stall: bool = False
) -> tuple[int, dict[str, str], Any]:
    """Sends `chunks` as the body (`stall`: the last one says more follows, and nothing does)."""
    pending = list(chunks if chunks is not None else [b"{}"])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if not pending:
            await asyncio.sleep(3600)  # a client that sends nothing more
        chunk = pending.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending) or stall}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode(): v.decode() for k, v in start.get("headers", [])}
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], headers, json.loads(body)


def test_declared_body_over_the_cap_is_413_before_the_app_runs() -> None:
    inner = EchoApp()
    guard = RequestGuard(inner, LimitSettings(max_body_bytes=100))
    scope = http_scope(headers=[(b"content-length", b"101")])
    status, _, body = asyncio.run(call(guard, scope, [b"x" * 101]))
    assert status == 413 and inner.num_calls == 0
    assert (
        body["error"]["code"] == "request_too_large"
        and body["error"]["type"] == "invalid_request_error"
    )
    assert "100 bytes" in body["error"]["message"]


def test_chunked_body_over_the_cap_is_413_as_soon_as_it_passes() -> None:
    guard = RequestGuard(EchoApp(), LimitSettings(max_body_bytes=100))
    status, _, body = asyncio.run(call(guard, http_scope(), [b"x" * 60, b"x" * 60, b"x" * 10**6]))
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_a_stalled_upload_is_a_408_and_frees_its_slot() -> None:
    async def scenario() -> None:
        guard = RequestGuard(EchoApp(), LimitSettings(max_in_flight=1, body_timeout_s=0.05))
        # The client sends the first chunk and promises more that never comes.
        status, _, body = await asyncio.wait_for(call(guard, http_scope(), [b"{"], stall=True), 5)
        assert status == 408 and body["error"]["code"] == "request_timeout"
        assert guard.limiter.num_in_flight == 0
        assert (await call(guard, http_scope(), [b"{", b"}"]))[0] == 200  # slow but complete: fine

    asyncio.run(scenario())


def test_body_at_the_cap_passes_and_probes_are_never_limited() -> None:
    guard = RequestGuard(EchoApp(), LimitSettings(max_body_bytes=100, max_in_flight=0))
    status, _, body = asyncio.run(call(guard, http_scope("/health"), [b"x" * 100]))
    assert status == 200 and body == {"length": 100}
    guard = RequestGuard(EchoApp(), LimitSettings(max_body_bytes=100))
    status, _, body = asyncio.run(call(guard, http_scope(), [b"x" * 50, b"x" * 50]))
    assert status == 200 and body == {"length": 100}


def test_a_content_length_that_is_not_a_number_is_a_400() -> None:
    guard = RequestGuard(EchoApp(), LimitSettings())
    status, _, body = asyncio.run(call(guard, http_scope(headers=[(b"content-length", b"12abc")])))
    assert status == 400 and "Content-Length" in body["error"]["message"]


def test_full_replica_is_503_with_retry_after_and_frees_its_slot_afterwards() -> None:
    async def scenario() -> None:
        inner = EchoApp()
        inner.gate = asyncio.Event()
        guard = RequestGuard(inner, LimitSettings(max_in_flight=2, retry_after_s=2.5))
        held = [asyncio.create_task(call(guard, http_scope())) for _ in range(2)]
        await asyncio.sleep(0.01)
        status, headers, body = await call(guard, http_scope())
        assert status == 503 and headers["retry-after"] == "3"
        assert body["error"] == {
            "message": body["error"]["message"],
            "type": "overloaded_error",
            "param": None,
            "code": "server_overloaded",
        }
        assert inner.num_calls == 2, "the refused request never reached the app (and never queued)"
        inner.gate.set()
        assert [r[0] for r in await asyncio.gather(*held)] == [200, 200]
        assert guard.limiter.num_in_flight == 0
        assert (await call(guard, http_scope()))[0] == 200

    asyncio.run(scenario())


def test_per_key_limit_is_429_for_that_key_only() -> None:
    async def scenario() -> None:
        inner = EchoApp()
        inner.gate = asyncio.Event()
        guard = RequestGuard(inner, LimitSettings(max_in_flight_per_key=1))
        held = asyncio.create_task(call(guard, http_scope(headers=AUTH_A)))
        await asyncio.sleep(0.01)
        status, headers, body = await call(guard, http_scope(headers=AUTH_A))
        assert status == 429 and headers["retry-after"] == "1"
        assert (
            body["error"]["type"] == "rate_limit_error"
            and body["error"]["code"] == "concurrency_limit_exceeded"
        )
        other = asyncio.create_task(call(guard, http_scope(headers=AUTH_B)))
        await asyncio.sleep(0.01)
        inner.gate.set()
        assert (await held)[0] == 200 and (await other)[0] == 200
        assert guard.limiter.in_flight_of(key_digest("Bearer key-a") or "") == 0

    asyncio.run(scenario())


def test_a_request_that_fails_or_is_cancelled_releases_its_permit() -> None:
    async def failing(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    guard = RequestGuard(failing, LimitSettings(max_in_flight=1, max_in_flight_per_key=1))
    with pytest.raises(RuntimeError):
        asyncio.run(call(guard, http_scope(headers=AUTH_A)))
    assert (
        guard.limiter.num_in_flight == 0
        and guard.limiter.in_flight_of(key_digest("Bearer key-a") or "") == 0
    )

    async def cancelled() -> None:
        inner = EchoApp()
        inner.gate = asyncio.Event()
        guard2 = RequestGuard(inner, LimitSettings(max_in_flight=1))
        task = asyncio.create_task(call(guard2, http_scope()))
        await asyncio.sleep(0.01)
        assert guard2.limiter.num_in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert guard2.limiter.num_in_flight == 0

    asyncio.run(cancelled())


def test_configure_applies_to_guards_built_before_it() -> None:
    guard = RequestGuard(EchoApp())
    try:
        RequestGuard.configure(LimitSettings(max_body_bytes=10))
        assert asyncio.run(call(guard, http_scope(), [b"x" * 11]))[0] == 413
    finally:
        RequestGuard.configure(LimitSettings())
    assert asyncio.run(call(guard, http_scope(), [b"x" * 11]))[0] == 200


def test_limiter_counts_per_key_and_forgets_idle_keys() -> None:
    limiter = ConcurrencyLimiter(max_in_flight=3, max_in_flight_per_key=2)
    a1, a2 = limiter.acquire("a"), limiter.acquire("a")
    with pytest.raises(KeyConcurrencyExceeded):
        limiter.acquire("a")
    anonymous = limiter.acquire(None)  # no key: only the replica limit applies
    with pytest.raises(OverloadedError):
        limiter.acquire("b")
    for permit in (a1, a2, a2, anonymous):  # release is idempotent
        permit.release()
    assert limiter.num_in_flight == 0 and limiter.in_flight_of("a") == 0 and not limiter._per_key


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"[" * 100_000, "deeper than 64"),  # json.loads alone raises RecursionError (a 500 before)
        (b'{"a":' * 65 + b"1" + b"}" * 65, "deeper than 64"),
        (b"[" * 65 + b"]" * 65, "deeper than 64"),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
        (b'{"\\udfff": 1}', "surrogate"),
        (b'{"x": "\xff\xfe"}', "not valid JSON"),
        (b"{", "not valid JSON"),
        # Raw UTF-8 bytes of a surrogate: json.loads(bytes) decodes with surrogatepass and let them through.
        (
            b'{"messages": [{"role": "user", "content": "a\xed\xa0\x80b"}]}',
            "not valid UTF-8 at byte 44",
        ),
        (b'{"max_tokens": ' + b"7" * 5000 + b"}", "integer of more than 4300 digits"),
        (b'{"seed": -' + b"9" * 4301 + b"}", "integer of more than 4300 digits"),
        (b'{"tools": [{"parameters": {"maximum": NaN}}]}', "NaN is not a JSON number"),
        (b'{"temperature": Infinity}', "Infinity is not a JSON number"),
        (b'{"temperature": -Infinity}', "-Infinity is not a JSON number"),
        (b'{"top_p": 1e999}', "1e999 overflows a 64-bit float"),
    ],
    ids=[
        "deep-array",
        "deep-object",
        "65-levels",
        "lone-surrogate",
        "surrogate-key",
        "invalid-utf8",
        "truncated",
        "raw-surrogate-bytes",
        "huge-integer",
        "huge-negative-integer",
        "nan",
        "infinity",
        "minus-infinity",
        "float-overflow",
    ],
)
def test_parse_json_refuses_bodies_that_would_fail_later(raw: bytes, message: str) -> None:
    from deployments.errors import RequestError
    from deployments.limits import parse_json

    with pytest.raises(RequestError) as raised:
        parse_json(raw)
    assert message in raised.value.message and raised.value.status_code == 400


def test_parse_json_accepts_64_levels_surrogate_pairs_and_the_largest_numbers() -> None:
    from deployments.limits import parse_json

    assert parse_json(b"[" * 64 + b"]" * 64) is not None
    assert parse_json(b'{"x": "\\ud83d\\ude00"}') == {"x": "\U0001f600"}
    edge = parse_json(b'{"x": "\xf0\x9f\x98\x80", "n": 1.5e308, "i": -' + b"9" * 4300 + b"}")
    assert edge["x"] == "\U0001f600" and edge["n"] == 1.5e308 and edge["i"] == -(10**4300 - 1)
    assert parse_json('{"x": "ü"}'.encode("utf-16-le")) == {
        "x": "ü"
    }  # RFC 8259 encodings still detected
    assert parse_json(b'{"tools": [{"a": {"b": [1, {"c": null}]}}]}')["tools"][0]["a"]["b"][1] == {
        "c": None
    }


def test_refusals_are_counted_by_reason() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from deployments import metrics

    metrics.reset(export_to_ray=False)
    try:
        guard = RequestGuard(EchoApp(), LimitSettings(max_body_bytes=1, max_in_flight=0))
        asyncio.run(call(guard, http_scope(headers=[(b"content-length", b"2")])))
        asyncio.run(call(guard, http_scope()))
        metrics.count_rejection(OverloadedError("full", code="engine_overloaded"))
        metrics.count_rejection(EngineDead("gone"))
        text = metrics.render_summary()[0].decode()
        counts = {
            s.labels["reason"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "shepherd_rejected_requests_total"
        }
        assert counts == {
            "body_too_large": 1,
            "replica_full": 1,
            "engine_full": 1,
            "engine_unavailable": 1,
        }
    finally:
        metrics.reset()
