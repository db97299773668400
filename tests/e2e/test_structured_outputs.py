"""Structured outputs and full sampling on the real app with the official client: JSON schemas, forced tool
calls (streamed and not), `structured_outputs`, seeds, penalties, `logit_bias` and top logprobs.

The embedded model's text is random: these checks are about validity (every reply parses and validates,
whatever the model would rather say), which is exactly what guided decoding promises.
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import pytest

from tests.e2e.conftest import AUTH, MODEL
from tests.tool_definitions import CLOCK, SCHEMAS, WEATHER

pytestmark = pytest.mark.e2e

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Tokyo", "Lima"]},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "contact": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"phone": {"type": "string", "pattern": "^[0-9]{6}$"}},
                    "required": ["phone"],
                    "additionalProperties": False,
                },
                {"type": "boolean"},
            ]
        },
    },
    "required": ["name", "age", "role", "tags", "address", "contact"],
    "additionalProperties": False,
}
PROMPTS = [
    "Describe a user.",
    "Who is the admin?",
    "Make up a person from Paris.",
    "café 東京 person",
    "Return JSON.",
    "A guest with two tags",
    "hi",
    "Fill the form for Ana, 31.",
    "Someone from Lima",
    "Write a profile.",
    "¿Quién eres?",
    "Name: Bob",
    "A person with no contact",
    "one more",
    "the session token cache engine",
    "Tell me about Tokyo",
    "Numbers: 1 2 3",
    "A very long description " * 6,
    "Emoji 😀 person",
    "last one",
]


def ask(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def person_format() -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }


def test_twenty_varied_prompts_with_a_json_schema_give_twenty_valid_objects(client: Any) -> None:
    def one(prompt: str) -> Any:
        return client.chat.completions.create(
            model=MODEL, messages=ask(prompt), response_format=person_format(), max_tokens=300
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(one, PROMPTS))
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_a_json_object_streams_to_valid_json(client: Any) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ask("json please"),
        response_format={"type": "json_object"},
        max_tokens=400,
        stream=True,
        temperature=0.7,
        seed=3,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    if finish == ["stop"]:
        assert isinstance(json.loads(text), dict)
    else:  # the object may outgrow max_tokens; then it is cut, never hung
        assert finish == ["length"] and text.startswith("{")


def _check_calls(calls: list[Any], allowed: set[str]) -> None:
    assert calls, "a forced tool call must parse"
    for call in calls:
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_always_gives_a_parseable_call(client: Any, stream: bool) -> None:
    for i in range(5):
        request = {
            "model": MODEL,
            "messages": ask(f"What now? {i}"),
            "tools": [WEATHER, CLOCK],
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "max_tokens": 200,
        }
        if not stream:
            reply = client.chat.completions.create(**request)
            assert reply.choices[0].finish_reason == "tool_calls"
            _check_calls(reply.choices[0].message.tool_calls, {"get_weather", "get_time"})
            continue
        calls: dict[int, dict[str, str]] = {}
        finishes = []
        for chunk in client.chat.completions.create(**request, stream=True):
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            finishes.append(choice.finish_reason)
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
        assert "tool_calls" in finishes and len(calls) == 1
        for call in calls.values():
            jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_a_named_function_gets_arguments_valid_for_its_schema(client: Any) -> None:
    for i in range(3):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=ask(f"weather {i}"),
            tools=[WEATHER, CLOCK],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            max_tokens=200,
        )
        assert reply.choices[0].finish_reason == "tool_calls"
        _check_calls(reply.choices[0].message.tool_calls, {"get_time"})
        assert len(reply.choices[0].message.tool_calls) == 1


def test_structured_outputs_choice_and_regex_in_chat_and_completions(client: Any) -> None:
    choices = ["yes", "no", "maybe (later)"]
    for _ in range(3):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=ask("choose"),
            max_tokens=20,
            extra_body={"structured_outputs": {"choice": choices}},
        )
        assert reply.choices[0].message.content in choices
    completion = client.completions.create(
        model=MODEL,
        prompt="Code:",
        max_tokens=20,
        extra_body={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2}"}},
    )
    text = completion.choices[0].text
    assert len(text) == 6 and text[:3].isupper() and text[3] == "-" and text[4:].isdigit()


def test_a_grammar_cut_by_max_tokens_ends_with_length_and_the_partial_text(client: Any) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=ask("x"), response_format=person_format(), max_tokens=4
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.message.content.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice.message.content)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=ask("x"),
            response_format=person_format(),
            max_tokens=4,
            stream=True,
        )
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_a_seed_repeats_its_text_at_temperature_one_and_other_seeds_differ(client: Any) -> None:
    def text(seed: int) -> str:
        reply = client.chat.completions.create(
            model=MODEL, messages=ask("tell a story"), max_tokens=24, temperature=1.0, seed=seed
        )
        return str(reply.choices[0].message.content)

    first = text(1234)
    assert text(1234) == first
    assert all(text(seed) != first for seed in (1, 2, 3))


def _greedy_ids(base_url: str, **extra: Any) -> list[int]:
    body = {
        "model": MODEL,
        "messages": ask("repeat after me: the the the"),
        "max_tokens": 32,
        "temperature": 0,
        "return_token_ids": True,
        **extra,
    }
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    token_ids: list[int] = response.json()["choices"][0]["token_ids"]
    return token_ids


def test_a_banned_token_never_appears_and_penalties_change_the_text(base_url: str) -> None:
    greedy = _greedy_ids(base_url)
    banned, _ = Counter(greedy).most_common(1)[0]
    assert banned not in _greedy_ids(base_url, logit_bias={str(banned): -100})
    sampled = _greedy_ids(base_url, logit_bias={str(banned): -100}, temperature=1.5, seed=9)
    assert banned not in sampled
    penalized = _greedy_ids(base_url, frequency_penalty=2.0, presence_penalty=0.5)
    assert penalized != greedy
    assert max(Counter(penalized).values()) <= max(Counter(greedy).values())
    assert _greedy_ids(base_url, repetition_penalty=1.3, min_tokens=8)


def test_top_logprobs_come_in_order_for_chat_and_completions(client: Any) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=ask("hi"), max_tokens=8, temperature=0, logprobs=True, top_logprobs=5
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        values = [top.logprob for top in entry.top_logprobs]
        assert len(values) == 5 and values == sorted(values, reverse=True)
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy
    completion = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=5, temperature=0, logprobs=3
    )
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.top_logprobs) == len(logprobs.tokens) == 5
    for top, chosen in zip(logprobs.top_logprobs, logprobs.token_logprobs, strict=True):
        # Alternatives that decode to the same text share one key of the legacy format.
        assert 1 <= len(top) <= 3 and all(value <= chosen + 1e-5 for value in top.values())


BAD = [
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": 3}},
            }
        },
        "response_format.json_schema",
    ),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object", "not": {}}},
            }
        },
        "response_format.json_schema",
    ),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"enum": ["v" * 100 + str(i) for i in range(1000)]},
                },
            }
        },
        "response_format.json_schema",
    ),
    (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": -101}}, "logit_bias"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("extra", "param"), BAD, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD)])
def test_what_cannot_be_enforced_is_a_400_naming_the_field(
    base_url: str, extra: dict[str, Any], param: str, stream: bool
) -> None:
    body = {"model": MODEL, "messages": ask("hi"), "max_tokens": 4, "stream": stream, **extra}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
