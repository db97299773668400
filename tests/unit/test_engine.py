"""The Engine deployment's stream interval: fewer, larger items, the same tokens, nothing held back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from deployments.engine import at_stream_interval
from deployments.messages import TokenDelta


async def _deltas(sizes: list[int], finish: str | None = "length") -> AsyncIterator[TokenDelta]:
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


def _collect(sizes: list[int], tokens: int, finish: str | None = "length") -> list[TokenDelta]:
    async def run() -> list[TokenDelta]:
        return [item async for item in at_stream_interval(_deltas(sizes, finish), tokens)]

    return asyncio.run(run())


@pytest.mark.parametrize("tokens", [1, 2, 4, 8, 100])
def test_same_tokens_in_order_first_alone_last_flushed(tokens: int) -> None:
    sizes = [1] * 17
    items = _collect(sizes, tokens)
    assert [t for item in items for t in item.token_ids] == list(range(17))
    assert [lp for item in items for lp in item.logprobs or []] == [-0.5] * 17
    assert items[0].token_ids == [0]  # the first token is never held: TTFT does not change
    assert items[0].num_prompt_tokens == 7
    assert items[-1].finish_reason == "length"
    assert all(item.finish_reason is None for item in items[:-1])
    # Every item but the first and the last carries exactly `tokens` tokens (single-token deltas).
    assert all(len(item.token_ids) == tokens for item in items[1:-1])
    assert len(items) == 1 + -(-16 // tokens)


def test_larger_deltas_are_not_split() -> None:
    items = _collect([3, 5, 1, 1, 6], tokens=4)
    assert [len(item.token_ids) for item in items] == [3, 5, 8]


def test_a_stream_that_ends_without_a_final_delta_still_flushes() -> None:
    items = _collect([1, 1, 1], tokens=8, finish=None)
    assert [t for item in items for t in item.token_ids] == [0, 1, 2]
