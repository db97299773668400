"""One executor contract, three TensorRT-LLM variants: the 1.2 C++ Executor with TP=1 (in-process),
the 1.2 Executor with TP=2 (orchestrator mode, ranks spawned over MPI), and the PyTorch backend
through the LLM API (`tensorrt_llm.LLM`).

On the doubles (tests/trtllm_double: bindings as of TensorRT-LLM 1.2.x nanobind/executor/*.cpp and
executorImpl.cpp @ b35ac1b6; the LLM API as of tensorrt_llm/llmapi/llm.py, sampling_params.py
@ a98a9061 and executor/result.py of the 1.1/1.2 line), or unchanged against a real install:
SHEPHERD_TRTLLM_ENGINE_DIR, SHEPHERD_TRTLLM_ENGINE_DIR_TP2, SHEPHERD_TRTLLM_HF_CHECKPOINT.
Expected tokens are never hard-coded: a free greedy run shows what the model generates first.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from deployments.errors import EngineDead, ServingError
from deployments.executors.trtllm_kv_events import chain_block_hashes
from deployments.messages import FinishReason, GenerateRequest, RetentionRange, SamplingParams
from tests import trtllm_support as support

# Its TP=2 variant spawns MPI ranks (marked `mpi` at run time): with the other MPI modules on one worker.
pytestmark = pytest.mark.xdist_group("mpi")

PROMPT = [11, 12, 13, 14, 15, 16, 17, 18, 19]


@pytest.fixture(params=support.VARIANTS)
def variant(request: pytest.FixtureRequest) -> str:
    if request.param == "executor-tp2":
        request.applymarker(pytest.mark.mpi)
    return str(request.param)


def first_unique_index(tokens: list[int], start: int = 1) -> int:
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


async def started(executor: Any) -> Any:
    await executor.start()
    return executor


def test_streams_only_new_tokens_and_repeats_greedy_runs(
    variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    executor, _ = support.make_variant_executor(variant, tmp_path, monkeypatch)

    async def scenario() -> None:
        await started(executor)
        try:
            deltas = await support.collect(executor, support.greedy_request("a", PROMPT, 8))
            again = await support.collect(executor, support.greedy_request("b", PROMPT, 8))
        finally:
            await executor.shutdown()
        assert len(support.joined(deltas)) == 8
        assert all(d.finish_reason is None for d in deltas[:-1])
        assert deltas[-1].finish_reason is FinishReason.LENGTH
        assert deltas[0].num_prompt_tokens == len(PROMPT)
        assert support.joined(again) == support.joined(deltas)

    support.run(scenario())


def test_end_id_and_stop_sequences_end_the_stream_unseen(
    variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    executor, _ = support.make_variant_executor(variant, tmp_path, monkeypatch)

    async def scenario() -> None:
        await started(executor)
        try:
            free = support.joined(
                await support.collect(executor, support.greedy_request("free", PROMPT, 12))
            )
            at = first_unique_index(free)
            by_end_id = await support.collect(
                executor, support.greedy_request("end", PROMPT, 12, end_id=free[at])
            )
            by_one_token = await support.collect(
                executor,
                support.greedy_request("one", PROMPT, 12, stop_token_sequences=((free[at],),)),
            )
            pair = (free[at], free[at + 1])
            by_pair = await support.collect(
                executor, support.greedy_request("pair", PROMPT, 12, stop_token_sequences=(pair,))
            )
        finally:
            await executor.shutdown()
        assert support.joined(by_end_id) == free[:at]
        assert by_end_id[-1].finish_reason is FinishReason.END_ID
        for deltas in (by_one_token, by_pair):
            assert support.joined(deltas) == free[:at]
            assert deltas[-1].finish_reason is FinishReason.STOP

    support.run(scenario())


def test_logprobs_belong_to_each_streamed_token(
    variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    support.require_double("the expected log probabilities come from the double's model")
    from tensorrt_llm.bindings.executor._engine import next_token

    executor, _ = support.make_variant_executor(variant, tmp_path, monkeypatch)
    sampling = SamplingParams(temperature=0.8, top_p=0.95, seed=7)

    async def scenario() -> list[Any]:
        await started(executor)
        try:
            greedy = support.greedy_request("g", PROMPT, 6, return_logprobs=True)
            seeded = [
                await support.collect(
                    executor, GenerateRequest(f"s{i}", PROMPT, 6, sampling, return_logprobs=True)
                )
                for i in range(2)
            ]
            assert support.joined(seeded[0]) == support.joined(seeded[1])
            return await support.collect(executor, greedy)
        finally:
            await executor.shutdown()

    deltas = support.run(scenario())
    tokens = support.joined(deltas)
    logprobs = [lp for d in deltas for lp in d.logprobs or []]
    expected = [next_token(PROMPT + tokens[:i], vocab_size=1000)[1] for i in range(len(tokens))]
    assert logprobs == pytest.approx(expected)


def test_a_disconnect_cancels_the_engine_request_and_frees_its_slot(
    variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    executor, _ = support.make_variant_executor(variant, tmp_path, monkeypatch, max_batch_size=1)

    async def scenario() -> None:
        await started(executor)
        try:
            stream = executor.generate(support.greedy_request("long", PROMPT, 400))
            assert (await anext(stream)).token_ids
            await stream.aclose()
            assert executor.stats().num_cancelled_requests == 1
            deltas = await support.collect(executor, support.greedy_request("next", PROMPT, 4))
            assert deltas[-1].finish_reason is FinishReason.LENGTH
        finally:
            await executor.shutdown()

    support.run(scenario())


def test_a_bad_request_fails_alone_and_a_pinned_prompt_is_accepted(
    variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    executor, _ = support.make_variant_executor(
        variant, tmp_path, monkeypatch, engine_options={"max_input_len": 256}, max_num_tokens=256
    )

    async def scenario() -> None:
        await started(executor)
        try:
            good = asyncio.ensure_future(
                support.collect(executor, support.greedy_request("good", PROMPT, 16))
            )
            with pytest.raises(ServingError) as raised:
                await support.collect(executor, support.greedy_request("bad", [5] * 600, 4))
            assert not isinstance(raised.value, EngineDead)
            assert (await good)[-1].finish_reason is FinishReason.LENGTH
            pinned = support.greedy_request("pin", PROMPT, 4, retention=RetentionRange(0, 8))
            assert (await support.collect(executor, pinned))[-1].finish_reason
            executor.check_health()
        finally:
            await executor.shutdown()

    support.run(scenario())


def test_a_failed_forward_step_ends_the_replica(
    variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    support.require_double("a poison token that makes a forward step fail")
    executor, _ = support.make_variant_executor(
        variant, tmp_path, monkeypatch, engine_options={"poison_token_id": 666}
    )

    async def scenario() -> None:
        await started(executor)
        try:
            with pytest.raises(EngineDead, match="illegal memory access"):
                await support.collect(executor, support.greedy_request("poison", [666, 1], 4))
            with pytest.raises(EngineDead):
                executor.check_health()
        finally:
            await executor.shutdown()

    support.run(scenario())


def test_the_blocks_an_engine_holds_are_published_until_evicted(
    variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stored/removed KV events become the router's chained block hashes of the prompt's tokens
    (`routing.py` `prompt_block_hashes`: full blocks of prompt[:-1]); a prefix the engine evicted
    is no longer published. The 1.2 orchestrator has no event manager in its process."""
    executor, tokens_per_block = support.make_variant_executor(
        variant, tmp_path, monkeypatch, max_kv_cache_tokens=24 * 4, engine_options={}
    )
    prompt = [(7 * i + 3) % 500 + 1 for i in range(4 * tokens_per_block + 1)]
    expected = set(chain_block_hashes(prompt[:-1], tokens_per_block))

    async def scenario() -> None:
        await started(executor)
        try:
            await support.collect(executor, support.greedy_request("p", prompt, 2))
            if variant == "executor-tp2":
                await asyncio.sleep(0.1)
                assert executor.routing_stats()["has_kv_events"] is False
                assert executor.routing_stats()["kv_block_hashes"] == []
                return

            def held() -> set[int]:
                return set(executor.routing_stats()["kv_block_hashes"])

            await support.eventually(lambda: expected <= held())
            assert executor.routing_stats()["tokens_per_block"] == tokens_per_block
            for i in range(12):
                other = [(13 * i + 5 * j) % 400 + 501 for j in range(len(prompt))]
                await support.collect(executor, support.greedy_request(f"o{i}", other, 2))
            await support.eventually(lambda: not expected & held())
        finally:
            await executor.shutdown()

    support.run(scenario())


def test_a_repeated_prompt_reports_its_reused_blocks_as_cached_tokens(
    variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 1.2 Executor's per-request perf metrics (`kv_cache_metrics.num_reused_blocks`) or the
    PyTorch backend's `RequestOutput.cached_tokens` reach the first delta and the stats."""
    executor, tokens_per_block = support.make_variant_executor(variant, tmp_path, monkeypatch)
    prompt = [(5 * i + 2) % 300 + 1 for i in range(3 * tokens_per_block + 2)]

    async def scenario() -> tuple[Any, Any, Any]:
        await started(executor)
        try:
            first = await support.collect(executor, support.greedy_request("a", prompt, 3))
            second = await support.collect(executor, support.greedy_request("b", prompt, 3))
            return first[0], second[0], executor.stats()
        finally:
            await executor.shutdown()

    first, second, stats = support.run(scenario())
    assert first.num_cached_tokens == 0
    # Whole blocks of prompt[:-1]: the last prompt token is always computed.
    assert second.num_cached_tokens == (len(prompt) - 1) // tokens_per_block * tokens_per_block
    assert stats.num_cached_prompt_tokens == second.num_cached_tokens
    assert stats.num_uncached_prompt_tokens == 2 * len(prompt) - second.num_cached_tokens
