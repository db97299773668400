"""Faults on a real Ray Serve: replicas killed mid-stream and between turns, a dead executor, and what the logs
and Ray's metrics endpoint show meanwhile.

Killing actors must not disturb the suite's shared app, so the scenarios run in a subprocess with a fresh
local Ray of its own (`python -m tests.e2e.test_faults`): the shepherd app built by `build_app` from
the suite's tiny config, with an Engine subclass that can kill its own executor, 0.5 s health-check periods,
a private SQLite session store and API keys. The subprocess prints one JSON result; the tests below each
check their part of it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cluster.local import REPO, local_ray, run_module
from deployments.engine import Engine
from tests.e2e.conftest import TINY_CONFIG
from tests.e2e.session_calls import long_turn

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RESULT_PREFIX = "FAULTS-E2E "
APP_NAME = "faults"
MODEL = "shepherd-tiny"
RECOVERY_TIMEOUT_S = 120.0
LEASE_TTL_S = 2.0
GRACE_S = 5.0  # router.graceful_shutdown_timeout_s
HEALTH_CHECK_PERIOD_S = 0.5
SUBPROCESS_TIMEOUT_S = 330.0


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

    def respond(self, text: str, **extra: Any) -> dict[str, Any]:
        body = {"model": MODEL, "input": text, "max_output_tokens": 4, **extra}
        response = self.http.post("/v1/responses", json=body)
        response.raise_for_status()
        reply: dict[str, Any] = response.json()
        return reply

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
    body = long_turn(session_id, "a long reply please")
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


def scenario_router_killed(driver: Driver) -> dict[str, dict[str, Any]]:
    """One Router kill, two sessions: one between turns (its stored responses too), and one whose turn is
    streaming, whose lease dies with the Router (`sessions.lease_ttl_s`). Each Router restart costs seconds
    of a 2-core machine; the sessions are independent, so one restart shows both."""
    between = driver.create_session()
    replies = [driver.say(between, f"turn {k}") for k in range(2)]
    before = driver.session(between)
    chain = driver.respond("chain 0")
    chain = driver.respond("chain 1", previous_response_id=chain["id"])
    streaming = driver.create_session()
    assert driver.say(streaming, "first turn").status_code == 200
    body = long_turn(streaming, "a long reply please")
    killed = ""
    with driver.http.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                killed = driver.kill_replica("Router")
                break
    killed_at = time.monotonic()
    statuses: list[tuple[float, int | str]] = []
    for _ in _deadline_loop(RECOVERY_TIMEOUT_S, step_s=0.2):
        try:
            status: int | str = driver.say(streaming, "after the crash").status_code
        except Exception as error:  # the proxy may drop the connection while the replica restarts
            status = type(error).__name__
        statuses.append((round(time.monotonic() - killed_at, 2), status))
        if status == 200:
            break
    final = driver.session(streaming)
    recovery = driver.say_until_served(between, "turn 2")
    after = driver.session(between)
    retrieved = driver.http.get(f"/v1/responses/{chain['id']}").json()
    continued = driver.respond("chain 2", previous_response_id=chain["id"])
    return {
        "between_turns": {
            "chain_output_before": chain["output"],
            "chain_output_after": retrieved.get("output"),
            "continued_cached_tokens": continued["usage"]["input_tokens_details"]["cached_tokens"],
            "statuses_before": [r.status_code for r in replies],
            "killed": killed,
            "new_replicas": driver.replica_actor_names("Router"),
            "recovery": recovery,
            "before_messages": before["messages"],
            "after_messages": after["messages"],
            "after_num_turns": after["num_turns"],
        },
        "mid_stream": {
            "killed": killed,
            "statuses": statuses,
            "final_user_messages": [m["content"] for m in final["messages"] if m["role"] == "user"],
        },
    }


def scenario_stopped_mid_stream(driver: Driver, sqlite_path: Path) -> dict[str, Any]:
    """`serve.shutdown()`, what `serve run` does on SIGINT (ray/serve/scripts.py), while a session turn streams:
    the proxies go first and cut the client; the turn must not be committed (a retry would duplicate it).
    Runs last: it stops the app. What a restart would load is then read from the session file itself."""
    import asyncio
    import threading

    import httpx
    from ray import serve

    from deployments.sessions.sqlite import SQLiteSessionStore

    session_id = driver.create_session()
    assert driver.say(session_id, "first turn").status_code == 200
    before = driver.session(session_id)
    lines: list[str] = []
    streaming = threading.Event()

    def read() -> None:
        with httpx.stream(
            "POST",
            f"{driver.base_url}/v1/chat/completions",
            json=long_turn(session_id, "a long reply please"),
            headers=driver.auth,
            timeout=60,
        ) as response:
            try:
                for line in response.iter_lines():
                    lines.append(line)
                    if len(lines) == 20:
                        streaming.set()
            except httpx.HTTPError:
                pass  # the proxy went first: a cut connection

    with ThreadPoolExecutor(1) as pool:
        reader = pool.submit(read)
        assert streaming.wait(60), lines
        started = time.monotonic()
        serve.shutdown()
        stop_s = time.monotonic() - started
        reader.result(timeout=60)

    async def stored() -> tuple[Any, str | None]:
        store = SQLiteSessionStore(str(sqlite_path), idle_ttl_s=None)
        try:
            # Free: the stopped router gave it back (or, had it not, lease_ttl_s has run out meanwhile).
            return await store.load(session_id), await store.acquire_turn(session_id, ttl_s=1.0)
        finally:
            await store.close()

    state, lease = asyncio.run(stored())
    return {
        "num_lines": len(lines),
        "has_done": "data: [DONE]" in lines,
        "stop_s": round(stop_s, 2),
        "history_unchanged": state is not None
        and [(m["role"], m.get("content")) for m in state.messages]
        == [(m["role"], m.get("content")) for m in before["messages"]]
        and len(state.token_ids) == before["num_tokens"]
        and state.num_turns == before["num_turns"] == 1,
        "lease_free": lease is not None,
    }


def scenario_dead_executor_is_replaced(driver: Driver) -> dict[str, Any]:
    from ray import serve

    engine = serve.get_deployment_handle("Engine", app_name=APP_NAME)
    old_replica = engine.replica_id.remote().result()
    engine.kill_executor.remote().result()
    session_id = driver.create_session()
    dead = driver.say(session_id, "while the executor is dead")
    started, new_replica = time.monotonic(), old_replica
    for _ in _deadline_loop(RECOVERY_TIMEOUT_S, step_s=0.1):
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

    # 2) Key B fills the engine slot and its queue slot; the next request finds the queue full. B's two
    # requests stream: each is served once its first token is out (the status comes with it), and then
    # the client goes away, so that the slot frees without generating all of max_tokens.
    other = {"authorization": f"Bearer {other_key}"}
    streamed = {**body, "stream": True}
    running_started = threading.Event()
    release = threading.Event()

    def call(started: threading.Event | None) -> int:
        with driver.http.stream(
            "POST", "/v1/chat/completions", json=streamed, headers=other
        ) as response:
            lines = (
                response.iter_lines()
            )  # kept: dropping the iterator would close the stream at once
            next(lines, None)  # the first token: the request holds the slot (or has left the queue)
            if started is not None:
                started.set()
                release.wait(120)
            return response.status_code

    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(call, running_started)
        try:
            assert running_started.wait(60), "the first request of key B never started"
            queued = pool.submit(call, None)
            time.sleep(0.3)  # the queued request reaches the engine's queue
            full = driver.http.post("/v1/chat/completions", json=body)
        finally:
            release.set()  # the running request goes away: the queued one gets the slot
        result["engine_full"] = [full.status_code, full.headers.get("retry-after"), full.text[:300]]
        result["running_and_queued"] = [running.result(timeout=120), queued.result(timeout=120)]
    return result


def scenario_logs_and_metrics(
    driver: Driver,
    api_key: str,
    logs_dir: Path,
    metrics_port: int,
    meanwhile: Callable[[], None],
) -> dict[str, Any]:
    """Runs `meanwhile` (which must not kill a replica: the series come from the replicas that served the
    requests) while Ray's agent exports the metrics, on its report interval."""
    import httpx

    marker = f"PROMPT-MARKER-{secrets.token_hex(6)}"
    bad_key = f"BAD-KEY-{secrets.token_hex(6)}"
    request_id, refused_id, bad_id = (f"faults-req-{secrets.token_hex(4)}" for _ in range(3))
    body = {"model": MODEL, "messages": [{"role": "user", "content": marker}], "max_tokens": 3}
    served = driver.http.post(
        "/v1/chat/completions", json=body, headers={"x-request-id": request_id}
    )
    refused = httpx.post(
        f"{driver.base_url}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {bad_key}", "x-request-id": refused_id},
    )
    bad = driver.http.post(
        "/v1/chat/completions", json={**body, "temperature": -1}, headers={"x-request-id": bad_id}
    )  # a 400 that logs a warning
    summary = driver.http.get("/metrics")
    with ThreadPoolExecutor(1) as pool:
        exported = pool.submit(_ray_series, metrics_port)
        meanwhile()
        ray_series = exported.result()
    # The Router writes a request's access line once it has answered, after every other line of that
    # request: once the three requests' lines are there, so is all they logged.
    for _ in _deadline_loop(30, step_s=0.1):
        if all(_access_lines(logs_dir, id_) for id_ in (request_id, refused_id, bad_id)):
            break
    leaks = []
    for path in logs_dir.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            leaks += [
                f"{path.name}: {secret}" for secret in (marker, bad_key, api_key) if secret in text
            ]
    access_lines = _access_lines(logs_dir, request_id)
    return {
        "statuses": [served.status_code, refused.status_code, bad.status_code],
        "leaks": leaks,
        "access_lines": access_lines,
        "summary_status": summary.status_code,
        "summary_has_ttft": "shepherd_time_to_first_token_seconds" in summary.text,
        "ray_series": ray_series,
    }


def _access_lines(logs_dir: Path, request_id: str) -> list[str]:
    """The access-log lines of one request in the replicas' log files (stderr copies the same lines into
    worker-*.err)."""
    return [
        line
        for path in logs_dir.rglob("*")
        if path.is_file() and path.parent.name == "serve"
        for line in path.read_text(errors="replace").splitlines()
        if request_id in line and '"event":"request"' in line
    ]


def _ray_series(metrics_port: int) -> list[str]:
    """The shepherd_* series on Ray's metrics endpoint, once TTFT is among them."""
    import httpx

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
    return ray_series


def main() -> None:
    import ray
    import yaml
    from ray import serve
    from ray.serve import Application

    import deployments.app as app_module

    api_key, other_key = os.environ["SHEPHERD_API_KEYS"].split(",")
    work = Path(tempfile.mkdtemp(prefix="shepherd-faults-"))
    port = _free_port()
    results: dict[str, Any] = {}
    with local_ray(num_cpus=4, _system_config={"metrics_report_interval_ms": 1000}):
        try:
            node = ray._private.worker.global_worker.node
            logs_dir, metrics_port = Path(node.get_logs_dir_path()), node.metrics_export_port
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            args = yaml.safe_load((REPO / TINY_CONFIG).read_text())["applications"][0]["args"]
            # A dead executor fails three checks in a row before Serve replaces its replica.
            args["engine"]["health_check_period_s"] = HEALTH_CHECK_PERIOD_S
            args["sessions"] = {
                "store": {"sqlite_path": str(work / "sessions.sqlite3")},
                "lease_ttl_s": LEASE_TTL_S,
            }
            args["router"]["graceful_shutdown_timeout_s"] = GRACE_S
            # Limits small enough to reach.
            args["engine"].update(max_ongoing_requests=1, max_queued_requests=1)
            args["router"]["max_concurrent_requests_per_key"] = 2
            build_engine = app_module.engine_deployment
            app_module.engine_deployment = lambda *a: build_engine(*a).options(
                func_or_class=FaultyEngine
            )
            app = app_module.build_app(args)
            # Serve notices a killed Router at its next health check (every 10 s by default): check it as
            # often as the Engine, so that each Router kill costs a restart rather than a wait.
            app = Application(
                app._bound_deployment.options(health_check_period_s=HEALTH_CHECK_PERIOD_S)
            )
            serve.run(app, name=APP_NAME, route_prefix="/")
            driver = Driver(f"http://127.0.0.1:{port}", api_key)

            def run(name: str, scenario: Callable[[], dict[str, Any]]) -> None:
                started = time.monotonic()
                try:
                    results[name] = scenario()
                except Exception as error:  # one broken scenario must not hide the others' results
                    results[name] = {"error": f"{type(error).__name__}: {error}"}
                results[name]["duration_s"] = round(time.monotonic() - started, 2)

            scenarios: dict[str, Callable[[], dict[str, Any]]] = {
                # Backpressure runs while Ray's agent exports the metrics of the requests before it.
                "logs_and_metrics": lambda: scenario_logs_and_metrics(
                    driver,
                    api_key,
                    logs_dir,
                    metrics_port,
                    meanwhile=lambda: run(
                        "backpressure", lambda: scenario_backpressure(driver, other_key)
                    ),
                ),
                "engine_killed_mid_stream": lambda: scenario_engine_killed_mid_stream(driver),
                "router_killed": lambda: scenario_router_killed(driver),
                "dead_executor_is_replaced": lambda: scenario_dead_executor_is_replaced(driver),
                # Last: it stops the app.
                "stopped_mid_stream": lambda: scenario_stopped_mid_stream(
                    driver, work / "sessions.sqlite3"
                ),
            }
            for name, scenario in scenarios.items():
                run(name, scenario)
        finally:
            print(RESULT_PREFIX + json.dumps(results), flush=True)


# ---- the tests ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def faults(model_dir: Path) -> dict[str, Any]:
    api_key, other_key = (f"faults-key-{secrets.token_hex(8)}" for _ in range(2))
    run = run_module(
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
    print("scenario durations (s):", {name: r.get("duration_s") for name, r in results.items()})
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


def test_killing_the_router_between_turns_loses_no_turn_and_no_stored_response(
    faults: dict[str, Any],
) -> None:
    result = faults["router_killed"]["between_turns"]
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
    # A stored response outlives the Router replica that made it, and its chain still continues exactly.
    assert result["chain_output_after"] == result["chain_output_before"]
    assert result["continued_cached_tokens"] > 0


def test_a_router_killed_mid_turn_frees_its_session_within_the_lease_ttl(
    faults: dict[str, Any],
) -> None:
    """It used to stay `session_busy` (409) until `sessions.turn_timeout_s` (600 s) ran out."""
    result = faults["router_killed"]["mid_stream"]
    assert result["killed"] and result["statuses"][-1][1] == 200, result
    busy = [seconds for seconds, status in result["statuses"] if status == 409]
    # A 409 only while the dead router's last renewal lasts (one TTL), plus a poll's worth of slack.
    assert all(seconds < LEASE_TTL_S + 1.0 for seconds in busy), result
    assert result["final_user_messages"] == ["first turn", "after the crash"]


def test_a_turn_streaming_when_the_app_stops_is_not_committed_and_frees_its_session(
    faults: dict[str, Any],
) -> None:
    """It used to be committed whole though the client was cut after 35 chunks; and `serve run` took more
    than 10 s to stop with streams in flight."""
    result = faults["stopped_mid_stream"]
    assert result["num_lines"] >= 20 and not result["has_done"], result
    assert result["stop_s"] < GRACE_S + 10, result
    assert result["history_unchanged"] and result["lease_free"], result


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
    """The Router's and the Engine's metrics reach Ray's endpoint, and TTFT reaches the ingress summary."""
    result = faults["logs_and_metrics"]
    assert result["summary_status"] == 200 and result["summary_has_ttft"]
    names = " ".join(result["ray_series"])
    for metric in ("time_to_first_token_seconds", "requests_total", "engine_active_requests"):
        assert metric in names, result["ray_series"]


if __name__ == "__main__":
    main()
