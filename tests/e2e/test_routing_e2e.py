"""SessionAffinityRouter on a real Ray Serve: a session's turns land on one replica, and both replicas serve.

The app runs in a subprocess with its own fresh local Ray (`python -m tests.e2e.test_routing_e2e`): this
pytest process may already drive the suite's `serve run` cluster, and other clusters may run on the machine.
No model is loaded: the deployment only reports which replica served each call.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cluster.local import local_ray, run_module
from deployments.messages import GenerateRequest
from deployments.transport.policy import RoutingConfig, RoutingPolicy
from deployments.transport.serve_router import engine_request_router_config

pytestmark = pytest.mark.e2e

NUM_SESSIONS = 12  # 2 replicas: the odds that every session hashes to one replica are 2 ** -11
NUM_TURNS = 5
NUM_SESSIONLESS = 6
RESULT_PREFIX = "ROUTING-E2E "
# A wide load bound: this test pins stickiness; bounded-load fallback is covered by the unit tests.
ROUTER_KWARGS: dict[str, Any] = {"block_size": 4, "load_epsilon": 100.0}


class ReplicaEcho:
    """Stands in for the Engine: takes a GenerateRequest and streams the id of the replica that serves it."""

    async def generate(self, request: GenerateRequest) -> AsyncIterator[str]:
        from ray import serve

        yield serve.get_replica_context().replica_id.unique_id
        await asyncio.sleep(0.01)
        yield request.request_id


async def _call(handle: Any, request: GenerateRequest, session_id: str | None) -> str:
    options: dict[str, Any] = (
        {"stream": True} if session_id is None else {"stream": True, "session_id": session_id}
    )
    items = [item async for item in handle.options(**options).generate.remote(request)]
    assert items[1] == request.request_id
    replica_id: str = items[0]
    return replica_id


async def _drive(handle: Any) -> dict[str, Any]:
    async def session(index: int) -> list[str]:
        session_id, prompt_token_ids, replicas = f"session-{index}", [index] * 8, []
        for turn in range(NUM_TURNS):
            prompt_token_ids = [*prompt_token_ids, *range(100 * turn, 100 * turn + 8)]
            request = GenerateRequest(f"{session_id}-{turn}", prompt_token_ids, max_tokens=4)
            replicas.append(await _call(handle, request, session_id))
        return replicas

    # Sessions run concurrently; the turns of one session run in order, as a conversation does.
    served = await asyncio.gather(*(session(i) for i in range(NUM_SESSIONS)))
    # Without a session, prompts sharing a long prefix follow the replica that served it first.
    shared = list(range(1000, 1040))
    sessionless = [
        await _call(handle, GenerateRequest(f"shared-{i}", [*shared, i], max_tokens=4), None)
        for i in range(NUM_SESSIONLESS)
    ]
    return {
        "sessions": {f"session-{i}": replicas for i, replicas in enumerate(served)},
        "shared": sessionless,
    }


def main() -> None:
    from ray import serve

    with local_ray(num_cpus=4):
        serve.start(proxy_location="Disabled")
        deployment: Any = serve.deployment(
            ReplicaEcho,
            name="Engine",
            num_replicas=2,
            max_ongoing_requests=32,
            ray_actor_options={"num_cpus": 1},
            request_router_config=engine_request_router_config(**ROUTER_KWARGS),
        )
        handle = serve.run(deployment.bind(), name="routing-e2e", route_prefix=None)
        print(RESULT_PREFIX + json.dumps(asyncio.run(_drive(handle))), flush=True)


def test_each_session_stays_on_its_ring_owner_and_both_replicas_serve() -> None:
    run = run_module("tests.e2e.test_routing_e2e", RESULT_PREFIX, 120)
    assert run.returncode == 0 and run.result is not None, run.output[-4000:]
    result = run.result

    sessions: dict[str, list[str]] = result["sessions"]
    moved = {sid: replicas for sid, replicas in sessions.items() if len(set(replicas)) > 1}
    assert not moved, json.dumps(moved)
    replica_ids = {replicas[0] for replicas in sessions.values()}
    assert len(replica_ids) == 2, sessions
    # The owner is exactly the ring owner any router process computes from the two replica ids.
    policy = RoutingPolicy(RoutingConfig(**ROUTER_KWARGS))
    assert all(
        policy.session_order(replica_ids, sid)[0] == replicas[0]
        for sid, replicas in sessions.items()
    )
    assert len(set(result["shared"])) == 1, result["shared"]


if __name__ == "__main__":
    main()
