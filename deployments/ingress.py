"""The HTTP ingress `serve run` starts, checked on the head node before Serve's controller starts it.

serve_config.yaml picks the ingress in `controller_options.runtime_env.env_vars`, the one place a config file
sets the environment of Serve's controller (and, inherited from it, of the proxies and replicas) before any
proxy starts: `RAY_SERVE_ENABLE_HA_PROXY: "1"` (the default config) runs HAProxy, which forwards HTTP straight
to the Router replicas' own servers; `"0"` runs Serve's proxy actor. The same block names
`RAY_SERVE_CONTROLLER_CALLBACK_IMPORT_PATH: deployments.ingress:check_ingress`, so the controller calls
`check_ingress` before it starts any proxy: a machine that cannot provide the ingress (no HAProxy binary, a
port in use) fails the start with one message naming the setting to change, instead of a proxy traceback
half a minute later.

Ray 2.55 (the Ray the `tensorrt` extra holds) has neither: its serve config has no `controller_options` and
drops the block unread, so its Serve proxy runs whatever the block says. Configs for that Ray
(serve_config.trtllm.yaml, cluster/rayservice.yaml) leave the block out; `ingress_config_problem` names the
setting when a config asks a Ray without the block for HAProxy, and `check_ingress` refuses HAProxy there.
"""

from __future__ import annotations

import errno
import inspect
import socket
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Where serve_config.yaml sets the ingress variables; error messages point there.
ENV_VARS_PATH = "controller_options.runtime_env.env_vars"
HAPROXY_SETTING = f"{ENV_VARS_PATH}.RAY_SERVE_ENABLE_HA_PROXY"
# HAProxy binds its stats and metrics listeners on every interface (Ray's `haproxy_templates.py`:
# `bind *:stats_port`, `bind :metrics_port`); no setting narrows them.
ALL_INTERFACES = "0.0.0.0"


class IngressUnavailable(RuntimeError):
    """The configured ingress cannot start on this machine; the message names what to change."""


@dataclass(frozen=True, slots=True)
class Listener:
    """A TCP address the ingress binds on the head node, and the setting that moves it."""

    host: str
    port: int
    role: str
    setting: str


def planned_listeners(
    *,
    is_haproxy: bool,
    host: str,
    port: int,
    stats_port: int,
    metrics_port: int,
    fallback_port: int,
) -> list[Listener]:
    """The addresses the ingress binds on the head node (the Router replicas' ports are not among them:
    Serve tries the next port of its range when one is taken).

    Args:
        is_haproxy: HAProxy mode (`RAY_SERVE_ENABLE_HA_PROXY`) rather than Serve's proxy.
        host, port: `http_options.host` and `http_options.port`.
        stats_port, metrics_port: HAProxy's stats page and Prometheus exporter.
        fallback_port: the Serve proxy HAProxy falls back to while it has no Router replica yet.
    """
    if not is_haproxy:
        return [Listener(host, port, "Serve's HTTP proxy", "http_options.port")]
    return [
        Listener(host, port, "HAProxy's HTTP frontend", "http_options.port"),
        Listener(
            ALL_INTERFACES,
            stats_port,
            "HAProxy's stats page",
            f"RAY_SERVE_HAPROXY_STATS_PORT in {ENV_VARS_PATH}",
        ),
        Listener(
            ALL_INTERFACES,
            metrics_port,
            "HAProxy's metrics exporter",
            f"RAY_SERVE_HAPROXY_METRICS_PORT in {ENV_VARS_PATH}",
        ),
        Listener(
            host,
            fallback_port,
            "Serve's fallback proxy (behind HAProxy)",
            f"RAY_SERVE_FALLBACK_PROXY_HTTP_PORT in {ENV_VARS_PATH}",
        ),
    ]


def listener_problem(listener: Listener) -> str | None:
    """Why `listener` cannot be bound on this machine, or None when it can.

    The probe sets SO_REUSEADDR as the servers do, so only a listening socket (not a closed connection
    in TIME_WAIT) counts as taken.
    """
    family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((listener.host, listener.port))
        except OSError as error:
            where = f"{listener.role} cannot bind {listener.host}:{listener.port}"
            if error.errno == errno.EADDRINUSE:
                return f"{where}: the port is in use. Stop what listens there or change {listener.setting}."
            if error.errno == errno.EADDRNOTAVAIL:
                return f"{where}: {listener.host} is not an address of this machine. Change http_options.host."
            return f"{where}: {error.strerror}. Change {listener.setting}."
    return None


def serve_applies_controller_options() -> bool:
    """Whether this Ray's serve config has `controller_options` (and with it the HAProxy ingress Shepherd
    runs): Ray 2.60 does, Ray 2.55 ignores the block."""
    from ray.serve.schema import ServeDeploySchema

    return "controller_options" in ServeDeploySchema.model_fields


def asks_for_haproxy(spec: Mapping[str, Any]) -> bool:
    """Whether a serve config (the parsed YAML) sets `RAY_SERVE_ENABLE_HA_PROXY: "1"` for the controller."""
    env_vars = (spec.get("controller_options") or {}).get("runtime_env", {}).get("env_vars") or {}
    return str(env_vars.get("RAY_SERVE_ENABLE_HA_PROXY", "0")) == "1"


def haproxy_unsupported_problem(ray_version: str) -> str:
    return (
        f'{HAPROXY_SETTING} is "1" (HAProxy), but Ray {ray_version} has no `controller_options` in its '
        "serve config and no HAProxy ingress Shepherd runs on; it would drop the block and start Serve's "
        f'proxy. Set it to "0" or leave controller_options out (serve_config.trtllm.yaml does), or '
        "install a Ray that has them (2.60 does; the `tensorrt` extra holds Ray at 2.55)."
    )


def ingress_config_problem(
    spec: Mapping[str, Any], *, has_controller_options: bool, ray_version: str
) -> str | None:
    """Why this Ray cannot run the ingress the serve config `spec` asks for, or None."""
    if asks_for_haproxy(spec) and not has_controller_options:
        return haproxy_unsupported_problem(ray_version)
    return None


def check_serve_config(spec: Mapping[str, Any]) -> None:
    """Refuses a serve config whose ingress the installed Ray cannot run, before `serve run` starts.

    Raises:
        IngressUnavailable: naming the setting to change.
    """
    import ray

    problem = ingress_config_problem(
        spec, has_controller_options=serve_applies_controller_options(), ray_version=ray.__version__
    )
    if problem:
        raise IngressUnavailable(problem)


def haproxy_binary_problem() -> str | None:
    """Why HAProxy cannot start here, or None; resolved exactly as Serve will resolve it."""
    from ray.serve._private.haproxy import get_haproxy_binary

    try:
        get_haproxy_binary()
    except FileNotFoundError as error:
        return (
            f"{error} Or use Serve's own proxy instead: set RAY_SERVE_ENABLE_HA_PROXY: "
            f'"0" in {ENV_VARS_PATH}.'
        )
    return None


def check_ingress() -> None:
    """Serve's controller hook (`RAY_SERVE_CONTROLLER_CALLBACK_IMPORT_PATH`), called before any proxy starts.

    Raises:
        IngressUnavailable: listing every problem, each with the setting to change.
    """
    import ray
    from ray.serve._private import constants

    with warnings.catch_warnings():
        # Ray's own property reads its deprecated `RuntimeContext.actor_id`, which warns on every call.
        warnings.simplefilter("ignore", DeprecationWarning)
        if ray.get_runtime_context().was_current_actor_reconstructed:
            return  # a restarted controller finds its own proxies on these ports
    problems: list[str] = []
    is_haproxy = bool(constants.RAY_SERVE_ENABLE_HA_PROXY)
    if is_haproxy and not serve_applies_controller_options():
        # The variable came from the environment `ray start` or `serve run` was given; this Ray has none of
        # the HAProxy settings the port checks below read.
        raise IngressUnavailable(haproxy_unsupported_problem(ray.__version__))
    if is_haproxy:
        problems += [p for p in [haproxy_binary_problem()] if p]
    http_options = _controller_http_options()
    if http_options is not None and http_options.host is not None:
        listeners = planned_listeners(
            is_haproxy=is_haproxy,
            host=http_options.host,
            port=http_options.port,
            stats_port=constants.RAY_SERVE_HAPROXY_STATS_PORT,
            metrics_port=constants.RAY_SERVE_HAPROXY_METRICS_PORT,
            fallback_port=constants.RAY_SERVE_FALLBACK_PROXY_HTTP_PORT,
        )
        problems += [p for p in map(listener_problem, listeners) if p]
    if problems:
        ingress = "HAProxy" if is_haproxy else "Serve's proxy"
        raise IngressUnavailable(
            f"the serve config asks for an ingress ({ingress}) this machine cannot provide:\n- "
            + "\n- ".join(problems)
        )


def _controller_http_options() -> Any:
    """The `HTTPOptions` Serve's controller was started with, or None.

    Serve calls the hook without arguments, from `ServeController.__init__`, whose `http_options` parameter
    holds the host and port the proxy will bind; if a later Ray stops passing it that way, the port checks
    are skipped and the proxy's own bind error still stops the start.
    """
    from ray.serve.config import HTTPOptions

    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("http_options")
        if isinstance(candidate, HTTPOptions):
            return candidate
        frame = frame.f_back
    return None
