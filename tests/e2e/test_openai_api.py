"""The OpenAI surface through real HTTP, the official client, and real Ray Serve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.e2e.conftest import AUTH, MODEL

pytestmark = pytest.mark.e2e
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Tell me about 東京."},
]


@pytest.fixture(scope="module")
def expected_greedy(model_dir: Path, tokenizer: Any) -> tuple[list[int], str]:
    """What transformers' own generate produces for MESSAGES (32 tokens, greedy)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None)
    completion = out[0, len(ids) :].tolist()
    return completion, tokenizer.decode(completion, skip_special_tokens=True)


def test_non_streaming_greedy_reply_equals_transformers_generate(
    client: Any, expected_greedy: Any
) -> None:
    _, text = expected_greedy
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=32, temperature=0
    )
    assert reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 32
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 32


def test_streaming_reply_arrives_in_pieces_and_joins_to_the_same_text(
    client: Any, expected_greedy: Any
) -> None:
    _, text = expected_greedy
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=32,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for p in pieces if p) > 3
    assert "".join(pieces) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 32


def test_stop_string_ends_the_reply_before_it(client: Any, expected_greedy: Any) -> None:
    _, text = expected_greedy
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "pick a visible stop string"
    for stream in (False, True):
        kwargs = {
            "model": MODEL,
            "messages": MESSAGES,
            "max_tokens": 32,
            "temperature": 0,
            "stop": [stop],
        }
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kwargs))
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            reply = client.chat.completions.create(**kwargs)
            content, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert content == text[: text.index(stop)]
        assert finish == "stop"


def test_raw_sse_stream_is_well_formed(base_url: str) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "stream": True}
    with httpx.stream(
        "POST", f"{base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(line[len("data: ") :]) for line in events[:-1]]
    assert {p["object"] for p in payloads} == {"chat.completion.chunk"}
    assert len({p["id"] for p in payloads}) == 1


def test_completions_accept_text_and_token_ids_and_echo(client: Any, tokenizer: Any) -> None:
    text_reply = client.completions.create(
        model=MODEL, prompt="Hello there", max_tokens=6, temperature=0
    )
    ids = tokenizer.encode("Hello there")
    ids_reply = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert text_reply.choices[0].text == ids_reply.choices[0].text
    assert text_reply.usage.prompt_tokens == len(ids)
    echoed = client.completions.create(
        model=MODEL, prompt="Hello there", max_tokens=6, temperature=0, echo=True
    )
    assert echoed.choices[0].text == "Hello there" + text_reply.choices[0].text
    streamed = client.completions.create(
        model=MODEL, prompt="Hello there", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == text_reply.choices[0].text


def test_models_and_health(client: Any, base_url: str) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{base_url}/health").status_code == 200
