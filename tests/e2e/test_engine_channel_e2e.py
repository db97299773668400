"""Token streams travel over the engine replicas' own channel, not Serve's handle path (engine.transport),
as an operator sees it: the Router's `/metrics` and the Engine's `stats()`."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import AUTH, MODEL

pytestmark = pytest.mark.e2e


def router_series(base_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{base_url}/metrics", headers=AUTH).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def streams(series: dict[Any, float], transport: str) -> float:
    return series.get(("shepherd_engine_streams_total", (("transport", transport),)), 0.0)


def settled(base_url: str) -> dict[Any, float]:
    """The Router's series once its 1 s metrics poll has caught up (two equal reads in a row)."""
    previous = router_series(base_url)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(1.2)
        current = router_series(base_url)
        if streams(current, "direct") == streams(previous, "direct"):
            return current
        previous = current
    raise AssertionError("the Router's stream counters never settled")


def test_streams_take_the_direct_channel_and_serve_hands_routers_its_address(
    base_url: str, client: Any, ray_driver: None, engine_handle: Any
) -> None:
    before = settled(base_url)
    served_before = engine_handle.stats.remote().result().num_channel_streams_served
    for _ in range(3):
        reply = client.completions.create(
            model=MODEL, prompt="one two", max_tokens=4, temperature=0
        )
        assert reply.choices[0].finish_reason in ("length", "stop")
    after = settled(base_url)
    stats = engine_handle.stats.remote().result()
    assert after[("shepherd_engine_direct_replicas", ())] == 1, after
    assert streams(after, "direct") - streams(before, "direct") == 3, (before, after)
    assert streams(after, "serve_handle") == streams(before, "serve_handle"), (before, after)
    assert stats.num_channel_streams_served - served_before == 3, stats
    host, port = (stats.channel_address or "").rsplit(":", 1)
    assert host and int(port) > 0
