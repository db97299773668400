"""Serve's request router for the Engine deployment: its config, and the membership it publishes."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments.config import EngineConfig
from deployments.engine import engine_deployment
from deployments.transport.serve_router import SessionAffinityRouter, engine_request_router_config


def test_engine_request_router_config_names_this_router() -> None:
    config = engine_request_router_config(block_size=16, load_epsilon=0.5)
    assert config.request_router_class == "deployments.transport.serve_router:SessionAffinityRouter"
    assert config.request_router_kwargs == {
        "block_size": 16,
        "virtual_nodes": 100,
        "load_epsilon": 0.5,
        "imbalance_threshold": 8,
        "max_prefix_entries": 65536,
        "is_affinity": True,
        "load_slack": 8,
    }
    assert config.request_routing_stats_period_s == 1.0
    assert (
        config.get_request_router_class().__name__ == SessionAffinityRouter.__name__
    )  # cloudpickled by value
    with pytest.raises(ValueError):
        engine_request_router_config(block_size=0)


def test_the_engine_deployment_takes_its_routing_stats_period_from_the_config(
    tmp_path: Path,
) -> None:
    default = engine_deployment(EngineConfig(kind="emulator"), str(tmp_path))
    assert default._deployment_config.request_router_config.request_routing_stats_period_s == 1.0
    config = EngineConfig(kind="emulator", routing_stats_period_s=0.5)
    router_config = engine_deployment(
        config, str(tmp_path)
    )._deployment_config.request_router_config
    assert router_config.request_routing_stats_period_s == 0.5


_SHIPPED_ROUTER_CHECK = """
import sys, types
import ray.cloudpickle as cloudpickle
from ray.serve._private.common import DeploymentID
from deployments.transport.membership import channel_metadata, replica_directory
from deployments.transport.policy import RoutingPolicy
from deployments.transport.serve_router import SessionAffinityRouter
from deployments.transport.wire import WIRE_VERSION

shipped = cloudpickle.loads(sys.stdin.buffer.read())
assert shipped is not SessionAffinityRouter, "not shipped by value"
router = shipped.__new__(shipped)  # Serve's constructor needs a running Serve; the hook does not
router._policy = RoutingPolicy()
router._deployment_id = DeploymentID(name="Engine", app_name="shipped")
replica = types.SimpleNamespace(
    replica_id=types.SimpleNamespace(unique_id="r1"), replica_metadata=channel_metadata("h:1", WIRE_VERSION)
)
router._publish(replicas=[replica])
directory = replica_directory("shipped", "Engine")
assert list(directory.replicas) == ["r1"] and directory.routing_config is router._policy.config, directory.replicas
router._publish(removed="r1")
assert directory.replicas == {}
print("published")
"""


def test_the_router_class_shipped_by_value_publishes_to_the_processs_directory() -> None:
    """Serve ships the request router class by value (cloudpickle), so its module globals are a private copy
    in the receiving process: membership must reach the directory `EngineClient` reads by a by-name import."""
    import subprocess
    import sys

    import ray.cloudpickle as cloudpickle

    import deployments.transport.serve_router as routing_module

    cloudpickle.register_pickle_by_value(routing_module)
    try:
        payload = cloudpickle.dumps(SessionAffinityRouter)
    finally:
        cloudpickle.unregister_pickle_by_value(routing_module)
    check = subprocess.run(
        [sys.executable, "-c", _SHIPPED_ROUTER_CHECK],
        input=payload,
        capture_output=True,
        timeout=120,
    )
    assert check.returncode == 0 and check.stdout.strip() == b"published", check.stderr.decode()[
        -2000:
    ]


def test_the_session_comes_from_the_request_where_ray_has_no_session_option() -> None:
    """Ray 2.55 (the `tensorrt` extra's) has no `session_id` on a handle call's metadata; 2.60 has it."""
    import dataclasses
    from types import SimpleNamespace
    from typing import Any, cast

    from deployments.messages import GenerateRequest
    from deployments.transport.serve_router import _request_keys

    request = SimpleNamespace(session_id="s-1", prompt_token_ids=[1, 2, 3])
    ray_2_55 = SimpleNamespace(args=[request], metadata=SimpleNamespace(internal_request_id="x"))
    assert _request_keys(cast(Any, ray_2_55)) == ("s-1", [1, 2, 3])
    ray_2_60 = SimpleNamespace(args=[request], metadata=SimpleNamespace(session_id="s-2"))
    assert _request_keys(cast(Any, ray_2_60)) == ("s-2", [1, 2, 3])
    assert "session_id" in {field.name for field in dataclasses.fields(GenerateRequest)}


def test_a_replica_without_metadata_announces_no_channel() -> None:
    """Ray 2.55's RunningReplica has no `replica_metadata`: the Router then takes Serve's handle path."""
    from types import SimpleNamespace
    from typing import Any, cast

    from deployments.transport.membership import ReplicaDirectory, channel_metadata

    ray_2_55 = cast(Any, SimpleNamespace(replica_id=SimpleNamespace(unique_id="r1")))
    assert ReplicaDirectory.channel_address(ray_2_55) is None
    assert ReplicaDirectory.wire_version(ray_2_55) is None
    ray_2_60 = cast(Any, SimpleNamespace(replica_metadata=channel_metadata("h:1", "7")))
    assert ReplicaDirectory.channel_address(ray_2_60) == "h:1"
    assert ReplicaDirectory.wire_version(ray_2_60) == "7"
