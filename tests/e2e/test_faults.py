"""Faults on a real Ray Serve: replicas killed mid-stream and between turns, a dead executor, and what the logs
and Ray's metrics endpoint show meanwhile.

Killing actors must not disturb the suite's shared app, so the scenarios run in a subprocess with a fresh
local Ray of its own (`python -m tests.e2e.test_faults`): the shepherd app built by `build_app` from
serve_config.yaml, with an Engine subclass that can kill its own executor, a 1 s engine health-check period,
a private SQLite session store and API keys. The subprocess prints one JSON result; the tests below each
check their part of it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from deployments.engine import Engine
from tests.e2e.conftest import REPO, run_module_for_result

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RESULT_PREFIX = "FAULTS-E2E "
APP_NAME = "faults"
MODEL = "shepherd-tiny"
RECOVERY_TIMEOUT_S = 120.0
SUBPROCESS_TIMEOUT_S = 280.0


class FaultyEngine(Engine):
    """The Engine, plus a way to kill its executor from outside (as a crashed engine thread would)."""

    async def kill_executor(self) -> None:
        await self._executor.shutdown()

    def replica_id(self) -> str:
        return str(self._replica_id)


# ---- the subprocess -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _deadline_loop(timeout_s: float, step_s: float = 0.5) -> Iterator[None]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        yield
        time.sleep(step_s)


class Driver:
    """HTTP and Ray calls against the subprocess's app; every wait is bounded."""

    def __init__(self, base_url: str, api_key: str) -> None:
        import httpx

        self.base_url = base_url
        self.auth = {"authorization": f"Bearer {api_key}"}
        self.http = httpx.Client(base_url=base_url, headers=self.auth, timeout=60)

    def create_session(self) -> str:
        response = self.http.post("/v1/sessions", json={"system_prompt": "Be brief."})
        response.raise_for_status()
        session_id: str = response.json()["id"]
        return session_id

    def session(self, session_id: str) -> dict[str, Any]:
        view: dict[str, Any] = self.http.get(f"/v1/sessions/{session_id}").json()
        return view

    def say(self, session_id: str, text: str, **extra: Any) -> Any:
        body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4}
        return self.http.post(
            "/v1/chat/completions", json={**body, "session_id": session_id, **extra}
        )

    def say_until_served(self, session_id: str, text: str) -> dict[str, Any]:
        """Retries one turn until it is served; reports the statuses seen on the way and how long it took."""
        started, statuses = time.monotonic(), []
        for _ in _deadline_loop(RECOVERY_TIMEOUT_S):
            try:
                response = self.say(session_id, text)
                statuses.append(response.status_code)
                if response.status_code == 200:
                    break
            except (
                Exception
            ) as error:  # the proxy may drop the connection while the replica restarts
                statuses.append(type(error).__name__)
        return {"statuses": statuses, "recovery_s": round(time.monotonic() - started, 2)}

    def replica_actor_names(self, deployment: str) -> list[str]:
        import ray

        names = ray.util.list_named_actors(all_namespaces=True)
        return sorted(a["name"] for a in names if f"{APP_NAME}#{deployment}#" in a["name"])

    def kill_replica(self, deployment: str) -> str:
        import ray

        [name] = self.replica_actor_names(deployment)
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        return name


def scenario_engine_killed_mid_stream(driver: Driver) -> dict[str, Any]:
    import httpx

    session_id = driver.create_session()
    assert driver.say(session_id, "first turn").status_code == 200
    before = driver.session(session_id)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "a long reply please"}],
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
        "session_id": session_id,
    }
    lines: list[str] = []
    killed = ""
    started = time.monotonic()
    timeout = httpx.Timeout(60, read=30)
    with driver.http.stream("POST", "/v1/chat/completions", json=body, timeout=timeout) as response:
        status = response.status_code
        for line in response.iter_lines():
            if line:
                lines.append(line)
            if len(lines) == 3 and not killed:
                killed = driver.kill_replica("Engine")
                started = time.monotonic()
    stream_end_s = time.monotonic() - started
    after = driver.session(session_id)
    recovery = driver.say_until_served(session_id, "after the crash")
    final = driver.session(session_id)
    return {
        "status": status,
        "killed": killed,
        "num_lines": len(lines),
        "tail": lines[-3:],
        "stream_end_s": round(stream_end_s, 2),
        "history_unchanged": after["messages"] == before["messages"]
        and after["num_turns"] == before["num_turns"],
        "recovery": recovery,
        "final_num_turns": final["num_turns"],
        "final_user_messages": [m["content"] for m in final["messages"] if m["role"] == "user"],
    }


def scenario_router_killed_between_turns(driver: Driver) -> dict[str, Any]:
    session_id = driver.create_session()
    replies = [driver.say(session_id, f"turn {k}") for k in range(2)]
    before = driver.session(session_id)
    killed = driver.kill_replica("Router")
    recovery = driver.say_until_served(session_id, "turn 2")
    after = driver.session(session_id)
    return {
        "statuses_before": [r.status_code for r in replies],
        "killed": killed,
        "new_replicas": driver.replica_actor_names("Router"),
        "recovery": recovery,
        "before_messages": before["messages"],
        "after_messages": after["messages"],
        "after_num_turns": after["num_turns"],
    }


def scenario_dead_executor_is_replaced(driver: Driver) -> dict[str, Any]:
    from ray import serve

    engine = serve.get_deployment_handle("Engine", app_name=APP_NAME)
    old_replica = engine.replica_id.remote().result()
    engine.kill_executor.remote().result()
    session_id = driver.create_session()
    dead = driver.say(session_id, "while the executor is dead")
    started, new_replica = time.monotonic(), old_replica
    for _ in _deadline_loop(RECOVERY_TIMEOUT_S):
        try:
            new_replica = engine.replica_id.remote().result(timeout_s=10)
        except Exception:
            continue
        if new_replica != old_replica:
            break
    replaced_s = time.monotonic() - started
    recovery = driver.say_until_served(session_id, "after the replacement")
    return {
        "dead_status": dead.status_code,
        "dead_body": dead.text[:300],
        "dead_retry_after": dead.headers.get("retry-after"),
        "old_replica": old_replica,
        "new_replica": new_replica,
        "replaced_s": round(replaced_s, 2),
        "recovery": recovery,
        "history_user_messages": [
            m["content"] for m in driver.session(session_id)["messages"] if m["role"] == "user"
        ],
    }


def scenario_backpressure(driver: Driver, other_key: str) -> dict[str, Any]:
    """Per-key limit (429) and a full engine queue (503), both with Retry-After.

    The app runs with `router.max_concurrent_requests_per_key: 2` and one engine slot plus one queue slot.
    """
    host, port = driver.base_url.removeprefix("http://").split(":")
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": 1900,
        "ignore_eos": True,
    }
    result: dict[str, Any] = {}
    # 1) Two uploads of key A that never finish hold both of its slots; its third request is refused.
    stalled = []
    try:
        for _ in range(2):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: {driver.auth['authorization']}\r\nContent-Length: 1000\r\n\r\n{{".encode()
            )
            stalled.append(sock)
        time.sleep(1.0)  # the proxy hands both to the router before their bodies arrive
        refused = driver.http.post("/v1/chat/completions", json=body)
        result["key_limit"] = [
            refused.status_code,
            refused.headers.get("retry-after"),
            refused.text[:300],
        ]
    finally:
        for sock in stalled:
            sock.close()

    # 2) Key B fills the engine slot and its queue slot; the next request finds the queue full.
    def call(headers: dict[str, str]) -> int:
        return driver.http.post("/v1/chat/completions", json=body, headers=headers).status_code

    other = {"authorization": f"Bearer {other_key}"}
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(call, other)
        time.sleep(0.3)
        queued = pool.submit(call, other)
        time.sleep(0.3)
        full = driver.http.post("/v1/chat/completions", json=body)
        result["engine_full"] = [full.status_code, full.headers.get("retry-after"), full.text[:300]]
        result["running_and_queued"] = [running.result(timeout=120), queued.result(timeout=120)]
    return result


def scenario_logs_and_metrics(
    driver: Driver, api_key: str, logs_dir: Path, metrics_port: int
) -> dict[str, Any]:
    import httpx

    marker = f"PROMPT-MARKER-{secrets.token_hex(6)}"
    bad_key = f"BAD-KEY-{secrets.token_hex(6)}"
    request_id = f"faults-req-{secrets.token_hex(4)}"
    body = {"model": MODEL, "messages": [{"role": "user", "content": marker}], "max_tokens": 3}
    served = driver.http.post(
        "/v1/chat/completions", json=body, headers={"x-request-id": request_id}
    )
    refused = httpx.post(
        f"{driver.base_url}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {bad_key}"},
    )
    bad = driver.http.post(
        "/v1/chat/completions", json={**body, "temperature": -1}
    )  # a 400 that logs a warning
    summary = driver.http.get("/metrics")
    ray_series: list[str] = []
    for _ in _deadline_loop(40, step_s=1.0):  # Ray's agent exports on its report interval
        try:
            text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        except httpx.HTTPError:
            continue
        ray_series = sorted(
            {
                line.split("{")[0].split(" ")[0]
                for line in text.splitlines()
                if "shepherd_" in line[:40] and not line.startswith("#")
            }
        )
        if any("time_to_first_token" in name for name in ray_series):
            break
    time.sleep(2)  # log files are flushed line by line, but give the replicas' writers a moment
    leaks, access_lines = [], []
    for path in logs_dir.rglob("*"):
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        leaks += [
            f"{path.name}: {secret}" for secret in (marker, bad_key, api_key) if secret in text
        ]
        if (
            path.parent.name == "serve"
        ):  # replica log files (stderr copies the same lines into worker-*.err)
            access_lines += [
                line
                for line in text.splitlines()
                if request_id in line and '"event":"request"' in line
            ]
    return {
        "statuses": [served.status_code, refused.status_code, bad.status_code],
        "leaks": leaks,
        "access_lines": access_lines,
        "summary_status": summary.status_code,
        "summary_has_ttft": "shepherd_time_to_first_token_seconds" in summary.text,
        "ray_series": ray_series,
    }


def main() -> None:
    import ray
    import yaml
    from ray import serve

    import deployments.app as app_module
    from deployments.config import EngineConfig

    api_key, other_key = os.environ["SHEPHERD_API_KEYS"].split(",")
    work = Path(tempfile.mkdtemp(prefix="shepherd-faults-"))
    port = _free_port()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    results: dict[str, Any] = {}
    try:
        node = ray._private.worker.global_worker.node
        logs_dir, metrics_port = Path(node.get_logs_dir_path()), node.metrics_export_port
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]["args"]
        args["engine"]["health_check_period_s"] = 1.0
        args["sessions"] = {"store": {"sqlite_path": str(work / "sessions.sqlite3")}}
        if "max_queued_requests" in EngineConfig.model_fields:  # limits small enough to reach
            args["engine"].update(max_ongoing_requests=1, max_queued_requests=1)
            args["router"]["max_concurrent_requests_per_key"] = 2
        build_engine = app_module.engine_deployment
        app_module.engine_deployment = lambda *a: build_engine(*a).options(
            func_or_class=FaultyEngine
        )
        serve.run(app_module.build_app(args), name=APP_NAME, route_prefix="/")
        driver = Driver(f"http://127.0.0.1:{port}", api_key)
        scenarios: dict[str, Callable[[], dict[str, Any]]] = {
            "backpressure": lambda: scenario_backpressure(driver, other_key),
            "logs_and_metrics": lambda: scenario_logs_and_metrics(
                driver, api_key, logs_dir, metrics_port
            ),
            "engine_killed_mid_stream": lambda: scenario_engine_killed_mid_stream(driver),
            "router_killed_between_turns": lambda: scenario_router_killed_between_turns(driver),
            "dead_executor_is_replaced": lambda: scenario_dead_executor_is_replaced(driver),
        }
        for name, scenario in scenarios.items():
            started = time.monotonic()
            try:
                results[name] = scenario()
            except Exception as error:  # one broken scenario must not hide the others' results
                results[name] = {"error": f"{type(error).__name__}: {error}"}
            results[name]["duration_s"] = round(time.monotonic() - started, 2)
    finally:
        print(RESULT_PREFIX + json.dumps(results), flush=True)
        serve.shutdown()
        ray.shutdown()


# ---- the tests ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def faults(model_dir: Path) -> dict[str, Any]:
    api_key, other_key = (f"faults-key-{secrets.token_hex(8)}" for _ in range(2))
    run = run_module_for_result(
        "tests.e2e.test_faults",
        RESULT_PREFIX,
        SUBPROCESS_TIMEOUT_S,
        env={
            "SHEPHERD_CACHE_DIR": str(model_dir.parent),
            "SHEPHERD_API_KEYS": f"{api_key},{other_key}",
        },
    )
    output = run.output
    assert run.result is not None, output[-4000:]
    results: dict[str, Any] = run.result
    for name, result in results.items():
        assert "error" not in result, f"{name}: {result['error']}\n{output[-3000:]}"
    return results


def test_killing_the_engine_mid_stream_ends_the_stream_with_an_error_and_done(
    faults: dict[str, Any],
) -> None:
    result = faults["engine_killed_mid_stream"]
    assert result["status"] == 200 and result["killed"]
    *_, error_line, done = result["tail"]
    assert done == "data: [DONE]", result
    error = json.loads(error_line.removeprefix("data: "))["error"]
    assert error["type"] == "engine_error" and "unavailable" in error["message"], result
    assert result["stream_end_s"] < 30, "the stream must end promptly, not hang"


def test_a_turn_cut_by_an_engine_crash_leaves_history_unchanged_and_the_next_turn_is_served(
    faults: dict[str, Any],
) -> None:
    result = faults["engine_killed_mid_stream"]
    assert result["history_unchanged"], result
    assert result["recovery"]["statuses"][-1] == 200, result["recovery"]
    assert result["final_num_turns"] == 2
    assert result["final_user_messages"] == ["first turn", "after the crash"]


def test_killing_the_router_between_turns_loses_no_turn(faults: dict[str, Any]) -> None:
    result = faults["router_killed_between_turns"]
    assert result["statuses_before"] == [200, 200] and result["killed"]
    assert result["recovery"]["statuses"][-1] == 200, result["recovery"]
    assert result["new_replicas"] and result["killed"] not in result["new_replicas"]
    assert result["after_messages"][: len(result["before_messages"])] == result["before_messages"]
    assert result["after_num_turns"] == 3
    assert [m["content"] for m in result["after_messages"] if m["role"] == "user"] == [
        "turn 0",
        "turn 1",
        "turn 2",
    ]


def test_a_dead_executor_fails_health_checks_and_serve_replaces_the_replica(
    faults: dict[str, Any],
) -> None:
    result = faults["dead_executor_is_replaced"]
    assert result["dead_status"] == 503, result  # EngineDead, not a 500 and not a hang
    assert result["new_replica"] != result["old_replica"], result
    assert result["recovery"]["statuses"][-1] == 200, result["recovery"]
    assert result["history_user_messages"] == ["after the replacement"]


def test_dead_engine_answers_carry_retry_after(faults: dict[str, Any]) -> None:
    """The error handler adds Retry-After to 503s."""
    assert faults["dead_executor_is_replaced"]["dead_retry_after"] == "1"


def test_a_key_over_its_limit_gets_429_and_a_full_engine_queue_503_both_with_retry_after(
    faults: dict[str, Any],
) -> None:
    result = faults["backpressure"]
    status, retry_after, body = result["key_limit"]
    assert (status, retry_after) == (429, "1"), body
    assert json.loads(body)["error"]["code"] == "concurrency_limit_exceeded"
    status, retry_after, body = result["engine_full"]
    assert (status, retry_after) == (503, "1"), body
    assert json.loads(body)["error"]["code"] == "engine_overloaded"
    assert result["running_and_queued"] == [200, 200]


def test_keys_and_prompts_never_reach_the_logs(faults: dict[str, Any]) -> None:
    result = faults["logs_and_metrics"]
    assert result["statuses"] == [200, 401, 400]
    assert result["leaks"] == [], result["leaks"]


def test_each_request_gets_one_structured_log_line_with_the_clients_request_id(
    faults: dict[str, Any],
) -> None:
    """One line per request from the RequestObserver middleware."""
    [line] = faults["logs_and_metrics"]["access_lines"]
    fields = json.loads(line[line.index("{") :])
    assert fields["status"] == 200 and fields["route"] == "/v1/chat/completions"
    assert fields["finish_reason"] in ("stop", "length") and fields["completion_tokens"] > 0


def test_metrics_reach_rays_endpoint_and_the_ingress_summary(faults: dict[str, Any]) -> None:
    """Needs the observability patches (router, generation and engine wiring)."""
    result = faults["logs_and_metrics"]
    assert result["summary_status"] == 200 and result["summary_has_ttft"]
    names = " ".join(result["ray_series"])
    for metric in ("time_to_first_token_seconds", "requests_total", "engine_active_requests"):
        assert metric in names, result["ray_series"]


if __name__ == "__main__":
    main()
