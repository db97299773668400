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
    import asyncio

    import pytest

    from deployments.errors import EngineDead
    from deployments.executors.base import DeltaCollector
    from deployments.messages import TokenDelta

    async def main() -> None:
        collector = DeltaCollector()
        collector.put(TokenDelta(token_ids=[1]))
        collector.put(TokenDelta(token_ids=[2]))
        collector.fail(EngineDead("gone"))
        assert (await collector.get()).token_ids == [1, 2]
        with pytest.raises(EngineDead):
            await asyncio.wait_for(collector.get(), timeout=1)

    asyncio.run(main())
