"""Cached prompt tokens as a client sees them: `usage.prompt_tokens_details.cached_tokens` from the engine's
prefix cache, through the suite's `serve run` app (tests/e2e/serve_config.tiny.yaml), real HTTP and the
official client.

transformers' continuous batching drops *every* cached block at once when its free KV memory falls below
the scheduler's safety margin (`FIFOScheduler`, 15 %; `evict_cached_blocks` in transformers 5.24), and in a
long test session that can happen between any two requests. So each check repeats its request once: a
repeat reports the whole pages it found, or 0 right after such an eviction (then the other one finds them).
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import AUTH, MODEL
from tests.e2e.session_calls import create_session

pytestmark = pytest.mark.e2e
PAGE_SIZE = 64  # engine.transformers.page_size of the suite's app (the default)
# Long enough for a few whole KV pages of the embedded model's tokenizer.
LONG_TEXT = " ".join(
    f"line {k}: the replica keeps the prefix of every session warm" for k in range(30)
)


def _cached_prompt_tokens(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics", headers=AUTH).text
    pattern = r"^shepherd_cached_prompt_tokens_total\{[^}]*\} (\S+)$"
    return sum(float(value) for value in re.findall(pattern, text, re.M))


def _whole_pages(num_tokens: int) -> int:
    return num_tokens // PAGE_SIZE * PAGE_SIZE


def test_a_repeated_prompt_reports_whole_cached_pages(client: Any, base_url: str) -> None:
    messages = [
        {"role": "system", "content": "You answer about caches. " + LONG_TEXT},
        {"role": "user", "content": "What stays warm?"},
    ]
    counted_before = _cached_prompt_tokens(base_url)
    first = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, temperature=0
    )
    repeats = []
    for _ in range(2):
        stream = client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        repeats.append(list(stream)[-1].usage)
    prompt_tokens = first.usage.prompt_tokens
    assert prompt_tokens > 2 * PAGE_SIZE
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # The engine shares whole pages and always computes the prompt's last token.
    expected = _whole_pages(prompt_tokens - 1)
    cached = [usage.prompt_tokens_details.cached_tokens for usage in repeats]
    assert set(cached) <= {0, expected} and expected in cached and expected > 0
    assert _cached_prompt_tokens(base_url) - counted_before == sum(cached)

    completions = [
        client.completions.create(
            model=MODEL, prompt="Caches: " + LONG_TEXT, max_tokens=2, temperature=0
        ).usage
        for _ in range(3)
    ]
    assert completions[0].prompt_tokens_details.cached_tokens == 0
    expected = _whole_pages(completions[0].prompt_tokens - 1)
    cached = [usage.prompt_tokens_details.cached_tokens for usage in completions[1:]]
    assert set(cached) <= {0, expected} and expected in cached and expected > 0


def test_a_session_turn_reports_the_previous_turn_as_cached(client: Any, base_url: str) -> None:
    session_id = create_session(base_url, system_prompt="You summarise. " + LONG_TEXT)

    def say(text: str) -> Any:
        return client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": text}],
            max_tokens=24,
            temperature=0,
            extra_body={"session_id": session_id, "ignore_eos": True},
        ).usage

    turns = [say(f"question {k}") for k in range(3)]
    assert turns[0].prompt_tokens_details.cached_tokens == 0
    # Everything the engine computed last turn: its prompt and its reply but the last token (whose KV is
    # computed only when the next turn is prefilled), in whole pages.
    expected = [
        _whole_pages(previous.prompt_tokens + previous.completion_tokens - 1)
        for previous in turns[:-1]
    ]
    cached = [turn.prompt_tokens_details.cached_tokens for turn in turns[1:]]
    assert all(c in (0, e) for c, e in zip(cached, expected, strict=True))
    assert any(c == e > turns[0].prompt_tokens for c, e in zip(cached, expected, strict=True))
