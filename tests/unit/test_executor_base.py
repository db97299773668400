import asyncio
from typing import Any

import pytest

from deployments.executors.base import StopSequenceMatcher


def test_single_token_stop_is_dropped() -> None:
    matcher = StopSequenceMatcher([(9,)])
    assert matcher.feed([1, 2, 9, 3]) == ([1, 2], True)


def test_multi_token_stop_split_across_feeds_never_leaks() -> None:
    matcher = StopSequenceMatcher([(7, 8, 9)])
    assert matcher.feed([1, 7]) == ([1], False)
    assert matcher.feed([8]) == ([], False)
    assert matcher.feed([9, 4]) == ([], True)


def test_partial_match_is_released_when_it_breaks() -> None:
    matcher = StopSequenceMatcher([(7, 8, 9)])
    assert matcher.feed([7, 8]) == ([], False)
    assert matcher.feed([5]) == ([7, 8, 5], False)


def test_flush_releases_held_tokens_at_the_end() -> None:
    matcher = StopSequenceMatcher([(7, 8)])
    assert matcher.feed([3, 7]) == ([3], False)
    assert matcher.flush() == [7]


def test_no_sequences_passes_everything_through() -> None:
    assert StopSequenceMatcher([]).feed([1, 2, 3]) == ([1, 2, 3], False)


def test_collector_returns_a_pending_delta_then_the_error() -> None:
    from deployments.errors import EngineDead
    from deployments.messages import DeltaCollector, TokenDelta

    async def main() -> None:
        collector = DeltaCollector()
        collector.put(TokenDelta(token_ids=[1]))
        collector.put(TokenDelta(token_ids=[2]))
        collector.fail(EngineDead("gone"))
        assert (await collector.get()).token_ids == [1, 2]
        with pytest.raises(EngineDead):
            await asyncio.wait_for(collector.get(), timeout=1)

    asyncio.run(main())


# ---- the stream interval: fewer, larger items, the same tokens, nothing held back ----------------------
def _interval_items(sizes: list[int], num_tokens: int) -> list[Any]:
    """Deltas of `sizes` tokens (the last one final) put one at a time, a consumer that keeps up."""
    from deployments.messages import DeltaCollector, FinishReason, TokenDelta

    async def main() -> list[Any]:
        collector = DeltaCollector(num_tokens)
        items: list[Any] = []

        async def consume() -> None:
            while not (items and items[-1].is_final):
                items.append(await collector.get())

        consumer = asyncio.create_task(consume())
        next_id = 0
        for index, size in enumerate(sizes):
            is_last = index == len(sizes) - 1
            collector.put(
                TokenDelta(
                    token_ids=list(range(next_id, next_id + size)),
                    finish_reason=FinishReason.LENGTH if is_last else None,
                    logprobs=[-0.5] * size,
                    num_prompt_tokens=7 if index == 0 else 0,
                )
            )
            next_id += size
            for _ in range(3):
                await asyncio.sleep(0)  # the consumer takes whatever is released
        await asyncio.wait_for(consumer, timeout=1)
        return items

    return asyncio.run(main())


@pytest.mark.parametrize("num_tokens", [1, 2, 4, 8, 100])
def test_interval_items_keep_every_token_first_alone_last_flushed(num_tokens: int) -> None:
    items = _interval_items([1] * 17, num_tokens)
    assert [t for item in items for t in item.token_ids] == list(range(17))
    assert [lp for item in items for lp in item.logprobs or []] == [-0.5] * 17
    assert items[0].token_ids == [0]  # the first token is never held: TTFT does not change
    assert items[0].num_prompt_tokens == 7
    assert items[-1].finish_reason == "length"
    assert all(item.finish_reason is None for item in items[:-1])
    # Every item but the first and the last carries exactly `num_tokens` tokens (single-token deltas).
    assert all(len(item.token_ids) == num_tokens for item in items[1:-1])
    assert len(items) == 1 + -(-16 // num_tokens)


def test_interval_does_not_split_larger_deltas() -> None:
    items = _interval_items([3, 5, 1, 1, 6], num_tokens=4)
    assert [len(item.token_ids) for item in items] == [3, 5, 8]


def test_held_tokens_go_out_before_the_error() -> None:
    from deployments.errors import EngineError
    from deployments.messages import DeltaCollector, TokenDelta

    async def main() -> None:
        collector = DeltaCollector(8)
        collector.put(TokenDelta(token_ids=[0]))
        assert (await collector.get()).token_ids == [0]
        collector.put(TokenDelta(token_ids=[1]))
        collector.put(TokenDelta(token_ids=[2]))
        waiting = asyncio.create_task(collector.get())
        await asyncio.sleep(0)
        assert not waiting.done()  # 2 of 8 tokens: held
        collector.fail(EngineError("the engine failed this request"))
        assert (await asyncio.wait_for(waiting, timeout=1)).token_ids == [1, 2]
        with pytest.raises(EngineError):
            await asyncio.wait_for(collector.get(), timeout=1)

    asyncio.run(main())
