"""Token streams travel over the engine replicas' own channel, not Serve's handle path (engine.transport)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e


def test_streams_take_the_direct_channel_and_serve_hands_routers_its_address(
    client: Any, ray_driver: None, engine_handle: Any
) -> None:
    from ray import serve

    router = serve.get_app_handle("shepherd")
    before = router.engine_client_stats.remote().result()
    served_before = engine_handle.channel_stats.remote().result()["num_streams_served"]
    for _ in range(3):
        reply = client.completions.create(
            model=MODEL, prompt="one two", max_tokens=4, temperature=0
        )
        assert reply.choices[0].finish_reason in ("length", "stop")
    after = router.engine_client_stats.remote().result()
    channel = engine_handle.channel_stats.remote().result()
    assert after["num_direct_replicas"] == 1, after
    assert after["num_direct_streams"] - before["num_direct_streams"] == 3, (before, after)
    assert after["num_handle_streams"] == before["num_handle_streams"], (before, after)
    assert channel["num_streams_served"] - served_before == 3, channel
    host, port = channel["address"].rsplit(":", 1)
    assert host and int(port) > 0
