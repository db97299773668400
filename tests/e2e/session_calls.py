"""Session calls over HTTP shared by the session tests (behind HAProxy and behind Serve's proxy)."""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.e2e.conftest import AUTH, MODEL


def create_session(base_url: str, **body: Any) -> str:
    response = httpx.post(f"{base_url}/v1/sessions", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    session_id: str = response.json()["id"]
    assert len(session_id) >= 27  # "sess_" + 160 bits, URL-safe
    return session_id


def get_session(base_url: str, session_id: str, headers: dict[str, str] = AUTH) -> httpx.Response:
    return httpx.get(f"{base_url}/v1/sessions/{session_id}", headers=headers)


def long_turn(session_id: str, text: str) -> dict[str, Any]:
    """A streamed session turn of 1,500 tokens: long enough to interrupt."""
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
        "session_id": session_id,
    }


def cut_a_turn_short(base_url: str, session_id: str, text: str) -> None:
    """Starts a long streamed turn, checks that a concurrent turn gets 409, disconnects mid-stream, then
    waits until the session takes a (2-token) turn again: the Router saw the disconnect and freed it."""
    body = long_turn(session_id, text)
    with httpx.stream(
        "POST", f"{base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=60
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # kept: dropping the iterator would close the stream at once
        next(lines)
        second = httpx.post(
            f"{base_url}/v1/chat/completions", json={**body, "stream": False}, headers=AUTH
        )
        assert second.status_code == 409
        assert second.json()["error"]["param"] == "session_id"
    deadline = time.monotonic() + 20
    while True:
        reply = httpx.post(
            f"{base_url}/v1/chat/completions",
            json={**body, "stream": False, "max_tokens": 2},
            headers=AUTH,
            timeout=60,
        )
        if reply.status_code == 200:
            return
        assert reply.status_code == 409 and time.monotonic() < deadline
        time.sleep(0.2)
