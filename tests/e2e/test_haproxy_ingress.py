"""Ray Serve's HAProxy ingress (`RAY_SERVE_ENABLE_HA_PROXY=1 serve run serve_config.yaml`): HAProxy forwards
HTTP straight to the Router replica's own server, skipping Serve's proxy actor and its two extra hops per
request (benchmarks/RESULTS.md, R2.1). The same app must behave the same behind it: streaming, errors, and a
client that goes away mid-turn."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.conftest import AUTH, MODEL, REPO, _port_is_free, app_env, serve_run

pytestmark = pytest.mark.e2e

PORT = 8010
BASE_URL = f"http://127.0.0.1:{PORT}"


@pytest.fixture(scope="module")
def haproxy_url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if shutil.which("haproxy") is None:
        pytest.skip("no haproxy binary on PATH (.ci/run installs it with apt)")
    if not _port_is_free(PORT):
        pytest.fail(f"port {PORT} is busy")
    workdir = tmp_path_factory.mktemp("haproxy")
    spec = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    spec["http_options"] = {**spec.get("http_options", {}), "host": "127.0.0.1", "port": PORT}
    config = workdir / "serve_config.yaml"
    config.write_text(yaml.safe_dump(spec))
    env = {**app_env(model_dir), "RAY_SERVE_ENABLE_HA_PROXY": "1"}
    with serve_run(config, BASE_URL, workdir / "serve-run.log", env):
        yield BASE_URL


def _client(base_url: str) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=AUTH["authorization"].split()[1])


def test_streamed_and_whole_replies_agree_behind_haproxy(haproxy_url: str) -> None:
    client = _client(haproxy_url)
    messages = [{"role": "user", "content": "hello there"}]
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0
    )
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    assert len(chunks) > 2  # streamed, not one buffered body
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        whole.choices[0].message.content
    )
    assert whole.usage.completion_tokens == 12


def test_bad_input_is_a_400_naming_the_field_behind_haproxy(haproxy_url: str) -> None:
    reply = httpx.post(
        f"{haproxy_url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -1},
        headers=AUTH,
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "max_tokens"


def test_a_client_gone_mid_turn_frees_the_session_behind_haproxy(haproxy_url: str) -> None:
    session_id = httpx.post(f"{haproxy_url}/v1/sessions", json={}, headers=AUTH).json()["id"]
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "a long one"}],
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
        "session_id": session_id,
    }
    with httpx.stream(
        "POST", f"{haproxy_url}/v1/chat/completions", json=body, headers=AUTH, timeout=60
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        next(lines)
        busy = httpx.post(
            f"{haproxy_url}/v1/chat/completions", json={**body, "stream": False}, headers=AUTH
        )
        assert busy.status_code == 409
    # HAProxy passes the disconnect on: the Router cancels the turn and releases the session.
    deadline = time.monotonic() + 20
    while True:
        reply = httpx.post(
            f"{haproxy_url}/v1/chat/completions",
            json={**body, "stream": False, "max_tokens": 2},
            headers=AUTH,
            timeout=60,
        )
        if reply.status_code == 200:
            break
        assert reply.status_code == 409 and time.monotonic() < deadline
        time.sleep(0.2)
    session = httpx.get(f"{haproxy_url}/v1/sessions/{session_id}", headers=AUTH).json()
    assert session["num_turns"] == 1  # the cut turn left no trace; the short one is kept
