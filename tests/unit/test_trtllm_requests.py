"""DeltaAssembler and KvBlockIndex: engine-result and KV-event conversions, without an engine."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from deployments.executors.trtllm_kv_events import KvBlockIndex, chain_block_hashes
from deployments.executors.trtllm_requests import DeltaAssembler
from deployments.messages import FinishReason, GenerateRequest


def assembler(**fields: Any) -> DeltaAssembler:
    return DeltaAssembler(GenerateRequest("r", [1, 2, 3], 16, **fields))


def test_end_id_returned_by_the_engine_is_stripped() -> None:
    deltas = assembler(end_id=2, return_logprobs=True)
    first = deltas.feed([5, 6], [-0.1, -0.2], None)
    last = deltas.feed([7, 2], [-0.3, -0.4], "END_ID")
    assert first is not None and last is not None
    assert (first.token_ids, first.num_prompt_tokens) == ([5, 6], 3)
    assert (last.token_ids, last.logprobs, last.finish_reason) == ([7], [-0.3], FinishReason.END_ID)
    assert deltas.is_done


def test_stop_sequence_split_across_responses_never_leaks() -> None:
    deltas = assembler(stop_token_sequences=((8, 9),), return_logprobs=True)
    held = deltas.feed([5, 8], [-0.5, -0.8], None)
    final = deltas.feed([9], [-0.9], "STOP_WORDS")
    assert held is not None and held.token_ids == [5] and held.logprobs == [-0.5]
    assert final is not None and final.token_ids == [] and final.finish_reason is FinishReason.STOP


def test_stop_sequence_seen_before_the_engine_finishes_ends_the_request() -> None:
    deltas = assembler(stop_token_sequences=((8, 9),))
    delta = deltas.feed([4, 8, 9, 10], None, None)
    assert delta is not None and delta.token_ids == [4] and delta.finish_reason is FinishReason.STOP
    assert deltas.is_done


def test_stop_words_finish_drops_the_generated_part_of_a_prompt_spanning_match() -> None:
    deltas = assembler(stop_token_sequences=((3, 7),))
    final = deltas.feed([7], None, "STOP_WORDS")  # the engine matched (3, 7) across the prompt end
    assert final is not None and final.token_ids == [] and final.finish_reason is FinishReason.STOP


def test_held_prefix_is_flushed_when_the_request_ends_otherwise() -> None:
    deltas = assembler(stop_token_sequences=((8, 9),))
    assert deltas.feed([8], None, None) is None
    final = deltas.feed([], None, "LENGTH")
    assert (
        final is not None and final.token_ids == [8] and final.finish_reason is FinishReason.LENGTH
    )


def test_cancelled_and_timed_out_map_to_cancelled() -> None:
    for name in ("CANCELLED", "TIMED_OUT"):
        final = assembler().feed([], None, name)
        assert final is not None and final.finish_reason is FinishReason.CANCELLED


def stored(parent: int | None, blocks: list[tuple[int, list[int]]]) -> Any:
    data = SimpleNamespace(
        parent_hash=parent,
        blocks=[
            SimpleNamespace(block_hash=h, tokens=[SimpleNamespace(token_id=t) for t in tokens])
            for h, tokens in blocks
        ],
    )
    return SimpleNamespace(data=data)


def removed(hashes: list[int]) -> Any:
    return SimpleNamespace(data=SimpleNamespace(block_hashes=hashes))


def test_block_index_rehashes_stored_chains_and_applies_removals() -> None:
    index = KvBlockIndex(tokens_per_block=2, max_blocks=100)
    index.apply([stored(None, [(101, [1, 2]), (102, [3, 4])]), stored(102, [(103, [5, 6])])])
    assert index.recent_hashes(10) == chain_block_hashes([1, 2, 3, 4, 5, 6], 2)[::-1]
    index.apply([removed([102])])
    assert set(index.recent_hashes(10)) == set(chain_block_hashes([1, 2, 3, 4, 5, 6], 2)) - {
        chain_block_hashes([1, 2, 3, 4], 2)[1]
    }


def test_block_index_skips_orphans_and_partial_blocks_and_stays_bounded() -> None:
    index = KvBlockIndex(tokens_per_block=2, max_blocks=2)
    index.apply([stored(999, [(1, [1, 2])])])  # parent never seen
    index.apply([stored(None, [(2, [1, 2]), (3, [3])])])  # partial tail
    assert len(index) == 1 and index.num_skipped_blocks == 1
    index.apply([stored(2, [(4, [3, 4]), (5, [5, 6])])])
    assert len(index) == 2
    index.apply([SimpleNamespace(data=SimpleNamespace(num_blocks_per_cache_level=[8, 0]))])
    assert len(index) == 0


def test_chain_block_hashes_ignores_the_partial_tail_and_chains() -> None:
    full = chain_block_hashes([1, 2, 3, 4, 5], 2)
    assert len(full) == 2
    assert chain_block_hashes([3, 4], 2, parent_hash=full[0]) == full[1:]
