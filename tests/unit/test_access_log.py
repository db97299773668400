"""The access log: one structured line per request, without keys or text, and the request counters."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from deployments import access_log, metrics
from tests.unit.test_metrics import value


@pytest.fixture(autouse=True)
def fresh_registry() -> Iterator[None]:
    metrics.reset(export_to_ray=False)
    yield
    metrics.reset()


@pytest.fixture()
def log_lines(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], list[str]]]:
    """The access log's messages so far."""
    logger = access_log.access_logger
    with caplog.at_level(logging.INFO, logger=logger.name):
        yield lambda: [r.getMessage() for r in caplog.records if r.name == logger.name]


# ---- the HTTP middleware -------------------------------------------------------------------------------
class Route:
    path = "/v1/sessions/{session_id}"


async def call(app: Any, path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {
            "type": "http.request",
            "body": b'{"messages": "SECRET-PROMPT"}',
            "more_body": False,
        }

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]


def test_observer_counts_by_route_template_and_logs_one_line_without_keys_or_text(
    log_lines: Callable[[], list[str]],
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        scope["route"] = Route()  # what Starlette's router does on a match
        await receive()
        request = metrics.RequestMetrics("/v1/chat/completions", session_id="sess_x")
        await asyncio.sleep(0.02)  # the first token comes at least 20 ms after the request arrived
        request.on_tokens(2)
        request.on_finish("stop", num_prompt_tokens=5, num_completion_tokens=2)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"SECRET-REPLY"})

    headers = [(b"authorization", b"Bearer SECRET-KEY"), (b"x-request-id", b"client-id-123")]
    asyncio.run(call(access_log.RequestObserver(app), "/v1/sessions/sess_x", headers))
    assert value("shepherd_requests_total", route="/v1/sessions/{session_id}", status="200") == 1
    assert value("shepherd_requests_in_flight") == 0
    [line] = log_lines()
    assert "SECRET" not in line
    fields = json.loads(line)
    assert fields["request_id"] == "client-id-123" and fields["status"] == 200
    assert (
        fields["finish_reason"] == "stop"
        and fields["prompt_tokens"] == 5
        and fields["completion_tokens"] == 2
    )
    assert fields["session_id"] == "sess_x" and 20 <= fields["ttft_ms"] <= fields["duration_ms"]


def test_unsafe_request_ids_are_replaced_and_unknown_paths_share_one_label(
    log_lines: Callable[[], list[str]],
) -> None:
    async def not_found(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    asyncio.run(
        call(access_log.RequestObserver(not_found), "/x/1", [(b"x-request-id", b"evil\n{fake}")])
    )
    asyncio.run(
        call(access_log.RequestObserver(not_found), "/x/2", [(b"x-request-id", b"x" * 129)])
    )
    assert value("shepherd_requests_total", route="unmatched", status="404") == 2
    lines = [json.loads(line) for line in log_lines()]
    assert len(lines) == 2 and all(line["request_id"].startswith("req-") for line in lines)


def test_a_handle_call_is_logged_once_with_its_generation(
    log_lines: Callable[[], list[str]],
) -> None:
    with access_log.handle_call("chat"):
        request = metrics.RequestMetrics("chat", session_id="sess_y")
        request.on_tokens(1)
        request.on_finish("length", num_prompt_tokens=3, num_completion_tokens=1)
    [line] = log_lines()
    fields = json.loads(line)
    assert fields["event"] == "handle_call" and fields["route"] == "chat"
    assert (fields["status"], fields["finish_reason"], fields["session_id"]) == (
        200,
        "length",
        "sess_y",
    )


def test_a_request_that_raises_counts_as_500_and_probes_are_not_logged(
    log_lines: Callable[[], list[str]],
) -> None:
    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    async def ok(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    with pytest.raises(RuntimeError):
        asyncio.run(call(access_log.RequestObserver(broken), "/v1/completions", []))
    asyncio.run(call(access_log.RequestObserver(ok), "/health", []))
    assert value("shepherd_requests_total", route="/v1/completions", status="500") == 1
    assert value("shepherd_requests_total", route="/health", status="200") == 1
    assert [json.loads(line)["route"] for line in log_lines()] == ["/v1/completions"]
