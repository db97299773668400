"""One real Ray Serve app per test session, started exactly as a user does: `serve run serve_config.yaml`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
BASE_URL = "http://127.0.0.1:8000"
MODEL = "shepherd-tiny"
API_KEY, OTHER_API_KEY = "test-key-a", "test-key-b"
AUTH = {"authorization": f"Bearer {API_KEY}"}
STARTUP_TIMEOUT_S = 300


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _kill_session(session_id: int) -> None:
    """`serve run` leaves Ray daemons behind on SIGINT; they share its session id, so end them all."""
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    for line in out.splitlines():
        pid, sid = (int(x) for x in line.split())
        if sid == session_id and pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _gcs_address(session_id: int) -> str:
    """The GCS of the cluster `serve run` started (other Ray clusters may run on this machine too).

    Its gcs_server shares the `serve run` session id; the port it bound is in its Ray session directory.
    """
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        try:
            cmdline = process.info["cmdline"] or []
            if (
                not cmdline
                or not cmdline[0].endswith("gcs_server")
                or os.getsid(process.pid) != session_id
            ):
                continue
        except (ProcessLookupError, psutil.Error):
            continue
        log_dir = next(arg.split("=", 1)[1] for arg in cmdline if arg.startswith("--log_dir="))
        port_file = next(Path(log_dir).parent.glob("gcs_server_port_*"))
        return f"127.0.0.1:{port_file.read_text().strip()}"
    raise RuntimeError("no GCS process found in the serve run session")


@dataclass(frozen=True)
class ServeApp:
    base_url: str
    ray_address: str


@dataclass(frozen=True)
class ModuleRun:
    returncode: int | None
    result: dict[str, Any] | None  # the JSON of the last line starting with the prefix, if any
    output: str


def run_module_for_result(
    module: str, prefix: str, timeout_s: float, env: dict[str, str] | None = None
) -> ModuleRun:
    """`python -m MODULE` in a session of its own (its own Ray cluster), which prints its result as one
    `PREFIX{json}` line; whatever Ray daemons the run leaves behind are killed with the session."""
    process = subprocess.Popen(
        [sys.executable, "-m", module],
        cwd=REPO,
        env={
            **os.environ,
            "RAY_AUTH_MODE": "disabled",
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    finally:
        process.kill()
        _kill_session(process.pid)
    lines = [line for line in output.splitlines() if line.startswith(prefix)]
    result = json.loads(lines[-1].removeprefix(prefix)) if lines else None
    return ModuleRun(returncode=process.returncode, result=result, output=output)


@contextlib.contextmanager
def serve_run(
    config: Path, base_url: str, log_path: Path, env: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    """`serve run CONFIG` from the repository root, ready once GET /v1/models answers; stopped after."""
    serve_bin = Path(sys.executable).parent / "serve"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(serve_bin), "run", str(config)],
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # pytest run in the background ignores SIGINT, and `serve run` would inherit that and never
            # stop on the SIGINT of the teardown below.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"serve run exited with {process.returncode}:\n{log_path.read_text()[-4000:]}"
                )
            try:
                if httpx.get(f"{base_url}/v1/models", headers=AUTH, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"serve run did not become ready:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        _kill_session(process.pid)


def app_env(model_dir: Path) -> dict[str, str]:
    return {
        "SHEPHERD_CACHE_DIR": str(model_dir.parent),
        "SHEPHERD_API_KEYS": f"{API_KEY},{OTHER_API_KEY}",
    }


@pytest.fixture(scope="session")
def serve_app(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeApp]:
    if not port_is_free(8000):
        pytest.fail("port 8000 is busy: stop the other server (serve_config.yaml listens there)")
    log_path = tmp_path_factory.mktemp("serve") / "serve-run.log"
    with serve_run(Path("serve_config.yaml"), BASE_URL, log_path, app_env(model_dir)) as process:
        yield ServeApp(base_url=BASE_URL, ray_address=_gcs_address(process.pid))


@pytest.fixture(scope="module")
def ray_driver(serve_app: ServeApp) -> Iterator[None]:
    """This pytest process joins the app's Ray cluster as a driver (another Ray job), one module at a time,
    so that other tests may start Ray clusters of their own in this process afterwards."""
    import ray

    ray.init(address=serve_app.ray_address, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def engine_handle(ray_driver: None) -> Any:
    from ray import serve

    return serve.get_deployment_handle("Engine", app_name="shepherd")


@pytest.fixture(scope="session")
def base_url(serve_app: ServeApp) -> str:
    return serve_app.base_url


@pytest.fixture(scope="session")
def client(base_url: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
