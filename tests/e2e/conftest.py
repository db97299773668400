"""One real Ray Serve app per test session, started exactly as a user does: `serve run serve_config.yaml`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
BASE_URL = "http://127.0.0.1:8000"
MODEL = "shepherd-tiny"
STARTUP_TIMEOUT_S = 180


def _port_is_free(port: int) -> bool:
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


@pytest.fixture(scope="session")
def serve_app(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not _port_is_free(8000):
        pytest.fail("port 8000 is busy: stop the other server (serve_config.yaml listens there)")
    log_path = tmp_path_factory.mktemp("serve") / "serve-run.log"
    env = {**os.environ, "SHEPHERD_CACHE_DIR": str(model_dir.parent), "PYTHONUNBUFFERED": "1"}
    serve_bin = Path(sys.executable).parent / "serve"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(serve_bin), "run", "serve_config.yaml"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"serve run exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{BASE_URL}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"serve run did not become ready:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield BASE_URL
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        _kill_session(process.pid)


@pytest.fixture(scope="session")
def ray_driver(serve_app: str) -> Iterator[None]:
    """This pytest process joins the app's Ray cluster as a driver (another Ray job)."""
    import ray

    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def engine_handle(ray_driver: None) -> Any:
    from ray import serve

    return serve.get_deployment_handle("Engine", app_name="shepherd")


@pytest.fixture(scope="session")
def client(serve_app: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{serve_app}/v1", api_key="unused", max_retries=0, timeout=60)
