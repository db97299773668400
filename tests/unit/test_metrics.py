"""Metrics: what a generation, the executor and the sessions record, the `/metrics` text, the access log."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deployments import metrics
from deployments.messages import ExecutorStats


@pytest.fixture(autouse=True)
def fresh_registry() -> Iterator[None]:
    metrics.reset(export_to_ray=False)
    yield
    metrics.reset()


def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text, content_type = metrics.render_summary()
    assert content_type.startswith("text/plain; version=0.0.4")
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(name: str, **labels: str) -> float:
    return samples().get((name, tuple(sorted(labels.items()))), 0.0)


def test_nothing_is_created_until_first_use() -> None:
    assert metrics.render_summary()[0] == b""
    metrics.REQUESTS.inc(1, {"route": "/v1/models", "status": "200"})
    assert value("shepherd_requests_total", route="/v1/models", status="200") == 1


def test_a_streamed_generation_records_ttft_itl_e2e_tokens_and_finish() -> None:
    request = metrics.RequestMetrics("/v1/chat/completions")
    time.sleep(0.02)
    request.on_tokens(1)
    time.sleep(0.01)
    request.on_tokens(2)
    request.on_tokens(0)  # an empty delta is not a token
    request.on_finish("length", num_prompt_tokens=7, num_completion_tokens=3)
    # Ignored: the generation already finished.
    request.on_finish("cancelled", num_prompt_tokens=7, num_completion_tokens=3)
    route = "/v1/chat/completions"
    assert value("shepherd_time_to_first_token_seconds_count", route=route) == 1
    assert value("shepherd_time_to_first_token_seconds_sum", route=route) >= 0.02
    assert value("shepherd_inter_token_latency_seconds_count", route=route) == 1
    itl_sum_s = value("shepherd_inter_token_latency_seconds_sum", route=route)
    assert 0.004 <= itl_sum_s < 0.5  # ~10 ms over 2 tokens
    assert value("shepherd_e2e_latency_seconds_count", route=route) == 1
    assert value("shepherd_prompt_tokens_total", route=route) == 7
    assert value("shepherd_completion_tokens_total", route=route) == 3
    assert value("shepherd_request_finish_total", route=route, finish_reason="length") == 1
    assert value("shepherd_request_finish_total", route=route, finish_reason="cancelled") == 0


def test_errors_and_cancellations_count_but_stay_out_of_the_latency_histogram() -> None:
    for reason in ("error", "cancelled"):
        request = metrics.RequestMetrics("/v1/completions")
        request.on_finish(reason, num_prompt_tokens=3, num_completion_tokens=0)
        assert (
            value("shepherd_request_finish_total", route="/v1/completions", finish_reason=reason)
            == 1
        )
    assert value("shepherd_e2e_latency_seconds_count", route="/v1/completions") == 0


def test_active_sessions_counts_turns_in_progress() -> None:
    first = metrics.RequestMetrics("/v1/chat/completions", session_id="sess_a")
    second = metrics.RequestMetrics("/v1/chat/completions", session_id="sess_b")
    assert value("shepherd_active_sessions") == 2
    first.on_finish("stop", num_prompt_tokens=1, num_completion_tokens=1)
    second.on_finish("error", num_prompt_tokens=1, num_completion_tokens=0)
    second.on_finish("error", num_prompt_tokens=1, num_completion_tokens=0)
    assert value("shepherd_active_sessions") == 0


def stats(**overrides: Any) -> ExecutorStats:
    base: dict[str, Any] = {
        "num_active_requests": 3,
        "num_queued_requests": 1,
        "num_submitted_requests": 10,
        "num_finished_requests": 6,
        "num_cancelled_requests": 1,
        "num_generated_tokens": 500,
    }
    return ExecutorStats(**{**base, **overrides})


def test_engine_metrics_turn_executor_totals_into_counters_and_skip_unreported_gauges() -> None:
    engine = metrics.EngineMetrics()
    engine.update(stats())
    engine.update(stats(num_submitted_requests=12, num_generated_tokens=650, num_active_requests=5))
    assert (
        value("shepherd_engine_active_requests") == 5
        and value("shepherd_engine_queued_requests") == 1
    )
    assert value("shepherd_engine_requests_total", event="submitted") == 12
    assert value("shepherd_engine_requests_total", event="cancelled") == 1
    assert value("shepherd_engine_generated_tokens_total") == 650
    found = samples()
    assert not any(name.startswith("shepherd_engine_kv_cache") for name, _ in found), (
        "not reported: not exported"
    )
    engine.update(stats(kv_cache_usage=0.25, prefix_cache_hit_rate=0.5))
    assert value("shepherd_engine_kv_cache_usage_ratio") == 0.25
    assert value("shepherd_engine_prefix_cache_hit_rate") == 0.5


def test_a_total_that_goes_down_counts_from_zero_again() -> None:
    deltas = metrics.CounterDeltas()
    assert [deltas.delta("x", t) for t in (5, 8, 2, 4)] == [5, 3, 2, 2]


def test_session_metrics_follow_the_session_counters() -> None:
    sessions = metrics.SessionMetrics()
    counters = {
        "num_template_breaks": 1,
        "num_evicted_messages": 4,
        "num_committed_turns": 9,
        "num_aborted_turns": 2,
    }
    sessions.update(counters)
    sessions.update({**counters, "num_committed_turns": 10})
    assert value("shepherd_session_turns_total", outcome="committed") == 10
    assert value("shepherd_session_turns_total", outcome="aborted") == 2
    assert value("shepherd_session_evicted_messages_total") == 4
    assert value("shepherd_session_template_breaks_total") == 1


def test_polling_updates_until_cancelled() -> None:
    async def scenario() -> int:
        calls: list[int] = []
        task = metrics.start_polling(lambda: calls.append(1), interval_s=0.01)
        await asyncio.sleep(0.05)
        task.cancel()
        return len(calls)

    assert asyncio.run(scenario()) >= 2


def test_ray_export_is_off_outside_ray_and_on_by_request(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    # Auto follows whether this process is a Ray worker or driver; an earlier test in the same xdist worker
    # may have left Ray initialised, so the test says which case it means.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    metrics.reset()
    metrics.FINISHES.inc(1, {"route": "r", "finish_reason": "stop"})
    assert metrics.FINISHES._ray is None
    monkeypatch.undo()
    metrics.reset(export_to_ray=True)
    metrics.FINISHES.inc(1, {"route": "r", "finish_reason": "stop"})
    assert type(metrics.FINISHES._ray).__module__ == "ray.serve.metrics"


def test_engine_metrics_count_cached_and_uncached_prompt_tokens_and_a_generation_its_cached_ones() -> (
    None
):
    engine = metrics.EngineMetrics()
    engine.update(
        stats(
            num_cached_prompt_tokens=128, num_uncached_prompt_tokens=72, prefix_cache_hit_rate=0.64
        )
    )
    engine.update(
        stats(
            num_cached_prompt_tokens=320, num_uncached_prompt_tokens=80, prefix_cache_hit_rate=0.8
        )
    )
    assert value("shepherd_engine_prompt_tokens_total", cache="cached") == 320
    assert value("shepherd_engine_prompt_tokens_total", cache="uncached") == 80
    assert value("shepherd_engine_prefix_cache_hit_rate") == 0.8
    request = metrics.RequestMetrics("/v1/chat/completions")
    request.on_tokens(1)
    request.on_finish("stop", num_prompt_tokens=100, num_completion_tokens=1, num_cached_tokens=64)
    assert value("shepherd_cached_prompt_tokens_total", route="/v1/chat/completions") == 64
