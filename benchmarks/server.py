"""Starts an app exactly as a user does (`serve run <config>`) on a port of our choosing, and always stops it.

The config is a temporary copy of a repo serve config with `http_options.port` and any `args` overrides
applied; `repo` may point at a patched copy of the repository (its `deployments` package then wins).
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 300


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def session_pids(session_id: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process in a session: `serve run`, Ray's daemons and the replicas."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        pid, sid, args = (
            line.split(None, 2) if len(line.split(None, 2)) == 3 else (*line.split(), "")
        )
        if int(sid) == session_id:
            found.append((int(pid), args))
    return found


def kill_session(session_id: int) -> None:
    """`serve run` leaves Ray daemons behind on SIGINT; they share its session id, so end them all by pid."""
    for pid, _ in session_pids(session_id):
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


class ServeApp:
    """A running `serve run` process; `pid_of("Router")` finds a replica's process for profiling."""

    def __init__(self, process: subprocess.Popen[bytes], base_url: str, log_path: Path) -> None:
        self.process = process
        self.base_url = base_url
        self.log_path = log_path

    def pid_of(self, deployment: str) -> int | None:
        for pid, args in session_pids(self.process.pid):
            if args.startswith("ray::ServeReplica") and f":{deployment}" in args:
                return pid
        return None

    def pids(self) -> dict[str, int]:
        """Every process of the app by role (proxy, controller, replicas, raylet, gcs, ...)."""
        roles: dict[str, int] = {}
        for pid, args in session_pids(self.process.pid):
            name = args.split()[0] if args else str(pid)
            name = name.rsplit("/", 1)[-1]
            roles[f"{name}#{pid}"] = pid
        return roles


@contextlib.contextmanager
def serve_app(
    config: str | Path,
    *,
    port: int,
    args: dict[str, Any] | None = None,
    repo: str | Path = REPO,
    env: dict[str, str] | None = None,
    num_cpus: int | None = None,
) -> Iterator[ServeApp]:
    """Runs `serve run` on a temporary copy of `config` (relative to `repo`) listening on 127.0.0.1:`port`."""
    if not port_is_free(port):
        raise RuntimeError(f"port {port} is busy")
    repo = Path(repo)
    spec = yaml.safe_load((repo / config).read_text())
    spec["http_options"] = {**spec.get("http_options", {}), "host": "127.0.0.1", "port": port}
    app = spec["applications"][0]
    app["args"] = merge(app.get("args", {}), args or {})
    workdir = Path(tempfile.mkdtemp(prefix="shepherd-bench-"))
    config_path = workdir / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(spec))
    log_path = workdir / "serve-run.log"
    process_env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p
        ),
        "SHEPHERD_CACHE_DIR": os.environ.get("SHEPHERD_CACHE_DIR", "/tmp/shepcache"),
        # With HAProxy, Serve drains the Router replica for 30 s before it stops (for load balancers to
        # notice); a benchmark's server has no load balancer in front, so it stops in seconds instead.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
        **(env or {}),
    }
    if num_cpus is not None:
        # `serve run` starts a local Ray: this sets the logical CPUs it schedules replicas on.
        process_env["RAY_OVERRIDE_RESOURCES"] = f'{{"CPU": {num_cpus}}}'
    # `--address local`: always a fresh Ray of our own, never a cluster another run on this machine left behind.
    serve_cli = "from ray.serve.scripts import cli; cli()"
    command = [sys.executable, "-c", serve_cli, "run", "--address", "local", str(config_path)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command,
            cwd=repo,
            env=process_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # A benchmark started in the background inherits an ignored SIGINT, and so would `serve run`,
            # which then never shuts down on the SIGINT below and is killed 20 s later.
            preexec_fn=_default_sigint,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(process, base_url, log_path)
        yield ServeApp(process, base_url, log_path)
    finally:
        process.send_signal(signal.SIGINT)
        stopping_since = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
        kill_session(process.pid)
        # Killed processes release the port a moment later; the next tree of the same run needs it.
        while not port_is_free(port) and time.monotonic() - stopping_since < 60:
            time.sleep(0.5)
        print(f"serve run stopped in {time.monotonic() - stopping_since:.1f} s", flush=True)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_ready(process: subprocess.Popen[bytes], base_url: str, log_path: Path) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"serve run exited with {process.returncode}:\n{log_path.read_text()[-4000:]}"
            )
        try:
            with urllib.request.urlopen(f"{base_url}/v1/models", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"serve run did not become ready:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.5)
