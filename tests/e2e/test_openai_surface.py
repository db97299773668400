"""The rest of the OpenAI surface with the official client: tools, n, logprobs, stop, extras, tokenize,
completions batches, and each rejection naming its field."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import AUTH, MODEL

pytestmark = pytest.mark.e2e
HI = [{"role": "user", "content": "hi there"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def tokenize(base_url: str, **body: Any) -> list[int]:
    response = httpx.post(f"{base_url}/tokenize", json={"model": MODEL, **body}, headers=AUTH)
    assert response.status_code == 200, response.text
    tokens: list[int] = response.json()["tokens"]
    return tokens


def test_tools_are_rendered_through_the_chat_template(
    base_url: str, client: Any, tokenizer: Any
) -> None:
    with_tools = tokenize(base_url, messages=HI, tools=[WEATHER])
    without = tokenize(base_url, messages=HI)
    assert '"name": "get_weather"' in tokenizer.decode(with_tools)
    assert len(with_tools) > len(without)
    reply = client.chat.completions.create(
        model=MODEL,
        messages=HI,
        tools=[WEATHER],
        tool_choice="auto",
        parallel_tool_calls=True,
        max_tokens=4,
    )
    assert reply.usage.prompt_tokens == len(with_tools)
    none = client.chat.completions.create(
        model=MODEL, messages=HI, tools=[WEATHER], tool_choice="none", max_tokens=4
    )
    assert none.usage.prompt_tokens == len(without)


def test_tool_messages_round_trip_in_a_session(base_url: str, client: Any, tokenizer: Any) -> None:
    session = httpx.post(f"{base_url}/v1/sessions", json={"tools": [WEATHER]}, headers=AUTH).json()
    sid = session["id"]
    client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "weather in Oslo?"}],
        max_tokens=3,
        extra_body={"session_id": sid},
    )
    # The client ran the tool itself: it sends the call it made and the result as the next turn.
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        ],
        max_tokens=3,
        extra_body={"session_id": sid},
    )
    view = httpx.get(f"{base_url}/v1/sessions/{sid}", headers=AUTH).json()
    roles = [m["role"] for m in view["messages"]]
    assert roles == ["user", "assistant", "assistant", "tool", "assistant"]
    assert view["messages"][2]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert view["messages"][3]["tool_call_id"] == "call_1"
    assert view["tools"][0]["function"]["name"] == "get_weather"


def test_n_returns_independent_choices(client: Any) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=HI, n=3, max_tokens=5, temperature=1.0
    )
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    assert (
        reply.usage.completion_tokens == sum(1 for _ in range(3)) * 5
        or reply.usage.completion_tokens <= 15
    )
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=HI, n=2, max_tokens=5, stream=True)
    )
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_logprobs_cover_every_completion_token(client: Any) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=6, logprobs=True, temperature=1.0
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert all(entry.logprob <= 0.0 for entry in content)
    # Sampled, so an early end token is possible: ignore_eos keeps the count at 6.
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=HI,
            max_tokens=6,
            logprobs=True,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert len(streamed) == 6 == chunks[-1].usage.completion_tokens
    completion = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, logprobs=0)
    assert len(completion.choices[0].logprobs.token_logprobs) == 4


def test_top_k_extra_and_max_completion_tokens_alias(client: Any) -> None:
    greedy = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, temperature=0)
    top1 = client.chat.completions.create(
        model=MODEL, messages=HI, max_completion_tokens=8, temperature=1.5, extra_body={"top_k": 1}
    )
    assert top1.choices[0].message.content == greedy.choices[0].message.content
    assert top1.usage.completion_tokens == 8


def test_user_metadata_and_store_are_accepted(client: Any) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=2, user="u-1", metadata={"k": "v"}, store=False
    )
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_completions_batch_of_prompts_and_of_token_id_lists(client: Any, tokenizer: Any) -> None:
    texts = client.completions.create(
        model=MODEL, prompt=["Hello", "Goodbye"], max_tokens=4, temperature=0
    )
    assert [c.index for c in texts.choices] == [0, 1]
    ids = client.completions.create(
        model=MODEL,
        prompt=[tokenizer.encode("Hello"), tokenizer.encode("Goodbye")],
        max_tokens=4,
        temperature=0,
    )
    assert [c.text for c in ids.choices] == [c.text for c in texts.choices]
    assert texts.usage.prompt_tokens == len(tokenizer.encode("Hello")) + len(
        tokenizer.encode("Goodbye")
    )


def test_tokenize_and_detokenize_round_trip(base_url: str, tokenizer: Any) -> None:
    tokens = tokenize(base_url, prompt="café 東京")
    assert tokens == tokenizer.encode("café 東京")
    response = httpx.post(
        f"{base_url}/detokenize", json={"model": MODEL, "tokens": tokens}, headers=AUTH
    )
    assert response.json() == {"prompt": "café 東京"}
    body = httpx.post(
        f"{base_url}/tokenize", json={"model": MODEL, "prompt": "x"}, headers=AUTH
    ).json()
    assert body["max_model_len"] == 2048 and body["count"] == len(body["tokens"])


REJECTIONS = [
    ({"unknown_field": 1}, "unknown_field"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    # Subnormal: it used to divide a row of logits to inf and stop the engine (found by test_fuzz).
    ({"repetition_penalty": 5e-324}, "repetition_penalty"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logit_bias": {"5": 101.0}}, "logit_bias"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"n": 100}, "n"),
    (
        {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
        "response_format",
    ),
    (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),
    ({"tool_choice": "auto"}, "tool_choice"),
]


@pytest.mark.parametrize(
    ("extra", "param"), REJECTIONS, ids=[r[1] + str(i) for i, r in enumerate(REJECTIONS)]
)
def test_unsupported_or_invalid_parameters_are_refused_naming_them(
    base_url: str, extra: dict[str, Any], param: str
) -> None:
    body = {"model": MODEL, "messages": HI, "max_tokens": 2, **extra}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert param in error["message"] or param == (error["param"] or "")


def test_a_tool_with_a_non_object_schema_is_refused_naming_the_tool(client: Any) -> None:
    bad = {"type": "function", "function": {"name": "broken_tool", "parameters": {"type": "array"}}}
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=HI, tools=[WEATHER, bad], max_tokens=2)
    assert "broken_tool" in str(raised.value) and "tools.1" in str(raised.value)
