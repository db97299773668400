"""The routing simulation: deterministic, conserves requests, real router keys, and an engine model that
prices only uncached prompt tokens."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from benchmarks import bench_routing_sim
from benchmarks.engine_model import PUBLISHED_H100_THROUGHPUT, EngineModel, SimRequest, StepCost
from benchmarks.routing_sim import POLICIES, TINY, Simulation, plan_sessions, simulate
from deployments.executors.prefix_cache import PrefixCache
from deployments.transport.policy import RoutingConfig, RoutingPolicy


def outcome(requests: list[SimRequest]) -> list[tuple[str, str, int, float]]:
    return [(r.request_id, r.replica_id, r.num_cached_tokens, r.first_token_s) for r in requests]


def test_a_seed_fixes_every_routing_decision_and_timing() -> None:
    first = simulate(TINY)
    again = simulate(TINY)
    other = simulate(dataclasses.replace(TINY, seed=1), ["pow2"])

    for policy in POLICIES:
        assert outcome(first[policy].requests) == outcome(again[policy].requests)
    assert outcome(other["pow2"].requests) != outcome(first["pow2"].requests)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_turn_of_every_session_is_served_once_and_leaves_nothing_pinned(policy: str) -> None:
    simulation = Simulation(TINY, policy, plan_sessions(TINY))
    run = simulation.run()

    expected = {
        f"session-{s}-turn-{t}" for s in range(TINY.num_sessions) for t in range(TINY.num_turns)
    }
    assert sorted(r.request_id for r in run.requests) == sorted(expected)
    assert sum(run.num_served.values()) == len(expected)
    for request in run.requests:
        assert request.arrival_s <= request.first_token_s <= request.finish_s
        assert request.num_decoded == len(request.output_token_ids)
        assert 0 <= request.num_cached_tokens <= request.num_reusable_tokens
    for engine in simulation.engines.values():
        assert not engine.has_work and engine.cache.num_pinned_blocks == 0
        assert len(engine.cache) <= engine.cache.num_blocks


def test_affinity_without_a_load_bound_hits_all_a_session_computed_and_beats_power_of_two() -> None:
    # Ample KV and no bounded-load spill: every later turn lands where its history is cached.
    config = dataclasses.replace(TINY, load_epsilon=1000.0)
    runs = simulate(config, ["session", "pow2"])
    affinity, pow2 = runs["session"].requests, runs["pow2"].requests

    assert all(r.num_cached_tokens == r.num_reusable_tokens for r in affinity)
    assert runs["session"].num_spilled == 0

    def hit(requests: list[SimRequest]) -> float:
        cached = sum(r.num_cached_tokens for r in requests)
        return cached / sum(len(r.prompt_token_ids) for r in requests)

    assert hit(affinity) > 2 * hit(pow2)


def test_kv_events_rebuild_exactly_what_each_replica_caches_newest_first() -> None:
    simulation = Simulation(TINY, "kv_events", plan_sessions(TINY))
    simulation.run()

    for replica_id, engine in simulation.engines.items():
        index = simulation.indexes[replica_id]
        assert len(index.block_hashes) == len(engine.cache)
        assert all(block_hash in engine.cache for block_hash in index.block_hashes)
        newest = list(index.block_hashes)[-3:][::-1]
        assert index.recent_hashes(3) == newest


def test_simulated_prompts_are_keyed_like_the_router_keys_them() -> None:
    simulation = Simulation(TINY, "pow2", plan_sessions(TINY))
    run = simulation.run()
    policy = RoutingPolicy(RoutingConfig(block_size=TINY.tokens_per_block))

    for request in run.requests[:20]:
        assert request.block_hashes == policy.prompt_block_hashes(request.prompt_token_ids)


def sim_request(request_id: str, prompt: list[int], num_output: int) -> SimRequest:
    return SimRequest(request_id, 0, 0, prompt, [], list(range(num_output)), 0.0, 0)


def test_the_engine_prefills_only_uncached_tokens_in_chunks_of_its_token_budget() -> None:
    cost = StepCost.published("h100")
    engine = EngineModel("r", PrefixCache(64, 10), cost, max_batch_size=8, max_num_tokens=100)
    history = list(range(1000, 1061))  # 6 blocks cacheable
    warm = sim_request("warm", history, 1)
    warm.block_hashes = engine.cache.block_hashes(history)
    engine.submit(warm)
    now = engine.start_step(0.0)
    assert now == pytest.approx(cost.step_s(61, 0, 0))  # a cold prompt pays for every token
    assert engine.end_step(now) == [warm]

    turn = history + list(range(5000, 5250))  # 60 tokens cached, 251 to prefill: 3 steps
    request = sim_request("turn", turn, 2)
    request.block_hashes = engine.cache.block_hashes(turn)
    engine.submit(request)
    start = now
    for chunk in (100, 100, 51):
        end = engine.start_step(now)
        assert end - now == pytest.approx(cost.step_s(chunk, 0, 0))
        engine.end_step(end)
        now = end
    assert request.num_cached_tokens == 60
    assert request.first_token_s == pytest.approx(
        start + cost.step_s(251, 0, 0) + 2 * cost.overhead_s
    )


def test_runs_of_decode_steps_time_exactly_like_single_steps() -> None:
    batched = simulate(TINY, ["session", "pow2"])
    stepped = simulate(dataclasses.replace(TINY, is_step_by_step=True), ["session", "pow2"])

    for policy in ("session", "pow2"):
        for fast, slow in zip(batched[policy].requests, stepped[policy].requests, strict=True):
            assert (fast.request_id, fast.replica_id) == (slow.request_id, slow.replica_id)
            assert fast.first_token_s == pytest.approx(slow.first_token_s, abs=1e-9)
            assert fast.finish_s == pytest.approx(slow.finish_s, abs=1e-9)


def test_step_costs_fit_two_published_rows_and_predict_the_other_two() -> None:
    cost = StepCost.published("h100")
    for batch, num_in, num_out, published in PUBLISHED_H100_THROUGHPUT:
        predicted = cost.predicted_throughput(batch, num_in, num_out)
        assert predicted == pytest.approx(published, rel=0.1)
    # Reading 256 KiB of FP8 KV per context token at the H100's 3.35 TB/s takes about 78 ns.
    assert cost.decode_s_per_context_token == pytest.approx(256 * 1024 / 3.35e12, rel=0.1)
    h200 = StepCost.published("h200")
    assert h200.prefill_s_per_token == cost.prefill_s_per_token
    assert h200.overhead_s < cost.overhead_s


def test_the_benchmark_prints_one_table_and_writes_json_and_a_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, png = tmp_path / "sim.json", tmp_path / "ttft.png"

    args = ["--tiny", "--policies", "session,pow2", "--epsilons", "0.25,1", "--slacks", "0,8"]
    assert bench_routing_sim.main([*args, "--out", str(out), "--plot", str(png)]) == 0
    table = capsys.readouterr().out
    results = json.loads(out.read_text())["results"]
    assert [r["name"] for r in results] == [
        "session eps=0.25 slack=0",
        "session eps=1 slack=0",
        "session eps=0.25 slack=8",
        "session eps=1 slack=8",
        "pow2",
    ]
    for result in results:
        assert result["num_finished"] == result["num_requests"] == 48 * 4
        assert set(result["ttft_ms_per_turn"]) == {"1", "2", "3", "4"}
    assert table.count("session affinity") == 4 and "eps=0.25+8" in table and "1.00x" in table
    assert png.stat().st_size > 10_000
