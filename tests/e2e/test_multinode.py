"""Many nodes: the app on a multi-node Ray cluster, with live multi-turn sessions through autoscaling, a rolling
update, the loss of an Engine node and the loss of a Router node.

One cluster serves the whole module, and the scenarios run in this order, each leaving what the next needs:
autoscaling, rolling update, Engine node loss, Router node loss. Four nodes, each a `ray start` of its own, the
three besides the head started together: the head (Serve's controller and proxy, room for a Router and an
Engine replica), "cpu-1" (the other Router) and "gpu-1", "gpu-2" (one Engine replica each; `gpu_node`
resources, the emulator engine standing in for a GPU engine); sessions in a real redis-server; the app put on
with `serve deploy` (`benchmarks/multinode.py`). Every count a scenario measured is asserted, and recorded
(`record_property`, and printed for `-s`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.multinode import (
    EmulatorCluster,
    app_args,
    autoscale,
    emulator_cluster,
    node_loss,
    rolling_update,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# First deploy: Engine autoscaling between 2 and 3 replicas on a short fuse (the burst scenario).
SCALING = {
    "min_replicas": 2,
    "max_replicas": 3,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 0.5,
    # Several times what placing every session once at the peak takes (a turn each, one owner's turns a routing
    # stats period apart: 0.3-0.6 s a session on a busy 2-core machine, `placement_s`), so that a slower
    # machine never removes a replica mid-count (the sessions it held would move).
    "downscale_delay_s": 16,
    "look_back_period_s": 2,
    "metrics_interval_s": 0.5,
}
# Serve pulls the replicas' load for the Routers this often: placing sessions one turn at a time waits it out
# between two turns of one owner (`benchmarks.multinode._homes`).
ENGINE = {"autoscaling": SCALING, "routing_stats_period_s": 0.5}
# The rollout's new version: another emulator speed, and a target no later scenario's load reaches.
NEW_VERSION = {
    **ENGINE,
    "emulator": {"itl_ms": 12},
    "autoscaling": {**SCALING, "target_ongoing_requests": 32},
}


def report(record_property: Any, name: str, result: Any) -> None:
    fields = {k: v for k, v in dataclasses.asdict(result).items() if k != "turns"}
    record_property(name, json.dumps(fields, default=str))
    print(f"\nMULTINODE {name} {json.dumps(fields, default=str)}")


@pytest.fixture(scope="module")
def app(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorCluster]:
    with emulator_cluster(
        num_engine_nodes=2,
        cache_dir=str(model_dir.parent),
        workdir=tmp_path_factory.mktemp("multinode"),
        engine=ENGINE,
    ) as running:
        running.wait_replicas("Engine", 2)
        running.wait_replicas("Router", 2)
        yield running


def test_replicas_run_on_the_nodes_their_resources_pin_them_to(app: EmulatorCluster) -> None:
    engine_nodes = [app.node_of_replica(r).name for r in app.replicas("Engine")]
    router_nodes = [app.node_of_replica(r).name for r in app.replicas("Router")]
    assert len(set(engine_nodes)) == 2 and set(engine_nodes) <= {"head", "gpu-1", "gpu-2"}
    assert sorted(router_nodes) == ["cpu-1", "head"]


def test_engine_autoscales_with_the_load_and_only_sessions_of_a_removed_replica_move(
    app: EmulatorCluster, record_property: Any
) -> None:
    # 12 sessions: the new replica's arc of the ring (a third) holds none of n sessions with odds (2/3)^n, 4% at 8.
    result = asyncio.run(
        autoscale(app, num_sessions=12, max_tokens=16, burst_max_tokens=64, max_replicas=3)
    )
    report(record_property, "autoscale", result)
    assert result.replicas == [2, 3, 2]
    assert result.burst.get("ok", 0) > 0 and set(result.burst) == {"ok"}, result.burst
    # Consistent hashing: a new replica takes sessions from the others, and no session moves between them.
    assert result.moved_on_scale_up > 0
    assert result.moved_to_new_replica == result.moved_on_scale_up
    # Scaling down moves exactly the sessions of the replica Serve removed.
    assert result.off_owner == [0, 0, 0]  # every session was where the Routers' ring puts it
    assert result.moved_although_kept == 0
    assert result.moved_on_scale_down == result.homed_on_removed_replica
    assert result.history.is_exact, result.history


def test_serve_deploy_of_a_new_engine_version_under_load_loses_no_turn(
    app: EmulatorCluster, record_property: Any
) -> None:
    new_args = app_args(
        app.redis_url, app.cache_dir, engine=NEW_VERSION
    )  # every Router and Engine replica is replaced (the app's args changed)
    # A light load (think time): every Router and Engine replica restarts on 2 cores meanwhile.
    result = asyncio.run(rolling_update(app, new_args, num_sessions=6, think_s=0.5))
    report(record_property, "rolling_update", result)
    assert result.is_every_replica_new
    assert set(result.during) == {"ok"}, result.during  # new replicas start before old ones drain
    assert set(result.after) == {"ok"} and result.after["ok"] >= 2 * result.num_sessions
    assert result.num_turns_on_new_engines >= result.after["ok"]
    assert result.history.is_exact, result.history


def test_losing_an_engine_node_cuts_its_streams_cleanly_and_the_survivors_serve_every_session(
    app: EmulatorCluster, record_property: Any
) -> None:
    # Back-to-back turns of 96 tokens: the replica killed has streams in flight.
    result = asyncio.run(node_loss(app, "Engine", num_sessions=8, max_tokens=96, think_s=0))
    report(record_property, "engine_node_loss", result)
    assert result.node.startswith("gpu-") and result.num_pids_killed >= 3  # raylet, agents, replica
    assert result.recovery_s is not None  # Serve ran a replacement on the node with room
    # The streams on the lost replica end with an in-band error; a turn whose request reached the dying replica
    # before its stream began gets the Router's 503 (the engine is unavailable: retry); the others finish.
    failed_cleanly = result.in_flight.get("cut", 0) + result.in_flight.get("HTTP 503", 0)
    assert failed_cleanly >= 1, result.in_flight
    assert set(result.in_flight) <= {"ok", "cut", "HTTP 503"}, result.in_flight
    # Every turn started after the loss succeeds, on the surviving replica, then on its replacement.
    assert set(result.later) == {"ok"}, result.later
    assert result.num_later_sessions_served == result.num_sessions
    # No committed turn is lost, and no cut turn is stored.
    assert result.history.num_cut_turns_stored == 0
    assert result.history.is_exact, result.history


def test_losing_a_router_node_leaves_every_session_to_the_other_router(
    app: EmulatorCluster, record_property: Any
) -> None:
    result = asyncio.run(node_loss(app, "Router", num_sessions=8))
    report(record_property, "router_node_loss", result)
    assert result.node == "cpu-1"  # the other Router runs on the head
    # Turns on the lost Router fail: cut mid-stream (the connection drops), or, when it dies before the
    # response starts, Serve's proxy answers 500 (it maps the dead replica's ActorDiedError to 500).
    assert set(result.in_flight) <= {"ok", "cut", "HTTP 500"}, result.in_flight
    # How many were on it is up to Serve's proxy (power of two choices on queue lengths it probes; on a loaded
    # machine it may have sent every turn of the moment to the head's Router): 0 to 8 here, so not asserted.
    num_failed = sum(n for status, n in result.in_flight.items() if status != "ok")
    # A cut turn's session stays busy (409) until its lease expires (sessions.turn_timeout_s); every other
    # later turn succeeds on the other Router, from the history in Redis.
    assert set(result.later) <= {"ok", "HTTP 409"}, result.later
    assert result.later.get("HTTP 409", 0) == 0 or num_failed > 0
    assert result.num_later_sessions_served == result.num_sessions
    # A turn cut after the Router committed it is stored (the client saw it cut); no other failed turn is.
    assert result.history.num_cut_turns_stored <= result.in_flight.get("cut", 0)
    assert result.history.is_exact, result.history
