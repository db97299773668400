"""A client that disconnects cancels the engine request; Python handles from another Ray job stream too."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import API_KEY, AUTH, MODEL, REPO, ServeApp

pytestmark = pytest.mark.e2e


def test_disconnect_mid_stream_cancels_the_engine_request(
    base_url: str, engine_handle: Any
) -> None:
    before = engine_handle.stats.remote().result().executor
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "write a lot"}],
        "max_tokens": 1800,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=60
    ) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
    # The connection is closed here, long before 1,800 tokens could have been generated.
    deadline = time.monotonic() + 20
    while True:
        stats = engine_handle.stats.remote().result().executor
        if (
            stats.num_cancelled_requests > before.num_cancelled_requests
            and stats.num_active_requests == 0
        ):
            break
        assert time.monotonic() < deadline, f"engine request was not cancelled: {stats}"
        time.sleep(0.2)
    assert stats.num_generated_tokens - before.num_generated_tokens < 1800


HANDLE_SCRIPT = """
import json, sys, ray
from ray import serve
address, model, api_key = sys.argv[1:4]
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
handle = serve.get_app_handle("shepherd")
body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "temperature": 0}
chunks = list(handle.options(stream=True).chat_stream.remote(body, api_key=api_key))
whole = handle.chat.remote(body, api_key=api_key).result()
print(json.dumps({"chunks": chunks, "whole": whole}))
"""


def test_handle_from_another_ray_job_streams_chat_chunks(serve_app: ServeApp, client: Any) -> None:
    result = subprocess.run(
        [sys.executable, "-c", HANDLE_SCRIPT, serve_app.ray_address, MODEL, API_KEY],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    chunks, whole = payload["chunks"], payload["whole"]
    assert len(chunks) > 2
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks if c["choices"])
    assert streamed == whole["choices"][0]["message"]["content"]
    http_reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=12, temperature=0
    )
    assert http_reply.choices[0].message.content == streamed


def test_handle_call_with_bad_input_raises_a_request_error(ray_driver: None) -> None:
    from ray import serve

    from deployments.errors import RequestError

    handle = serve.get_app_handle("shepherd")
    with pytest.raises(RequestError) as raised:
        handle.chat.remote({"model": MODEL, "messages": []}, api_key=API_KEY).result()
    assert raised.value.param == "messages"
