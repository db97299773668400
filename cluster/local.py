"""Local Ray clusters and Serve apps for tests and benchmarks, started as a user does and always stopped.

- `serve_app(config, port=...)`: `serve run` on a copy of a repo serve config (port, `args` overrides, env),
  ready once `GET /v1/models` answers; SIGINT, then every process of its session is killed.
- `local_ray(...)`: a fresh in-process Ray (`ray.init(address="local")`) with Serve, shut down after.
- `joined_ray(address)`: this process as a driver of a running cluster (Serve handles to its apps), left after.
- `run_module(module, prefix)`: `python -m module` in a process session of its own (its own Ray), whose
  result is the JSON of its last `PREFIX{...}` line.
- `redis_server()`: a `redis-server` on a free loopback port (sessions shared by several hosts).
- `multi_node(...)`: a Ray cluster of several nodes on this machine, each started as on a host of its own
  (`ray start --head`, then `ray start --address` per node, with its own resources), apps deployed with
  `serve deploy`; a node is killed by pid, raylet, agents and workers at once.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deployments.ingress import check_serve_config

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 300
STOP_TIMEOUT_S = 20


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) != 0


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768 and up) and above Ray's worker ports (up to 19999).

    A server binds it only seconds later, once Serve starts it; a port the kernel handed out for port 0 could
    meanwhile become some client connection's source port, and the bind would fail.
    """
    for port in random.sample(range(20000, 30000), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-29999")


# Ports HAProxy mode binds besides http_options.port, fixed unless set (stats 8404, metrics 9101, Serve's
# fallback proxy 8500).
HAPROXY_SIDE_PORTS = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
)


def with_own_side_ports(spec: dict[str, Any]) -> dict[str, Any]:
    """`spec` (a serve config) with free ports for whatever of HAPROXY_SIDE_PORTS its controller environment
    leaves unset, so that the app runs beside another one (the e2e session's app, say) on the same host."""
    env_vars = spec.get("controller_options", {}).get("runtime_env", {}).get("env_vars")
    if env_vars is not None:
        for name in HAPROXY_SIDE_PORTS:
            env_vars.setdefault(name, str(free_port()))
    return spec


def session_pids(session_id: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process in a session: `serve run`, Ray's daemons and the replicas."""
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,sid=,args="], capture_output=True, text=True
    ).stdout
    found = []
    for line in out.splitlines():
        parts = line.split(None, 2)
        pid, sid = int(parts[0]), int(parts[1])
        if sid == session_id:
            found.append((pid, parts[2] if len(parts) == 3 else ""))
    return found


def kill_session(session_id: int) -> None:
    """`serve run` leaves Ray daemons behind on SIGINT; they share its session id, so end them all by pid."""
    for pid, _ in session_pids(session_id):
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def gcs_address(session_id: int) -> str:
    """The GCS of the cluster a `serve run` session started (other Ray clusters may run on this machine).

    Its gcs_server shares the session id; the port it bound is in its Ray session directory.
    """
    for _, args in session_pids(session_id):
        argv = args.split()
        if not argv or not argv[0].endswith("gcs_server"):
            continue
        log_dir = next(arg.split("=", 1)[1] for arg in argv if arg.startswith("--log_dir="))
        port_file = next(Path(log_dir).parent.glob("gcs_server_port_*"))
        return f"127.0.0.1:{port_file.read_text().strip()}"
    raise RuntimeError(f"no GCS process in session {session_id}")


def merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied, nested dicts merged key by key."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class ServeApp:
    """A running `serve run`; `pid_of("Router")` finds a replica's process (profiling, fault tests)."""

    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    @property
    def ray_address(self) -> str:
        return gcs_address(self.process.pid)

    def pid_of(self, deployment: str) -> int | None:
        for pid, args in session_pids(self.process.pid):
            if args.startswith("ray::ServeReplica") and f":{deployment}" in args:
                return pid
        return None

    def pids(self) -> dict[str, int]:
        """Every process of the app by role (proxy, controller, replicas, raylet, gcs, ...)."""
        roles: dict[str, int] = {}
        for pid, args in session_pids(self.process.pid):
            name = (args.split()[0] if args else str(pid)).rsplit("/", 1)[-1]
            roles[f"{name}#{pid}"] = pid
        return roles


@contextlib.contextmanager
def serve_app(
    config: str | Path,
    *,
    port: int,
    args: Mapping[str, Any] | None = None,
    repo: str | Path = REPO,
    env: Mapping[str, str] | None = None,
    num_cpus: int | None = None,
    ready_headers: Mapping[str, str] | None = None,
    workdir: Path | None = None,
    controller_env: Mapping[str, str] | None = None,
) -> Iterator[ServeApp]:
    """`serve run` on a copy of `config` (relative to `repo`) listening on 127.0.0.1:`port`.

    `repo` may be another checkout (a before/after comparison): its `deployments` package then wins.
    `controller_env` overrides variables of the config's `controller_options.runtime_env.env_vars`.
    Raises RuntimeError when the port is busy, the installed Ray cannot run the config's ingress, or the
    app does not come up.
    """
    if not port_is_free(port):
        raise RuntimeError(f"port {port} is busy: stop the other server first")
    repo = Path(repo)
    spec = yaml.safe_load((repo / config).read_text())
    spec["http_options"] = {**spec.get("http_options", {}), "host": "127.0.0.1", "port": port}
    if controller_env:
        options = spec.setdefault("controller_options", {})
        runtime_env = options.setdefault("runtime_env", {})
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **controller_env}
    check_serve_config(spec)
    with_own_side_ports(spec)
    if args:
        app = spec["applications"][0]
        app["args"] = merge(app.get("args", {}), args)
    workdir = workdir or Path(tempfile.mkdtemp(prefix="shepherd-app-"))
    config_path = workdir / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(spec))
    log_path = workdir / "serve-run.log"
    process_env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p
        ),
        **(env or {}),
    }
    if num_cpus is not None:
        # `serve run` starts a local Ray: this sets the logical CPUs it schedules replicas on.
        process_env["RAY_OVERRIDE_RESOURCES"] = json.dumps({"CPU": num_cpus})
    # `--address local`: always a fresh Ray of our own, never a cluster another run left behind.
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
            # A run started in the background inherits an ignored SIGINT, and so would `serve run`, which
            # then never shuts down on the SIGINT below.
            preexec_fn=_default_sigint,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(process, base_url, log_path, dict(ready_headers or {}))
        yield ServeApp(process, base_url, log_path)
    finally:
        process.send_signal(signal.SIGINT)
        stopping_since = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=STOP_TIMEOUT_S)
        kill_session(process.pid)
        # Killed processes release the port a moment later; the next app of the same run needs it.
        while not port_is_free(port) and time.monotonic() - stopping_since < 60:
            time.sleep(0.5)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_ready(
    process: subprocess.Popen[bytes], base_url: str, log_path: Path, headers: dict[str, str]
) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"serve run exited with {process.returncode}:\n{log_path.read_text()[-4000:]}"
            )
        try:
            request = urllib.request.Request(f"{base_url}/v1/models", headers=headers)
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"serve run did not become ready:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.5)


@contextlib.contextmanager
def local_ray(*, num_cpus: int = 4, **init_kwargs: Any) -> Iterator[Any]:
    """A fresh Ray in this process (never one another run left behind); Serve and Ray shut down after."""
    import ray
    from ray import serve

    _forget_serve_client()
    for attempt in range(_NODE_START_ATTEMPTS):
        try:
            context = ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                logging_level=logging.ERROR,
                log_to_driver=False,
                **init_kwargs,
            )
            break
        except Exception as error:
            # Ray gives its raylet a fixed 30 s to register with the GCS; on a machine busy enough to miss
            # that, start again (shutdown ends the processes this attempt started).
            ray.shutdown()
            if _RAY_START_TIMED_OUT not in str(error) or attempt + 1 == _NODE_START_ATTEMPTS:
                raise
    try:
        yield context
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def joined_ray(address: str) -> Iterator[Any]:
    """This process as a driver of the running cluster at `address`, leaving it (Serve keeps running) after.

    Serve keeps one controller client per process and takes it to be current while the driver's job id is the
    one it was made under; a driver of another cluster started the same way gets the same job id (and that
    cluster's controller the same actor id), so the client, and every handle made through it, would still
    point at the first cluster's controller and wait forever for its replicas. The client is dropped on the
    way in and out."""
    import ray

    _forget_serve_client()
    context = ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    try:
        yield context
    finally:
        _forget_serve_client()
        ray.shutdown()


def _forget_serve_client() -> None:
    """Drops this process's cached Serve controller client (see `joined_ray` for why). Serve has no public
    call that does it without shutting Serve down."""
    from ray.serve import context as serve_context

    serve_context._set_global_client(None)


@dataclass(frozen=True)
class ModuleRun:
    returncode: int | None
    result: dict[str, Any] | None  # the JSON of the last line starting with the prefix, if any
    output: str


def run_module(
    module: str, prefix: str, timeout_s: float, env: Mapping[str, str] | None = None
) -> ModuleRun:
    """`python -m MODULE` in a session of its own (its own Ray cluster), which prints its result as one
    `PREFIX{json}` line; whatever Ray daemons the run leaves behind are killed with the session."""
    process = subprocess.Popen(
        [sys.executable, "-m", module],
        cwd=REPO,
        env={
            **os.environ,
            "RAY_AUTH_MODE": "disabled",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
            ),
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
        kill_session(process.pid)
    lines = [line for line in output.splitlines() if line.startswith(prefix)]
    result = json.loads(lines[-1].removeprefix(prefix)) if lines else None
    return ModuleRun(returncode=process.returncode, result=result, output=output)


# ---- Redis -------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def redis_server(workdir: Path | None = None) -> Iterator[str]:
    """A `redis-server` on a free loopback port, no persistence; yields its `redis://` URL.

    Raises:
        RuntimeError: no `redis-server` on PATH (apt-get install redis-server), or it did not answer PING.
    """
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
    port = free_port()
    workdir = workdir or Path(tempfile.mkdtemp(prefix="shepherd-redis-"))
    log_path = workdir / "redis.log"
    argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(
        [*argv, "--dir", str(workdir), "--logfile", str(log_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not _redis_pongs(port):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text()[-2000:] if log_path.exists() else ""
                raise RuntimeError(f"redis-server did not start on port {port}:\n{tail}")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.kill()
        process.wait()


def _redis_pongs(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


# ---- a cluster of several Ray nodes on this machine ---------------------------------------------------
# The GCS declares a node dead after this many missed health checks of this period: about 1.5 s after its
# raylet is killed, instead of Ray's default of about 15 s (a test waits for it; a cluster would too). A killed
# raylet refuses the check at once, so the timeout only bounds how long a live node may take to answer: at
# 500 ms, a loaded 2-core machine had the GCS declare live nodes dead (and their raylets exit).
FAST_NODE_FAILURE_ENV = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "5000",
    "RAY_health_check_failure_threshold": "3",
}


# Ray's smallest object store (75 MiB) and a little: replicas pass no large objects, and each node's default
# (30% of the memory) would add up to more than the machine has.
_OBJECT_STORE_BYTES = 100 * 1024 * 1024

# Worker ports: Ray's default range (10002-19999), split between the nodes of one cluster.
_WORKER_PORTS_START, _WORKER_PORTS_PER_NODE = 10002, 1000
_NODE_START_ATTEMPTS = 3
# What `ray start` and `ray.init` raise when the GCS did not register the new raylet within Ray's fixed 30 s.
_RAY_START_TIMED_OUT = "timed out during startup"


class _NodeStartTimedOut(RuntimeError):
    """`ray start` gave up waiting for the GCS to register its raylet."""


@dataclass(frozen=True)
class RayNode:
    """One node: `ray start --block` leads a process session of its own, which its raylet, agents, workers
    and Serve replicas all join, so the session is the node (as a host would be)."""

    name: str
    process: subprocess.Popen[bytes]
    resources: dict[str, float]
    log_path: Path

    def pids(self) -> list[tuple[int, str]]:
        return session_pids(self.process.pid)

    def replica_pids(self, deployment: str) -> list[int]:
        """Serve replicas of `deployment` that run on this node."""
        return [
            pid
            for pid, args in self.pids()
            if args.startswith("ray::ServeReplica") and f":{deployment}" in args
        ]

    def has_pid(self, pid: int) -> bool:
        return any(found == pid for found, _ in self.pids())

    def kill(self) -> list[int]:
        """SIGKILLs every process of the node at once (raylet, agents, workers): the node is lost, as when
        its host dies; returns the pids killed."""
        pids = [pid for pid, _ in self.pids()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        return pids


class RayCluster:
    """A head node (GCS, dashboard, Serve's controller and HTTP proxy; no CPUs for replicas unless given) and
    worker nodes added with `add_node`; apps go on it with `deploy`, as `serve deploy` does on a real cluster."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self._env = env
        # Ray's files (sessions, sockets, logs) of this cluster only. `ray start` records the cluster it
        # started in `<temp dir>/ray_current_cluster`, where a plain `ray.init()` of any process on this
        # machine (another test's) would find it and join it; under /tmp/ray it would. Short: Unix socket
        # paths in it must stay under 108 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="shepherd-ray-"))
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.nodes: dict[str, RayNode] = {}
        self._port_slots: dict[str, int] = {}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start_head(
        self, *, num_cpus: int = 0, resources: Mapping[str, float] | None = None
    ) -> RayNode:
        return self._start(
            "head",
            [
                "--head",
                f"--port={self.gcs_port}",
                f"--ray-client-server-port={free_port()}",
                f"--num-cpus={num_cpus}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
            ],
            dict(resources or {}),
        )

    def add_node(
        self, name: str, *, num_cpus: int, resources: Mapping[str, float] | None = None
    ) -> RayNode:
        """Starts a worker node; returns once it has registered with the GCS."""
        return self.add_nodes({name: (num_cpus, resources or {})})[name]

    def add_nodes(self, specs: Mapping[str, tuple[int, Mapping[str, float]]]) -> dict[str, RayNode]:
        """Starts worker nodes, `{name: (num_cpus, resources)}`, all at once; returns once every one has
        registered with the GCS. Most of a node's start is its own processes importing Ray, which overlap; a
        node the GCS did not register within `ray start`'s fixed 30 s is started again."""
        for name, (num_cpus, resources) in specs.items():
            self._launch(name, self._worker_args(num_cpus), dict(resources))
        for name, (num_cpus, resources) in specs.items():
            self._start(name, self._worker_args(num_cpus), dict(resources), launched=True)
        return {name: self.nodes[name] for name in specs}

    def _worker_args(self, num_cpus: int) -> list[str]:
        return [f"--address={self.address}", f"--num-cpus={num_cpus}"]

    def remove_node(self, name: str) -> list[int]:
        """Kills a node (`RayNode.kill`) and forgets it; returns the pids killed."""
        return self.nodes.pop(name).kill()

    def node_of(self, pid: int) -> RayNode | None:
        return next((node for node in self.nodes.values() if node.has_pid(pid)), None)

    def deploy(self, config: Mapping[str, Any]) -> None:
        """What `serve deploy CONFIG` does (`ray.serve.scripts.deploy`): the config validated against Serve's
        schema and PUT to the head's dashboard; returns once Serve accepted it. In this process rather than
        the CLI's, which would import Ray again (seconds of CPU on a small machine)."""
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
        from ray.serve.schema import ServeDeploySchema

        schema = ServeDeploySchema.model_validate(config)
        ServeSubmissionClient(self.dashboard_url).deploy_applications(
            schema.model_dump(exclude_unset=True)
        )

    def serve_details(self) -> dict[str, Any]:
        """Serve's view of every application (`GET /api/serve/applications/`, what `serve status` shows):
        per deployment its status and replicas, each with state, pid and node."""
        url = f"{self.dashboard_url}/api/serve/applications/"
        with urllib.request.urlopen(url, timeout=10) as response:
            details: dict[str, Any] = json.load(response)
        return details

    def replicas(self, app: str, deployment: str, state: str = "RUNNING") -> list[dict[str, Any]]:
        return self.replicas_of(app, [deployment], state)[deployment]

    def replicas_of(
        self, app: str, deployments: Sequence[str], state: str = "RUNNING"
    ) -> dict[str, list[dict[str, Any]]]:
        """The replicas in `state` of each of `deployments`, from one look at Serve's status (each look costs
        the head's dashboard and Serve's controller CPU that replicas starting meanwhile need)."""
        try:
            details = self.serve_details()["applications"][app]["deployments"]
        except (KeyError, OSError):
            details = {}
        return {
            name: [r for r in details.get(name, {}).get("replicas", []) if r["state"] == state]
            for name in deployments
        }

    def wait_until(
        self, condition: Any, *, timeout_s: float, what: str, step_s: float = 0.25
    ) -> float:
        """Polls `condition()` until it is truthy; returns the seconds it took.

        Raises:
            TimeoutError: naming `what`, with the Serve status at the time.
        """
        started = time.monotonic()
        while not condition():
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"{what}: not after {timeout_s:.0f} s; {self._serve_summary()}")
            time.sleep(step_s)
        return time.monotonic() - started

    def _serve_summary(self) -> str:
        try:
            applications = self.serve_details()["applications"]
        except (OSError, KeyError) as error:
            return f"no Serve status ({error})"
        return json.dumps(
            {
                name: {
                    "status": app["status"],
                    "message": app.get("message", "")[-500:],
                    "deployments": {
                        deployment: [replica["state"] for replica in details.get("replicas", [])]
                        for deployment, details in app["deployments"].items()
                    },
                }
                for name, app in applications.items()
            }
        )

    def _start(
        self, name: str, args: list[str], resources: dict[str, float], *, launched: bool = False
    ) -> RayNode:
        """Starts a node (or waits for one `_launch` began); a worker node whose raylet the GCS did not register
        within `ray start`'s fixed 30 s (an overloaded machine: the GCS shares its cores with every other node
        and test) is started again."""
        for attempt in range(_NODE_START_ATTEMPTS):
            try:
                if not launched or attempt > 0:
                    self._launch(name, args, resources)
                return self._wait_started(self.nodes[name])
            except _NodeStartTimedOut as error:
                if name == "head" or attempt + 1 == _NODE_START_ATTEMPTS:
                    raise RuntimeError(str(error)) from None
                node = self.nodes.pop(name)
                kill_session(node.process.pid)
        raise AssertionError("unreachable")

    def _launch(self, name: str, args: list[str], resources: dict[str, float]) -> RayNode:
        log_path = self.workdir / f"ray-{name}.log"
        # Worker ports: a range per node name, the same range when a node is started again.
        slot = self._port_slots.setdefault(name, len(self._port_slots))
        command = [
            sys.executable,
            "-c",
            "from ray.scripts.scripts import main; main()",
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--disable-usage-stats",
            # A temp dir per node: a node names its plasma store's and raylet's sockets (and its logs) by the
            # first free index in its session directory, and nodes starting together in one directory
            # picked the same socket ("bind: Address already in use", then a registration timeout).
            f"--temp-dir={self.temp_dir if name == 'head' else self.temp_dir / name}",
            # Several nodes on one address: each needs ports of its own. Ray's defaults are fixed (the
            # agent's 52365) or probed by each raylet as it starts, which races when nodes start together
            # ("bind: Address already in use"); workers get a range per node.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--min-worker-port={_WORKER_PORTS_START + slot * _WORKER_PORTS_PER_NODE}",
            f"--max-worker-port={_WORKER_PORTS_START + (slot + 1) * _WORKER_PORTS_PER_NODE - 1}",
            f"--resources={json.dumps(resources)}",
            # Nothing reads the workers' logs live (no driver prints them): one process less per node.
            "--include-log-monitor=false",
            f"--object-store-memory={_OBJECT_STORE_BYTES}",
            *args,
        ]
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                command,
                cwd=REPO,
                env=self._env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_default_sigint,
            )
        node = RayNode(name, process, resources, log_path)
        self.nodes[name] = node
        return node

    def _wait_started(self, node: RayNode) -> RayNode:
        self.wait_until(
            lambda: _has_started(node) or _exited(node),
            timeout_s=STARTUP_TIMEOUT_S,
            what=f"ray start ({node.name})",
        )
        if node.name == "head":
            self.wait_until(
                lambda: _dashboard_answers(self.dashboard_url) or _exited(node),
                timeout_s=STARTUP_TIMEOUT_S,
                what="the head node's dashboard",
            )
        if _exited(node):
            log = node.log_path.read_text()
            error = _NodeStartTimedOut if _RAY_START_TIMED_OUT in log else RuntimeError
            raise error(f"ray start ({node.name}) exited:\n{log[-4000:]}")
        return node

    def stop(self) -> None:
        for node in reversed(list(self.nodes.values())):
            node.kill()
        self.nodes.clear()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _exited(node: RayNode) -> bool:
    return node.process.poll() is not None


def _has_started(node: RayNode) -> bool:
    """`ray start` prints this once the node's raylet is registered with the GCS (`ray._private.node.Node`
    waits for that)."""
    return "Ray runtime started." in node.log_path.read_text(errors="replace")


def _dashboard_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def multi_node(
    *,
    workdir: Path | None = None,
    env: Mapping[str, str] | None = None,
    head_num_cpus: int = 0,
    head_resources: Mapping[str, float] | None = None,
) -> Iterator[RayCluster]:
    """A Ray cluster of several nodes on this machine, started as on several hosts: the head here, then
    `cluster.add_node(name, num_cpus=..., resources={...})` per node. Every node is a process session of
    its own on 127.0.0.1 (Ray's own multi-node tests do the same with `ray.cluster_utils.Cluster`); the GCS
    declares a killed node dead within about 1.5 s (`FAST_NODE_FAILURE_ENV`). Every node is killed after.

    `env` reaches every Ray process (replicas included): this repository is on their PYTHONPATH.
    """
    workdir = workdir or Path(tempfile.mkdtemp(prefix="shepherd-cluster-"))
    process_env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
        ),
        **FAST_NODE_FAILURE_ENV,
        **(env or {}),
    }
    cluster = RayCluster(workdir, process_env)
    try:
        cluster.start_head(num_cpus=head_num_cpus, resources=head_resources)
        yield cluster
    finally:
        cluster.stop()
