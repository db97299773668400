"""TrtllmExecutor against the bindings double, or a real engine (SHEPHERD_TRTLLM_ENGINE_DIR).

Expected outputs are never hard-coded: a greedy run first shows what the engine generates, and the
end id / stop sequence under test are taken from it, so a real model passes the same assertions.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib
from pathlib import Path
from typing import Any

import pytest

from deployments.config import TrtllmConfig
from deployments.errors import EngineDead, EngineError, OverloadedError, RequestError
from deployments.executors.trtllm import TrtllmExecutor
from deployments.executors.trtllm_config import read_engine_layout
from deployments.executors.trtllm_kv_events import chain_block_hashes
from deployments.executors.trtllm_requests import build_request
from deployments.messages import (
    FinishReason,
    GenerateRequest,
    RetentionRange,
    SamplingParams,
)
from tests import trtllm_support as support

tle: Any = importlib.import_module("tensorrt_llm.bindings.executor")
PROMPT = [11, 12, 13, 14, 15, 16, 17, 18, 19]


@pytest.fixture
def engine_dir(tmp_path: Path) -> Path:
    return support.engine_dir_or_skip(tmp_path)


def make_config(engine_dir: Path, **overrides: Any) -> TrtllmConfig:
    fields: dict[str, Any] = {"stats_period_s": 0.02, "kv_events_poll_period_ms": 2.0}
    return TrtllmConfig(engine_dir=str(engine_dir), **(fields | overrides))


async def started(config: TrtllmConfig) -> TrtllmExecutor:
    executor = TrtllmExecutor(config)
    await executor.start()
    executor._engine = support.EngineSpy(executor._engine)
    return executor


def first_unique_index(tokens: list[int], start: int = 1) -> int:
    """An index whose token does not occur earlier, so stopping on it is unambiguous."""
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


# ---- request mapping (pure) ----------------------------------------------------------------------
def test_request_maps_every_field_onto_keyword_only_request() -> None:
    request = GenerateRequest(
        "r1",
        [1, 2, 3, 4, 5],
        16,
        SamplingParams(
            temperature=0.7,
            top_p=0.9,
            top_k=40,
            seed=123,
            presence_penalty=0.5,
            frequency_penalty=0.25,
            repetition_penalty=1.1,
            min_tokens=3,
        ),
        end_id=2,
        pad_id=0,
        stop_token_sequences=((7, 8), (9,)),
        return_logprobs=True,
        retention=RetentionRange(0, 4),
    )
    trt = build_request(tle, request, client_id=77, decode_retention_priority=35)
    assert (trt.input_token_ids, trt.max_tokens) == ([1, 2, 3, 4, 5], 16)
    assert trt.streaming is True
    assert (trt.end_id, trt.pad_id, trt.client_id) == (2, 0, 77)
    assert trt.stop_words == [[7, 8], [9]]
    assert trt.output_config.return_log_probs is True
    sampling = trt.sampling_config
    assert sampling.beam_width == 1
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == pytest.approx((0.7, 0.9, 40))
    assert sampling.seed == 123
    assert sampling.presence_penalty == pytest.approx(0.5)
    assert sampling.frequency_penalty == pytest.approx(0.25)
    assert sampling.repetition_penalty == pytest.approx(1.1)
    assert sampling.min_tokens == 3
    retention = trt.kv_cache_retention_config
    [token_range] = retention.token_range_retention_configs
    assert (token_range.token_start, token_range.token_end, token_range.priority) == (0, 4, 100)
    assert retention.decode_retention_priority == 35


@pytest.mark.parametrize("top_p", [0.0, -1.0, 1.0])
def test_disabled_top_p_is_sent_as_none(top_p: float) -> None:
    request = support.greedy_request("r", [1], 4, sampling=SamplingParams(top_p=top_p))
    trt = build_request(tle, request, client_id=1, decode_retention_priority=35)
    assert trt.sampling_config.top_p is None


def test_greedy_maps_to_top_k_1_without_temperature_and_no_end_id_to_minus_1() -> None:
    trt = build_request(
        tle, support.greedy_request("r", [1], 4), client_id=1, decode_retention_priority=35
    )
    assert (trt.sampling_config.top_k, trt.sampling_config.temperature) == (1, None)
    assert trt.end_id == -1 and trt.stop_words is None and trt.kv_cache_retention_config is None


def test_model_max_len_comes_from_engine_config(engine_dir: Path) -> None:
    executor = TrtllmExecutor(make_config(engine_dir))
    assert executor.model_max_len == read_engine_layout(engine_dir).max_seq_len


def test_engine_dir_is_required() -> None:
    with pytest.raises(ValueError, match="engine_dir"):
        TrtllmExecutor(TrtllmConfig())


# ---- generation ----------------------------------------------------------------------------------
def test_streaming_deltas_carry_only_new_tokens(engine_dir: Path) -> None:
    async def scenario() -> None:
        executor = await started(make_config(engine_dir))
        try:
            deltas = await support.collect(executor, support.greedy_request("a", PROMPT, 8))
            again = await support.collect(executor, support.greedy_request("b", PROMPT, 8))
        finally:
            await executor.shutdown()
        assert len(support.joined(deltas)) == 8
        assert all(d.finish_reason is None for d in deltas[:-1])
        assert deltas[-1].finish_reason is FinishReason.LENGTH
        assert deltas[0].num_prompt_tokens == len(PROMPT)
        assert support.joined(again) == support.joined(deltas)  # greedy is deterministic
        assert executor._engine.timeout_types == {datetime.timedelta}

    support.run(scenario())


def test_end_id_finishes_request_and_is_never_returned(engine_dir: Path) -> None:
    async def scenario() -> None:
        executor = await started(make_config(engine_dir))
        try:
            free = support.joined(
                await support.collect(executor, support.greedy_request("a", PROMPT, 12))
            )
            stop_at = first_unique_index(free)
            request = support.greedy_request("b", PROMPT, 12, end_id=free[stop_at])
            deltas = await support.collect(executor, request)
        finally:
            await executor.shutdown()
        assert support.joined(deltas) == free[:stop_at]
        assert deltas[-1].finish_reason is FinishReason.END_ID

    support.run(scenario())


def test_stop_sequence_is_never_streamed(engine_dir: Path) -> None:
    async def scenario() -> None:
        executor = await started(make_config(engine_dir))
        try:
            free = support.joined(
                await support.collect(executor, support.greedy_request("a", PROMPT, 12))
            )
            start = first_unique_index(free)
            stop = (free[start], free[start + 1])
            request = support.greedy_request("b", PROMPT, 12, stop_token_sequences=(stop,))
            deltas = await support.collect(executor, request)
        finally:
            await executor.shutdown()
        assert support.joined(deltas) == free[:start]
        assert deltas[-1].finish_reason is FinishReason.STOP

    support.run(scenario())


def test_seed_makes_sampling_reproducible_and_logprobs_align(engine_dir: Path) -> None:
    sampling = SamplingParams(temperature=0.8, top_p=0.95, seed=7)

    async def scenario() -> None:
        executor = await started(make_config(engine_dir))
        try:
            runs = [
                await support.collect(
                    executor,
                    GenerateRequest(f"s{i}", PROMPT, 10, sampling, return_logprobs=True),
                )
                for i in range(2)
            ]
        finally:
            await executor.shutdown()
        assert support.joined(runs[0]) == support.joined(runs[1])
        for delta in runs[0]:
            assert delta.logprobs is not None and len(delta.logprobs) == len(delta.token_ids)
            assert all(lp <= 0.0 for lp in delta.logprobs)

    support.run(scenario())


def test_cancelling_the_consumer_cancels_the_engine_request(engine_dir: Path) -> None:
    async def scenario() -> None:
        executor = await started(make_config(engine_dir))
        try:
            request = support.greedy_request("long", PROMPT, 200)
            stream = executor.generate(request)
            first = await anext(stream)
            assert first.token_ids
            await stream.aclose()  # what a disconnecting client does
            spy = executor._engine
            await support.eventually(lambda: spy.final_reasons)
            assert len(spy.cancelled_ids) == 1
            assert spy.final_reasons[spy.cancelled_ids[0]] == "CANCELLED"
            assert executor.stats().num_cancelled_requests == 1
            # the slot is free: a new request runs to completion
            deltas = await support.collect(executor, support.greedy_request("next", PROMPT, 4))
            assert deltas[-1].finish_reason is FinishReason.LENGTH
        finally:
            await executor.shutdown()

    support.run(scenario())


def test_engine_error_fails_only_that_request(engine_dir: Path) -> None:
    max_input_len = read_engine_layout(engine_dir).max_input_len

    async def scenario() -> None:
        executor = await started(make_config(engine_dir))
        try:
            good = asyncio.ensure_future(
                support.collect(executor, support.greedy_request("good", PROMPT, 16))
            )
            too_long = support.greedy_request("bad", [5] * (max_input_len + 1), 4)
            with pytest.raises(EngineError, match="input length") as raised:
                await support.collect(executor, too_long)
            assert not isinstance(raised.value, EngineDead)
            deltas = await good
            executor.check_health()
        finally:
            await executor.shutdown()
        assert deltas[-1].finish_reason is FinishReason.LENGTH

    support.run(scenario())


def test_full_engine_queue_rejects_with_overloaded(engine_dir: Path) -> None:
    async def scenario() -> None:
        executor = await started(make_config(engine_dir, max_batch_size=1, max_queue_size=1))
        try:
            running = executor.generate(support.greedy_request("running", PROMPT, 300))
            await anext(running)  # admitted: the batch of one is now full
            queued = asyncio.ensure_future(
                support.collect(executor, support.greedy_request("queued", PROMPT, 2))
            )
            await asyncio.sleep(0.05)
            with pytest.raises(OverloadedError, match="Maximum queue size"):
                await support.collect(executor, support.greedy_request("rejected", PROMPT, 2))
            await running.aclose()
            assert (await queued)[-1].finish_reason is FinishReason.LENGTH
        finally:
            await executor.shutdown()

    support.run(scenario())


def test_engine_death_fails_requests_and_health(tmp_path: Path) -> None:
    support.require_double("a poison token that crashes the engine")
    engine_dir = support.write_double_engine(tmp_path / "engine", poison_token_id=666)

    async def scenario() -> None:
        executor = await started(make_config(engine_dir))
        try:
            running = executor.generate(support.greedy_request("victim", PROMPT, 300))
            await anext(running)
            with pytest.raises(EngineDead, match="illegal memory access"):
                await support.collect(executor, support.greedy_request("poison", [666, 1], 4))
            assert executor.is_dead
            await running.aclose()
            with pytest.raises(EngineDead):
                executor.check_health()
            with pytest.raises(EngineDead):
                await support.collect(executor, support.greedy_request("after", PROMPT, 2))
        finally:
            await executor.shutdown()

    support.run(scenario())


# ---- stats and KV events -------------------------------------------------------------------------
def test_stats_thread_reports_kv_usage_and_reuse(engine_dir: Path) -> None:
    async def scenario() -> None:
        executor = await started(make_config(engine_dir))
        try:
            stream = executor.generate(support.greedy_request("busy", PROMPT * 4, 300))
            await anext(stream)
            await support.eventually(lambda: (executor.stats().kv_cache_usage or 0.0) > 0.0)
            await stream.aclose()
            await support.collect(executor, support.greedy_request("again", PROMPT * 4, 2))
            await support.eventually(lambda: (executor.stats().prefix_cache_hit_rate or 0.0) > 0)
            await support.eventually(lambda: executor.stats().kv_cache_usage == 0.0)
            assert executor.queue_depth() == 0
        finally:
            await executor.shutdown()

    support.run(scenario())


def test_kv_events_publish_stored_then_removed_block_hashes(engine_dir: Path) -> None:
    layout = read_engine_layout(engine_dir)
    tokens_per_block = layout.tokens_per_block
    prompt = [(7 * i + 3) % 500 + 1 for i in range(4 * tokens_per_block + 1)]
    expected = chain_block_hashes(prompt[:-1], tokens_per_block)
    assert len(expected) == 4
    config = make_config(engine_dir, max_kv_cache_tokens=24 * tokens_per_block)

    async def scenario() -> None:
        executor = await started(config)
        try:
            await support.collect(executor, support.greedy_request("p", prompt, 2))

            def hashes() -> set[int]:
                return set(executor.routing_stats()["kv_block_hashes"])

            await support.eventually(lambda: set(expected) <= hashes())
            stats = executor.routing_stats()
            assert stats["has_kv_events"] is True
            assert stats["tokens_per_block"] == tokens_per_block
            for i in range(12):  # distinct prompts push the first one out of a small cache
                other = [(13 * i + 5 * j) % 400 + 501 for j in range(len(prompt))]
                await support.collect(executor, support.greedy_request(f"o{i}", other, 2))
            await support.eventually(lambda: not set(expected) & hashes())
        finally:
            await executor.shutdown()

    support.run(scenario())


def test_retained_prompt_blocks_outlive_unpinned_ones(engine_dir: Path) -> None:
    tokens_per_block = read_engine_layout(engine_dir).tokens_per_block
    length = 4 * tokens_per_block + 1
    pinned = [(3 * i + 1) % 400 + 1 for i in range(length)]
    unpinned = [(5 * i + 2) % 400 + 1 for i in range(length)]
    config = make_config(engine_dir, max_kv_cache_tokens=24 * tokens_per_block)

    async def scenario() -> None:
        executor = await started(config)
        try:
            retained = support.greedy_request("pin", pinned, 2, retention=RetentionRange(0, length))
            await support.collect(executor, retained)
            await support.collect(executor, support.greedy_request("free", unpinned, 2))
            for i in range(12):
                other = [(13 * i + 5 * j) % 400 + 501 for j in range(length)]
                await support.collect(executor, support.greedy_request(f"o{i}", other, 2))

            def hashes() -> set[int]:
                return set(executor.routing_stats()["kv_block_hashes"])

            await support.eventually(
                lambda: not set(chain_block_hashes(unpinned[:-1], tokens_per_block)) & hashes()
            )
            assert set(chain_block_hashes(pinned[:-1], tokens_per_block)) <= hashes()
        finally:
            await executor.shutdown()

    support.run(scenario())


def test_no_kv_events_without_block_reuse(engine_dir: Path) -> None:
    async def scenario() -> None:
        executor = await started(make_config(engine_dir, enable_block_reuse=False))
        try:
            await support.collect(executor, support.greedy_request("p", PROMPT * 3, 2))
            await asyncio.sleep(0.05)
            stats = executor.routing_stats()
        finally:
            await executor.shutdown()
        assert stats["has_kv_events"] is False and stats["kv_block_hashes"] == []

    support.run(scenario())


def test_shutdown_with_requests_in_flight_leaves_executor_dead(engine_dir: Path) -> None:
    async def scenario() -> None:
        executor = await started(make_config(engine_dir))
        waiting = asyncio.ensure_future(
            support.collect(executor, support.greedy_request("long", PROMPT, 300))
        )
        await support.eventually(lambda: executor.stats().num_generated_tokens > 0)
        await executor.shutdown()
        with pytest.raises(EngineDead):
            await waiting
        with pytest.raises(EngineDead):
            executor.check_health()
        with pytest.raises(EngineDead):
            await support.collect(executor, support.greedy_request("after", PROMPT, 2))
        await executor.shutdown()  # idempotent

    support.run(scenario())


def test_replica_seeing_fewer_gpus_than_ranks_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine_dir = support.write_double_engine(tmp_path / "engine", tp_size=2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(ValueError, match="num_gpus_per_replica to 2"):
        TrtllmExecutor(make_config(engine_dir))
    with pytest.raises(ValueError, match="needs 2 devices"):
        TrtllmExecutor(make_config(engine_dir), device_ids=[0])


def test_sampling_the_bindings_reject_is_a_request_error(engine_dir: Path) -> None:
    bad = SamplingParams(temperature=0.7, repetition_penalty=-1.0)

    async def scenario() -> None:
        executor = await started(make_config(engine_dir))
        try:
            with pytest.raises(RequestError, match="invalid request"):
                await support.collect(executor, GenerateRequest("bad", PROMPT, 4, bad))
            executor.check_health()
        finally:
            await executor.shutdown()

    support.run(scenario())


# ---- 1.2 behaviours the double used to hide (each test fails on the code before issue #19) --------
def test_streamed_logprobs_are_those_of_each_new_token(engine_dir: Path) -> None:
    """The 1.2 Executor streams token ids as deltas but `log_probs` as the whole vector so far
    (cpp/tensorrt_llm/batch_manager/llmRequest.cpp `createResult`; TensorRT-LLM's own
    tensorrt_llm/executor/result.py slices `log_probs[src_idx][output._last_logprobs_len:]`).
    Checked against the double's model, which knows every token's log probability."""
    support.require_double("the expected log probabilities come from the double's model")
    from tensorrt_llm.bindings.executor._engine import next_token

    vocab_size = 1000  # write_double_engine's default

    async def scenario() -> list[Any]:
        executor = await started(make_config(engine_dir))
        try:
            request = support.greedy_request("lp", PROMPT, 16, return_logprobs=True)
            return await support.collect(executor, request)
        finally:
            await executor.shutdown()

    deltas = support.run(scenario())
    # Several chunks (how many depends on timing): the bug showed from the second one on.
    assert len(deltas) >= 2
    tokens = support.joined(deltas)
    logprobs = [lp for delta in deltas for lp in delta.logprobs or []]
    expected = [
        next_token(PROMPT + tokens[:i], vocab_size=vocab_size)[1] for i in range(len(tokens))
    ]
    assert logprobs == pytest.approx(expected)


def test_failed_forward_step_ends_the_replica_though_the_engine_loop_goes_on(
    tmp_path: Path,
) -> None:
    """A throwing forward step answers every active request with an error `Response` and the
    executor loop continues (executorImpl.cpp @ b35ac1b6, `forwardAsync`'s catch), so
    `await_responses` never raises. A CUDA error is sticky, so the executor must end itself."""
    support.require_double("a poison token that makes a forward step fail")
    engine_dir = support.write_double_engine(tmp_path / "engine", poison_token_id=666)

    async def scenario() -> None:
        executor = await started(make_config(engine_dir))
        try:
            running = executor.generate(support.greedy_request("victim", PROMPT, 300))
            await anext(running)
            with pytest.raises(EngineDead, match="illegal memory access"):
                await support.collect(executor, support.greedy_request("poison", [666, 1], 4))
            with pytest.raises(EngineDead):
                async for _ in running:  # what it streamed before the failed step, then the error
                    pass
            assert executor.is_dead
            with pytest.raises(EngineDead):
                executor.check_health()
        finally:
            await executor.shutdown()

    support.run(scenario())


def test_an_ordinary_request_error_leaves_the_replica_healthy(engine_dir: Path) -> None:
    max_input_len = read_engine_layout(engine_dir).max_input_len

    async def scenario() -> None:
        executor = await started(make_config(engine_dir))
        try:
            with pytest.raises(EngineError) as raised:
                await support.collect(
                    executor, support.greedy_request("long", [5] * (max_input_len + 1), 2)
                )
            assert not isinstance(raised.value, EngineDead)
            executor.check_health()
            deltas = await support.collect(executor, support.greedy_request("ok", PROMPT, 2))
            assert deltas[-1].finish_reason is FinishReason.LENGTH
        finally:
            await executor.shutdown()

    support.run(scenario())


def test_a_cancelled_queued_request_keeps_its_queue_slot_until_a_step_runs(
    tmp_path: Path,
) -> None:
    """Leader mode: `cancel_request` only marks the id; the queued request leaves the queue when
    the executor loop next fetches requests (executorImpl.cpp @ b35ac1b6). A retry sent at once
    may therefore still find the queue full (a 503 with Retry-After), and is admitted after."""
    support.require_double("steps slow enough to observe the queue between them")
    # The double fetches queued requests at the start of each step and paces steps `iter_latency_ms` apart,
    # so a token of "running" marks a step just done: the next fetch is a whole iteration away. The test
    # acts right after such a token, never on a timer, so a busy machine cannot move a step into its way.
    engine_dir = support.write_double_engine(tmp_path / "engine", iter_latency_ms=400.0)

    async def scenario() -> None:
        executor = await started(make_config(engine_dir, max_batch_size=1, max_queue_size=1))
        try:
            running = executor.generate(support.greedy_request("running", PROMPT, 300))
            await anext(running)
            queued = executor.generate(support.greedy_request("queued", PROMPT, 2))
            pending = asyncio.ensure_future(anext(queued))
            await anext(running)  # a step ran since: "queued" waits in the engine's queue
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
            await queued.aclose()  # cancels it in the engine
            with pytest.raises(OverloadedError):
                await support.collect(executor, support.greedy_request("at-once", PROMPT, 2))
            await anext(running)  # the step after the cancel dropped "queued"
            retry = asyncio.ensure_future(
                support.collect(executor, support.greedy_request("retry", PROMPT, 2))
            )
            await anext(running)  # "retry" was admitted and waits for the batch slot
            await running.aclose()
            assert (await retry)[-1].finish_reason is FinishReason.LENGTH
        finally:
            await executor.shutdown()

    support.run(scenario())
