"""The ingress check run before Serve starts its proxies: planned listeners, busy ports, the HAProxy binary."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments import ingress
from deployments.ingress import (
    Listener,
    asks_for_haproxy,
    check_serve_config,
    haproxy_binary_problem,
    ingress_config_problem,
    listener_problem,
    planned_listeners,
    serve_applies_controller_options,
)

REPO = Path(__file__).resolve().parents[2]
# Serve's defaults: http_options on loopback, HAProxy's stats and metrics, the fallback proxy.
DEFAULT_PORTS: dict[str, Any] = dict(
    host="127.0.0.1", port=8000, stats_port=8404, metrics_port=9101, fallback_port=8500
)


# The user's default and the e2e suite's app (which must run on the ingress users get).
@pytest.mark.parametrize("path", ["serve_config.yaml", "tests/e2e/serve_config.tiny.yaml"])
def test_the_config_runs_haproxy_that_stops_promptly_and_is_checked_first(path: str) -> None:
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / path).read_text()))
    assert config.http_options.host == "127.0.0.1"
    assert config.controller_options is not None and config.controller_options.runtime_env
    env = config.controller_options.runtime_env["env_vars"]
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    # Serve's 30 s default would hold Ctrl-C for half a minute.
    assert float(env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) <= 1
    assert import_attr(env["RAY_SERVE_CONTROLLER_CALLBACK_IMPORT_PATH"]) is ingress.check_ingress


def test_haproxy_mode_binds_its_stats_and_metrics_on_every_interface() -> None:
    listeners = planned_listeners(is_haproxy=True, **DEFAULT_PORTS)
    assert [(x.host, x.port) for x in listeners] == [
        ("127.0.0.1", 8000),
        ("0.0.0.0", 8404),
        ("0.0.0.0", 9101),
        ("127.0.0.1", 8500),
    ]
    assert listeners[1].setting.startswith("RAY_SERVE_HAPROXY_STATS_PORT in controller_options")
    serve_proxy = planned_listeners(is_haproxy=False, **DEFAULT_PORTS)
    assert [(x.host, x.port, x.setting) for x in serve_proxy] == [
        ("127.0.0.1", 8000, "http_options.port")
    ]


@pytest.fixture
def listening_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_port_in_use_is_named_with_the_setting_that_moves_it(listening_port: int) -> None:
    listener = Listener("127.0.0.1", listening_port, "HAProxy's HTTP frontend", "http_options.port")
    assert listener_problem(listener) == (
        f"HAProxy's HTTP frontend cannot bind 127.0.0.1:{listening_port}: the port is in use. "
        "Stop what listens there or change http_options.port."
    )
    # A listener on one interface also takes the port from a bind on all of them.
    everywhere = Listener("0.0.0.0", listening_port, "HAProxy's stats page", "X")
    assert "the port is in use" in (listener_problem(everywhere) or "")


def test_a_free_port_passes() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert listener_problem(Listener("127.0.0.1", port, "r", "s")) is None


def test_a_host_that_is_not_this_machine_is_named() -> None:
    problem = listener_problem(Listener("203.0.113.7", 8000, "Serve's HTTP proxy", "x"))
    assert problem is not None and "203.0.113.7 is not an address of this machine" in problem
    assert problem.endswith("Change http_options.host.")


def test_the_haproxy_that_ray_serve_brings_is_found() -> None:
    assert haproxy_binary_problem() is None


def test_a_missing_haproxy_binary_points_to_serves_proxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray.serve._private.haproxy as haproxy

    (tmp_path / "haproxy").write_text("not a program")  # not executable
    monkeypatch.setattr(haproxy, "RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "haproxy"))
    problem = haproxy_binary_problem()
    assert problem is not None and "does not point to an executable file" in problem
    assert problem.endswith(
        'set RAY_SERVE_ENABLE_HA_PROXY: "0" in controller_options.runtime_env.env_vars.'
    )


def _spec(path: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / path).read_text())


def _rayservice_spec() -> dict[str, Any]:
    documents = yaml.safe_load_all((REPO / "cluster" / "rayservice.yaml").read_text())
    (service,) = [doc for doc in documents if doc and doc.get("kind") == "RayService"]
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def test_haproxy_asked_of_a_ray_without_controller_options_is_refused_naming_the_setting() -> None:
    """Ray 2.55 (the `tensorrt` extra's) drops `controller_options` unread and would start Serve's proxy."""
    problem = ingress_config_problem(
        _spec("serve_config.yaml"), has_controller_options=False, ray_version="2.55.1"
    )
    assert problem is not None
    assert problem.startswith(
        'controller_options.runtime_env.env_vars.RAY_SERVE_ENABLE_HA_PROXY is "1" (HAProxy), '
        "but Ray 2.55.1 has no `controller_options`"
    )
    assert "serve_config.trtllm.yaml" in problem
    assert (
        ingress_config_problem(
            _spec("serve_config.yaml"), has_controller_options=True, ray_version="2.60.0"
        )
        is None
    )


def test_the_installed_ray_runs_the_default_configs_ingress() -> None:
    assert serve_applies_controller_options()
    check_serve_config(_spec("serve_config.yaml"))


@pytest.mark.parametrize("spec", [_spec("serve_config.trtllm.yaml"), _rayservice_spec()])
def test_tensorrt_llm_configs_use_serves_proxy_which_every_ray_runs(spec: dict[str, Any]) -> None:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(spec)
    assert not asks_for_haproxy(spec) and "controller_options" not in spec
    for has_controller_options in (False, True):
        problem = ingress_config_problem(
            spec, has_controller_options=has_controller_options, ray_version="2.55.1"
        )
        assert problem is None


def test_a_serve_run_on_a_ray_without_haproxy_is_refused_before_it_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cluster.local import free_port, serve_app

    monkeypatch.setattr(ingress, "serve_applies_controller_options", lambda: False)
    with pytest.raises(ingress.IngressUnavailable, match=r"RAY_SERVE_ENABLE_HA_PROXY is \"1\""):
        with serve_app("serve_config.yaml", port=free_port()):
            pass
