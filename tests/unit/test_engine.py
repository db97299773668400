"""The Engine deployment's stream interval: fewer, larger items, the same tokens, nothing held back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from deployments.engine import at_stream_interval
from deployments.errors import EngineError
from deployments.messages import TokenDelta


async def _deltas(
    sizes: list[int], finish: str | None = "length", *, fail: bool = False
) -> AsyncGenerator[TokenDelta, None]:
    next_id = 0
    for index, size in enumerate(sizes):
        ids = list(range(next_id, next_id + size))
        next_id += size
        last = index == len(sizes) - 1
        yield TokenDelta(
            token_ids=ids,
            finish_reason=finish if last else None,
            logprobs=[-0.5] * size,
            num_prompt_tokens=7 if index == 0 else 0,
        )
    if fail:
        raise EngineError("the engine failed this request")


def _collect(sizes: list[int], num_tokens: int, finish: str | None = "length") -> list[TokenDelta]:
    async def run() -> list[TokenDelta]:
        return [item async for item in at_stream_interval(_deltas(sizes, finish), num_tokens)]

    return asyncio.run(run())


@pytest.mark.parametrize("num_tokens", [1, 2, 4, 8, 100])
def test_same_tokens_in_order_first_alone_last_flushed(num_tokens: int) -> None:
    items = _collect([1] * 17, num_tokens)
    assert [t for item in items for t in item.token_ids] == list(range(17))
    assert [lp for item in items for lp in item.logprobs or []] == [-0.5] * 17
    assert items[0].token_ids == [0]  # the first token is never held: TTFT does not change
    assert items[0].num_prompt_tokens == 7
    assert items[-1].finish_reason == "length"
    assert all(item.finish_reason is None for item in items[:-1])
    # Every item but the first and the last carries exactly `num_tokens` tokens (single-token deltas).
    assert all(len(item.token_ids) == num_tokens for item in items[1:-1])
    assert len(items) == 1 + -(-16 // num_tokens)


def test_larger_deltas_are_not_split() -> None:
    items = _collect([3, 5, 1, 1, 6], num_tokens=4)
    assert [len(item.token_ids) for item in items] == [3, 5, 8]


def test_a_stream_that_ends_without_a_final_delta_still_flushes() -> None:
    items = _collect([1, 1, 1], num_tokens=8, finish=None)
    assert [t for item in items for t in item.token_ids] == [0, 1, 2]


def test_held_tokens_go_out_before_the_error() -> None:
    async def run() -> tuple[list[int], BaseException | None]:
        seen: list[int] = []
        try:
            async for item in at_stream_interval(_deltas([1, 1, 1], None, fail=True), 8):
                seen.extend(item.token_ids)
        except EngineError as error:
            return seen, error
        return seen, None

    seen, error = asyncio.run(run())
    assert seen == [0, 1, 2] and isinstance(error, EngineError)


def test_closing_the_stream_closes_the_executors_generator() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncGenerator[TokenDelta, None]:
        try:
            while True:
                yield TokenDelta(token_ids=[1])
                await asyncio.sleep(0)
        finally:
            closed.set()  # the executor cancels the engine request here

    async def run() -> None:
        items = at_stream_interval(endless(), 4)
        await anext(items)
        await anext(items)
        await items.aclose()  # what Serve does when the client goes away
        # At once, not when the loop later finalizes an abandoned generator.
        assert closed.is_set()

    asyncio.run(run())
