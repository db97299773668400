from __future__ import annotations

from typing import Any

from deployments.detokenizer import IncrementalDetokenizer

TEXT = "Hello café 東京 😀 — naïve straße, π ≤ 3.15!"


def stream(detok: IncrementalDetokenizer, token_ids: list[int], step: int = 1) -> list[str]:
    pieces = [detok.feed(token_ids[i : i + step]) for i in range(0, len(token_ids), step)]
    pieces.append(detok.flush())
    return pieces


def test_token_by_token_output_joins_to_full_decode(tokenizer: Any) -> None:
    token_ids = tokenizer.encode(TEXT)
    pieces = stream(IncrementalDetokenizer(tokenizer), token_ids)
    assert "".join(pieces) == tokenizer.decode(token_ids) == TEXT


def test_multibyte_characters_are_never_split(tokenizer: Any) -> None:
    token_ids = tokenizer.encode("東京😀")
    # Byte-level BPE with a 1k vocabulary spells these characters with several byte tokens each.
    assert len(token_ids) > 3
    pieces = stream(IncrementalDetokenizer(tokenizer), token_ids)
    assert "�" not in "".join(pieces)
    assert all(piece in ("", "東", "京", "😀", "東京") for piece in pieces), pieces


def test_special_tokens_are_skipped(tokenizer: Any) -> None:
    token_ids = tokenizer.encode("ok<|im_end|>")
    assert "".join(stream(IncrementalDetokenizer(tokenizer), token_ids)) == "ok"


def test_stop_string_split_across_deltas_never_leaks(tokenizer: Any) -> None:
    token_ids = tokenizer.encode("one two STOP three four")
    for step in (1, 2, 3, len(token_ids)):
        detok = IncrementalDetokenizer(tokenizer, stop=["STOP"])
        pieces = stream(detok, token_ids, step)
        assert "".join(pieces) == "one two "
        assert detok.is_stopped and detok.stop_reason == "STOP"
        assert all("ST" not in piece for piece in pieces)


def test_earliest_of_several_stop_strings_wins(tokenizer: Any) -> None:
    detok = IncrementalDetokenizer(tokenizer, stop=["three", "two"])
    assert "".join(stream(detok, tokenizer.encode("one two three"))) == "one "
    assert detok.stop_reason == "two"


def test_text_that_only_looks_like_a_stop_prefix_is_released(tokenizer: Any) -> None:
    detok = IncrementalDetokenizer(tokenizer, stop=["STOP"])
    assert "".join(stream(detok, tokenizer.encode("a STO b ST"))) == "a STO b ST"
    assert not detok.is_stopped


def test_prompt_prefill_does_not_emit_prompt_text(tokenizer: Any) -> None:
    prompt = tokenizer.encode("prefix text")
    completion = tokenizer.encode(" and more")
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=prompt)
    assert "".join(stream(detok, completion)) == " and more"
