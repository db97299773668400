"""The agent examples against the suite's app: over HTTP in this process, through a handle from another Ray job.

The embedded model never calls tools, so each test drives one round with a scripted tool call: the example
runs it locally and builds the next turn's messages, which go through the session API like any turn.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from examples import agent_http
from examples.agent import SYSTEM_PROMPT, Toolbox, calculate, next_messages, run_agent
from tests.e2e.conftest import API_KEY, REPO, ServeApp

pytestmark = pytest.mark.e2e

NOTES = "The launch window opens at 09:30 UTC."
SCRIPTED_CALL = {
    "role": "assistant",
    "content": "",
    "tool_calls": [
        {
            "id": "call_read",
            "type": "function",
            "function": {"name": "read_file", "arguments": '{"path": "notes.txt"}'},
        },
        {
            "id": "call_calc",
            "type": "function",
            "function": {"name": "calculate", "arguments": '{"expression": "(17 + 4) * 3"}'},
        },
    ],
}
EXPECTED_RESULTS = [
    {"role": "tool", "tool_call_id": "call_read", "content": NOTES},
    {"role": "tool", "tool_call_id": "call_calc", "content": "63"},
]
# user, the model's plain reply, the scripted call, its two results, the model's reply to them.
EXPECTED_ROLES = ["user", "assistant", "assistant", "tool", "tool", "assistant"]


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    (tmp_path / "notes.txt").write_text(NOTES)
    return tmp_path


def test_tools_run_locally_and_failures_become_results(workspace: Path) -> None:
    toolbox = Toolbox(workspace)
    assert next_messages(SCRIPTED_CALL, toolbox, is_recorded=False) == [
        SCRIPTED_CALL,
        *EXPECTED_RESULTS,
    ]
    outside = {"id": "c", "function": {"name": "read_file", "arguments": '{"path": "../x"}'}}
    assert "outside the workspace" in toolbox.run(outside)["content"]
    unknown = {"id": "c", "function": {"name": "rm", "arguments": "{}"}}
    assert toolbox.run(unknown)["content"].startswith("error: KeyError")
    assert calculate("2 ** 10 - 1 / 4") == 1023.75
    with pytest.raises(ValueError):
        calculate("__import__('os')")


def test_loop_sends_only_results_after_a_reply_the_session_recorded(workspace: Path) -> None:
    sent: list[list[dict[str, Any]]] = []
    replies = iter([SCRIPTED_CALL, {"role": "assistant", "content": "09:30 UTC, and 63."}])

    def send(messages: list[dict[str, Any]]) -> dict[str, Any]:
        sent.append(messages)
        return next(replies)

    answer = run_agent(send, "When does the window open?", Toolbox(workspace))
    assert answer == "09:30 UTC, and 63."
    assert sent == [[{"role": "user", "content": "When does the window open?"}], EXPECTED_RESULTS]


def test_http_agent_round_trips_a_tool_call_through_its_session(
    client: Any, workspace: Path
) -> None:
    session = agent_http.create_session(client)
    send = agent_http.turn_sender(client, session, max_tokens=8, temperature=0)
    first = send([{"role": "user", "content": "When does the launch window open?"}])
    assert not first.get("tool_calls"), "the embedded model is not expected to call tools"
    send(next_messages(SCRIPTED_CALL, Toolbox(workspace), is_recorded=False))
    view = agent_http.get_session(client, session["id"])
    assert [m["role"] for m in view["messages"]] == EXPECTED_ROLES
    assert view["messages"][2]["tool_calls"][1]["function"]["name"] == "calculate"
    assert view["messages"][3:5] == EXPECTED_RESULTS
    assert [t["function"]["name"] for t in view["tools"]] == ["read_file", "calculate"]
    agent_http.delete_session(client, session["id"])


def test_http_agent_cli_answers_on_a_session_it_creates(
    base_url: str, client: Any, workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--base-url", base_url, "--api-key", API_KEY, "--workspace", str(workspace)]
    agent_http.main([*argv, "--max-tokens", "8", "--keep-session", "Hello?"])
    *_, session_line = capsys.readouterr().out.strip().splitlines()
    session_id = session_line.removeprefix("session: ")
    view = agent_http.get_session(client, session_id)
    assert view["num_turns"] == 1 and view["system_prompt"] == SYSTEM_PROMPT
    agent_http.delete_session(client, session_id)


HANDLE_ROUND = """
import json, sys
import ray
from ray import serve
from examples import agent_handle
from examples.agent import Toolbox, next_messages

address, api_key, workspace, scripted = sys.argv[1:5]
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
router = serve.get_app_handle("shepherd")
session = agent_handle.create_session(router, api_key)
send = agent_handle.turn_sender(router, session, api_key, max_tokens=8, temperature=0)
first = send([{"role": "user", "content": "When does the launch window open?"}])
send(next_messages(json.loads(scripted), Toolbox(workspace), is_recorded=False))
view = agent_handle.get_session(router, session["id"], api_key)
agent_handle.delete_session(router, session["id"], api_key)
print(json.dumps({"first": first, "view": view}))
"""


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=180
    )


def test_handle_agent_round_trips_a_tool_call_from_another_ray_job(
    serve_app: ServeApp, workspace: Path
) -> None:
    result = _run(
        ["-c", HANDLE_ROUND, serve_app.ray_address, API_KEY, str(workspace)]
        + [json.dumps(SCRIPTED_CALL)]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert not payload["first"].get("tool_calls")
    view = payload["view"]
    assert [m["role"] for m in view["messages"]] == EXPECTED_ROLES
    assert view["messages"][3:5] == EXPECTED_RESULTS


def test_handle_agent_cli_runs_unchanged_from_another_ray_job(
    serve_app: ServeApp, workspace: Path
) -> None:
    result = _run(
        ["-m", "examples.agent_handle", "--address", serve_app.ray_address]
        + ["--api-key", API_KEY, "--workspace", str(workspace), "--max-tokens", "8", "Hello?"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
