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
