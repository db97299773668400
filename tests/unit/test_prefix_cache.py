"""The prefix cache model: router-compatible keys, hits, LRU eviction of unpinned blocks, capacity, events."""

from __future__ import annotations

import pytest

from deployments.executors.prefix_cache import PrefixCache
from deployments.transport.policy import RoutingConfig, RoutingPolicy

BLOCK = 4


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, list[int]]] = []
        self.held: set[int] = set()

    def on_stored(self, block_hashes: list[int]) -> None:
        self.events.append(("stored", block_hashes))
        self.held.update(block_hashes)

    def on_removed(self, block_hashes: list[int]) -> None:
        self.events.append(("removed", block_hashes))
        self.held.difference_update(block_hashes)


def tokens(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def serve(cache: PrefixCache, request_id: str, token_ids: list[int]) -> int:
    """One request's whole life: acquire, store its prompt, release. Returns its cached tokens."""
    keys = cache.block_hashes(token_ids)
    num_cached = cache.acquire(request_id, keys)
    cache.store(request_id, keys)
    cache.release(request_id)
    return num_cached


def test_keys_are_the_routers_prompt_block_hashes() -> None:
    cache = PrefixCache(64, BLOCK)
    policy = RoutingPolicy(RoutingConfig(block_size=BLOCK))
    for length in (0, 1, 3, 4, 5, 8, 9, 23):
        prompt = tokens(100, length)
        assert cache.block_hashes(prompt) == policy.prompt_block_hashes(prompt)


def test_keys_extend_a_previous_turns_keys_without_rehashing_them() -> None:
    cache = PrefixCache(64, BLOCK)
    first_turn = tokens(0, 10)
    second_turn = first_turn + tokens(50, 13)
    known = cache.block_hashes(first_turn)

    assert cache.block_hashes(second_turn, known=known) == cache.block_hashes(second_turn)
    assert cache.block_hashes(first_turn, known=cache.block_hashes(second_turn)) == known


def test_a_repeated_prompt_hits_its_full_blocks_but_never_its_last_token() -> None:
    cache = PrefixCache(64, BLOCK)
    prompt = tokens(0, 12)  # 3 blocks, but the last token is never in a key: 2 cacheable

    assert serve(cache, "a", prompt) == 0
    assert serve(cache, "b", prompt) == 8
    assert serve(cache, "c", prompt + tokens(90, 5)) == 8  # 2 blocks held of its 4 keys
    assert serve(cache, "d", tokens(1000, 12)) == 0


def test_a_divergent_block_ends_the_hit_even_where_later_blocks_are_equal() -> None:
    cache = PrefixCache(64, BLOCK)
    serve(cache, "a", tokens(0, 17))
    changed = tokens(0, 17)
    changed[5] = 999  # block 1 differs; blocks 2 and 3 have the same tokens as before

    assert serve(cache, "b", changed) == BLOCK


def test_unpinned_blocks_are_evicted_least_recently_released_first_tails_before_heads() -> None:
    recorder = Recorder()
    cache = PrefixCache(4, BLOCK, recorder)
    first = tokens(0, 9)  # 2 keys
    second = tokens(100, 9)  # 2 keys
    serve(cache, "a", first)
    serve(cache, "b", second)
    first_keys, second_keys = cache.block_hashes(first), cache.block_hashes(second)

    serve(cache, "c", tokens(200, 5))  # 1 new key: the least recently released tail goes
    assert ("removed", [first_keys[1]]) in recorder.events
    assert cache.match(first_keys) == 1
    # first's head was kept: it hits, and its recomputed tail evicts second's tail (then least recent).
    assert serve(cache, "d", first) == BLOCK
    serve(cache, "e", tokens(300, 9))  # 2 new keys: second's head, then c's block
    assert cache.match(second_keys) == 0
    assert cache.match(first_keys) == 2
    assert len(cache) == 4 == cache.num_blocks
    assert recorder.held == {*first_keys, *cache.block_hashes(tokens(300, 9))}


def test_pinned_blocks_are_never_evicted_and_a_chain_without_room_keeps_its_head() -> None:
    cache = PrefixCache(3, BLOCK)
    running = tokens(0, 9)
    keys = cache.block_hashes(running)
    cache.acquire("running", keys)
    assert cache.store("running", keys) == 2

    other = tokens(100, 13)  # 3 keys, but only one block is free
    other_keys = cache.block_hashes(other)
    cache.acquire("other", other_keys)
    assert cache.store("other", other_keys) == 1
    assert cache.match(keys) == 2 and cache.match(other_keys) == 1
    assert len(cache) == 3

    cache.release("running")
    assert cache.store("other", other_keys) == 3  # running's blocks are free to evict now
    assert cache.match(keys) == 0 and len(cache) == 3


def test_blocks_another_request_computed_meanwhile_are_shared_not_stored_twice() -> None:
    recorder = Recorder()
    cache = PrefixCache(8, BLOCK, recorder)
    prompt = tokens(0, 9)
    keys = cache.block_hashes(prompt)
    assert cache.acquire("a", keys) == 0
    assert cache.acquire("b", keys) == 0  # both admitted before either finished prefill
    cache.store("a", keys)
    cache.store("b", keys)
    cache.release("a")
    assert recorder.events == [("stored", keys)]

    filler = tokens(100, 7 * BLOCK + 1)  # 7 keys; 6 blocks are free
    filler_keys = cache.block_hashes(filler)
    cache.acquire("filler", filler_keys)
    assert cache.store("filler", filler_keys) == 6  # b still pins both shared blocks
    assert cache.match(keys) == 2


def test_release_of_an_unknown_request_is_a_no_op_and_acquiring_twice_is_refused() -> None:
    cache = PrefixCache(8, BLOCK)
    cache.release("never-seen")
    cache.acquire("a", [])
    with pytest.raises(ValueError, match="already holds"):
        cache.acquire("a", [])


def test_capacity_and_block_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PrefixCache(0, BLOCK)
    with pytest.raises(ValueError):
        PrefixCache(8, 0)
