"""The emulator engine meets the Executor contract: lengths, finish reasons, ids, queueing, cancellation."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from deployments.config import EmulatorConfig, EngineConfig
from deployments.engine import create_executor
from deployments.errors import EngineDead
from deployments.executors.emulator import (
    PUBLISHED_PREFILL_TOKENS_PER_S,
    EmulatorExecutor,
    read_vocab_size,
    visible_token_ids,
)
from deployments.messages import FinishReason, GenerateRequest, TokenDelta

# Zero latencies keep the tests fast; none of them asserts on time.
FAST = EmulatorConfig(ttft_ms=0, itl_ms=0, max_batch_size=256)
# Tokens 20 ms apart: a reader late by less than that (a busy CI machine) sees them one delta at a time.
STEPPING = EmulatorConfig(ttft_ms=1, itl_ms=20, max_batch_size=256)
T = TypeVar("T")


def request(
    request_id: str, max_tokens: int = 8, prompt: list[int] | None = None, **kwargs: Any
) -> GenerateRequest:
    return GenerateRequest(
        request_id=request_id,
        prompt_token_ids=prompt or [10, 11, 12],
        max_tokens=max_tokens,
        **kwargs,
    )


async def collect(stream: AsyncIterator[TokenDelta]) -> list[TokenDelta]:
    return [delta async for delta in stream]


def run(
    model_dir: Path, config: EmulatorConfig, body: Callable[[EmulatorExecutor], Awaitable[T]]
) -> T:
    async def main() -> T:
        executor = EmulatorExecutor(config, str(model_dir))
        await executor.start()
        try:
            return await body(executor)
        finally:
            await executor.shutdown()

    return asyncio.run(asyncio.wait_for(main(), timeout=30))


def token_ids_of(deltas: list[TokenDelta]) -> list[int]:
    return [token_id for delta in deltas for token_id in delta.token_ids]


@pytest.mark.parametrize("config", [FAST, STEPPING], ids=["one-step", "stepping"])
def test_emits_exactly_max_tokens_then_finishes_with_length(
    model_dir: Path, config: EmulatorConfig
) -> None:
    deltas = run(
        model_dir, config, lambda executor: collect(executor.generate(request("r", max_tokens=17)))
    )

    assert len(token_ids_of(deltas)) == 17
    assert deltas[-1].finish_reason is FinishReason.LENGTH
    assert all(delta.finish_reason is None for delta in deltas[:-1])
    assert deltas[0].num_prompt_tokens == 3


def test_stepping_engine_streams_tokens_in_several_deltas(model_dir: Path) -> None:
    deltas = run(
        model_dir, STEPPING, lambda executor: collect(executor.generate(request("r", max_tokens=5)))
    )

    assert len(deltas) > 1
    assert len(token_ids_of(deltas)) == 5


def test_token_ids_decode_to_visible_words_of_the_vocabulary(
    model_dir: Path, tokenizer: Any
) -> None:
    deltas = run(
        model_dir, FAST, lambda executor: collect(executor.generate(request("r", max_tokens=64)))
    )
    token_ids = token_ids_of(deltas)

    assert all(0 <= token_id < read_vocab_size(model_dir) for token_id in token_ids)
    text = tokenizer.decode(token_ids, skip_special_tokens=False)
    assert len(text.split()) == 64
    assert text.isprintable() and text.strip()


def test_same_prompt_gives_the_same_tokens_and_other_prompts_differ(model_dir: Path) -> None:
    async def body(executor: EmulatorExecutor) -> list[list[int]]:
        prompts = [[1, 2, 3], [1, 2, 3], [7, 8, 9, 10]]
        results = await asyncio.gather(
            *(collect(executor.generate(request(f"r{i}", prompt=p))) for i, p in enumerate(prompts))
        )
        return [token_ids_of(deltas) for deltas in results]

    first, again, other = run(model_dir, FAST, body)
    assert first == again
    assert first != other


def test_never_emits_the_end_id_or_the_start_of_a_stop_sequence(model_dir: Path) -> None:
    async def body(executor: EmulatorExecutor) -> tuple[list[int], list[int]]:
        end_id, stop_start = executor.token_ids[0], executor.token_ids[1]
        req = request(
            "r",
            max_tokens=4 * len(executor.token_ids),
            end_id=end_id,
            stop_token_sequences=((stop_start, 5),),
        )
        return token_ids_of(await collect(executor.generate(req))), [end_id, stop_start]

    token_ids, excluded = run(model_dir, FAST, body)
    assert not set(excluded) & set(token_ids)


def test_requests_beyond_max_batch_wait_in_a_fifo_queue(model_dir: Path) -> None:
    config = EmulatorConfig(ttft_ms=1, itl_ms=1, max_batch_size=2)
    first_seen: list[str] = []

    async def consume(executor: EmulatorExecutor, request_id: str) -> int:
        num_tokens = 0
        async for delta in executor.generate(request(request_id, max_tokens=3)):
            if num_tokens == 0:
                first_seen.append(request_id)
            num_tokens += len(delta.token_ids)
        return num_tokens

    async def body(executor: EmulatorExecutor) -> tuple[int, int, list[int]]:
        tasks = [asyncio.create_task(consume(executor, f"r{i}")) for i in range(5)]
        for _ in range(5):
            await asyncio.sleep(0)
        queued, active = executor.stats().num_queued_requests, executor.stats().num_active_requests
        return queued, active, list(await asyncio.gather(*tasks))

    queued, active, lengths = run(model_dir, config, body)
    assert (queued, active) == (3, 5)
    assert lengths == [3] * 5
    assert first_seen[:2] == ["r0", "r1"]
    assert first_seen[2:4] == ["r2", "r3"]
    assert first_seen[4] == "r4"


def test_cancelling_a_running_request_frees_its_batch_slot(model_dir: Path) -> None:
    config = EmulatorConfig(ttft_ms=1, itl_ms=1, max_batch_size=1)

    async def body(executor: EmulatorExecutor) -> tuple[list[int], int, int]:
        endless = executor.generate(request("endless", max_tokens=10**9))
        await endless.__anext__()
        waiting = asyncio.create_task(collect(executor.generate(request("waiting", max_tokens=4))))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        await endless.aclose()
        deltas = await waiting
        stats = executor.stats()
        return token_ids_of(deltas), stats.num_active_requests, stats.num_cancelled_requests

    token_ids, num_active, num_cancelled = run(model_dir, config, body)
    assert len(token_ids) == 4
    assert (num_active, num_cancelled) == (0, 1)


def test_cancelling_a_queued_request_removes_it_from_the_queue(model_dir: Path) -> None:
    config = EmulatorConfig(ttft_ms=1, itl_ms=1, max_batch_size=1)

    async def body(executor: EmulatorExecutor) -> tuple[int, int]:
        running = asyncio.create_task(collect(executor.generate(request("running", max_tokens=50))))
        queued = asyncio.create_task(collect(executor.generate(request("queued", max_tokens=50))))
        for _ in range(5):
            await asyncio.sleep(0)
        depth_before = executor.queue_depth()
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        depth_after = executor.queue_depth()
        await running
        return depth_before, depth_after

    assert run(model_dir, config, body) == (1, 0)


def test_shutdown_fails_pending_requests_with_engine_dead(model_dir: Path) -> None:
    async def main() -> None:
        executor = EmulatorExecutor(EmulatorConfig(ttft_ms=10_000), str(model_dir))
        await executor.start()
        pending = asyncio.create_task(collect(executor.generate(request("r"))))
        await asyncio.sleep(0)
        await executor.shutdown()
        with pytest.raises(EngineDead):
            await pending
        with pytest.raises(EngineDead):
            executor.check_health()

    asyncio.run(asyncio.wait_for(main(), timeout=30))


def test_engine_kind_emulator_selects_the_emulator(model_dir: Path) -> None:
    executor = create_executor(EngineConfig(kind="emulator"), str(model_dir))
    assert isinstance(executor, EmulatorExecutor)
    assert EngineConfig().kind != "emulator"


def test_vocab_size_of_an_engine_directory_without_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"pretrained_config": {"vocab_size": 32000}}))

    assert read_vocab_size(tmp_path) == 32000
    token_ids = visible_token_ids(tmp_path, 32000)
    assert token_ids and all(16000 <= token_id < 32000 for token_id in token_ids)


def test_a_stream_interval_groups_tokens_after_the_first(model_dir: Path) -> None:
    async def body(executor: EmulatorExecutor) -> tuple[list[TokenDelta], list[TokenDelta]]:
        plain = await collect(executor.generate(request("plain", max_tokens=11)))
        grouped = await collect(
            executor.generate(request("grouped", max_tokens=11), stream_interval_tokens=4)
        )
        return plain, grouped

    plain, grouped = run(model_dir, STEPPING, body)
    assert token_ids_of(grouped) == token_ids_of(plain) and len(token_ids_of(plain)) == 11
    # A late step emits several tokens at once, so sizes are bounds, not exact (no test asserts on time).
    sizes = [len(delta.token_ids) for delta in grouped]
    assert sizes[0] < 4  # the first token is not held for the interval: TTFT does not change
    assert all(size >= 4 for size in sizes[1:-1]) and len(sizes) <= 4
    assert grouped[-1].finish_reason is FinishReason.LENGTH


def test_a_repeated_prefix_reports_its_cached_tokens_and_the_stats_count_them(
    model_dir: Path,
) -> None:
    config = EmulatorConfig(ttft_ms=0, itl_ms=0, num_kv_blocks=64, tokens_per_block=4)
    history = list(range(100, 118))  # 18 tokens: 4 full blocks of 4 before the last token

    async def body(executor: EmulatorExecutor) -> tuple[list[TokenDelta], list[TokenDelta], Any]:
        first = await collect(executor.generate(request("first", max_tokens=3, prompt=history)))
        # The next turn continues from the first turn's prompt and output, as a session does.
        turn = history + token_ids_of(first) + [7, 8, 9, 10, 11]
        second = await collect(executor.generate(request("second", max_tokens=3, prompt=turn)))
        return first, second, executor.stats()

    first, second, stats = run(model_dir, config, body)
    assert first[0].num_cached_tokens == 0
    assert first[0].num_prompt_tokens == 18 and second[0].num_prompt_tokens == 26
    # 18 prompt + 3 output tokens without the last: 5 full blocks were kept for reuse.
    assert second[0].num_cached_tokens == 20
    assert all(delta.num_cached_tokens == 0 for delta in second[1:])
    assert (stats.num_cached_prompt_tokens, stats.num_uncached_prompt_tokens) == (20, 24)
    assert stats.prefix_cache_hit_rate == pytest.approx(20 / 44)
    assert stats.kv_cache_usage == pytest.approx(7 / 64)  # the second turn kept 28 of its 29 tokens


def test_without_a_prefix_cache_nothing_is_cached_and_the_stats_say_nothing(
    model_dir: Path,
) -> None:
    config = EmulatorConfig(ttft_ms=0, itl_ms=0, num_kv_blocks=0)

    async def body(executor: EmulatorExecutor) -> tuple[list[TokenDelta], Any]:
        prompt = list(range(100, 200))
        await collect(executor.generate(request("first", prompt=prompt)))
        return await collect(executor.generate(request("again", prompt=prompt))), executor.stats()

    deltas, stats = run(model_dir, config, body)
    assert deltas[0].num_cached_tokens == 0
    assert stats.prefix_cache_hit_rate is None and stats.num_cached_prompt_tokens is None


def test_prefill_time_counts_only_the_prompt_tokens_the_cache_lacks(model_dir: Path) -> None:
    executor = EmulatorExecutor(
        EmulatorConfig(ttft_ms=5, prefill_tokens_per_s=1000), str(model_dir)
    )

    assert executor.prefill_s(0) == pytest.approx(0.005)
    assert executor.prefill_s(250) == pytest.approx(0.255)
    unpriced = EmulatorExecutor(EmulatorConfig(ttft_ms=5), str(model_dir))
    assert unpriced.prefill_s(10_000) == pytest.approx(0.005)


def test_published_prefill_speed_is_the_h100_7b_first_token_latency_slope() -> None:
    # 7 ms at 128 input tokens and 36 ms at 2048 in TensorRT-LLM's published H100 FP8 table.
    assert PUBLISHED_PREFILL_TOKENS_PER_S == pytest.approx(66_207, rel=1e-3)
    assert 0.007 + (2048 - 128) / PUBLISHED_PREFILL_TOKENS_PER_S == pytest.approx(0.036)


def test_a_shutdown_that_was_asked_for_is_logged_below_error(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        executor = EmulatorExecutor(EmulatorConfig(ttft_ms=1, itl_ms=1), str(model_dir))
        await executor.start()
        await executor.shutdown()

    with caplog.at_level(logging.INFO, logger="deployments.executors.base"):
        asyncio.run(main())
    deaths = [r for r in caplog.records if "executor is dead" in r.getMessage()]
    assert [r.levelno for r in deaths] == [logging.INFO]
