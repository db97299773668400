"""The Responses and Conversations APIs through real Ray Serve, with the official client: token-exact chains,
forks, streamed events, conversations that are sessions, bad input, and a client that leaves mid-stream."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.e2e.conftest import AUTH, MODEL, OTHER_API_KEY
from tests.tool_definitions import SCHEMAS, TOOLS

pytestmark = pytest.mark.e2e
TOKEN_IDS = {"return_token_ids": True}
# The forced-call tests' tools in the Responses shape (`{"type": "function", "name": ...}`).
FUNCTIONS = [{"type": "function", **tool["function"]} for tool in TOOLS]


def create(client: Any, **fields: Any) -> Any:
    return client.responses.create(
        model=MODEL, **{"max_output_tokens": 8, "temperature": 0, **fields}
    )


def ids(response: Any) -> tuple[list[int], list[int]]:
    """(prompt ids, generated ids) of a response made with `return_token_ids`."""
    return response.model_extra["prompt_token_ids"], response.model_extra["output_token_ids"]


def continued_ids(response: Any, tokenizer: Any) -> list[int]:
    """The ids a continuation of `response` begins with: its prompt, then the very ids it generated (even
    where they hold bytes that are not UTF-8, U+FFFD in its text)."""
    del tokenizer  # the ids are the engine's, never a re-encoding of the text
    prompt, generated = ids(response)
    return prompt + generated


def test_create_retrieve_input_items_and_delete(client: Any) -> None:
    first = create(client, input="hello there", instructions="Be terse.", metadata={"k": "v"})
    assert first.object == "response" and first.status in ("completed", "incomplete")
    assert (
        first.output[0].type == "message" and first.output_text == first.output[0].content[0].text
    )
    assert first.usage.input_tokens > 0 and first.metadata == {"k": "v"}
    assert "prompt_token_ids" not in (first.model_extra or {})

    got = client.responses.retrieve(first.id)
    assert (
        got.output == first.output and got.usage == first.usage and got.instructions == "Be terse."
    )
    items = client.responses.input_items.list(first.id)
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [
        ("message", "user", "hello there")
    ]
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)

    unstored = create(client, input="forget this", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError) as refused:
        create(client, input="x", previous_response_id=unstored.id)
    assert refused.value.body["param"] == "previous_response_id"


def test_six_turn_chain_continues_the_exact_ids_and_matches_a_stateless_replay(
    client: Any, tokenizer: Any
) -> None:
    previous, chain = None, []
    for k in range(6):
        response = create(
            client,
            input=f"question {k}",
            instructions="You are terse.",
            previous_response_id=previous,
            extra_body=TOKEN_IDS,
        )
        chain.append(response)
        previous = response.id
    for before, after in zip(chain, chain[1:], strict=False):
        seen = continued_ids(before, tokenizer)
        assert (
            ids(after)[0][: len(seen)] == seen
        )  # the previous prompt, its reply, then the new suffix
        assert after.usage.input_tokens_details.cached_tokens == len(seen)
        assert after.previous_response_id == before.id

    # A stateless replay of each turn's exact prompt ids (no session, no chain) gives the same greedy reply:
    # continuing from stored ids and the engine's cached prefix changes nothing in what is generated.
    for response in chain:
        prompt, generated = ids(response)
        replay = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
        assert replay.choices[0].text == response.output_text
        assert replay.usage.completion_tokens == len(generated)


def test_two_continuations_of_one_response_fork_and_keep_the_shared_prefix(
    client: Any, tokenizer: Any
) -> None:
    root = create(client, input="the root", extra_body=TOKEN_IDS)
    prefix = continued_ids(root, tokenizer)
    left = create(client, input="left", previous_response_id=root.id, extra_body=TOKEN_IDS)
    right = create(client, input="right", previous_response_id=root.id, extra_body=TOKEN_IDS)
    assert ids(left)[0][: len(prefix)] == prefix == ids(right)[0][: len(prefix)]
    assert ids(left)[0] != ids(right)[0]
    assert [i.content[0].text for i in client.responses.input_items.list(left.id).data] == ["left"]

    client.responses.delete(root.id)  # the branches still continue from what it held
    with pytest.raises(openai.NotFoundError):
        create(client, input="x", previous_response_id=root.id)
    deeper = create(client, input="deeper", previous_response_id=left.id, extra_body=TOKEN_IDS)
    # Past the branch's prompt too (its reply's ids, or, when the reply held a special token the history does
    # not show, the ids of the text it shows).
    left_prompt = ids(left)[0]
    assert ids(deeper)[0][: len(left_prompt)] == left_prompt
    assert deeper.usage.input_tokens_details.cached_tokens > len(left_prompt)


def test_streamed_events_are_numbered_and_the_response_is_stored_before_the_last(
    client: Any,
) -> None:
    with client.responses.stream(
        model=MODEL, input="stream me", max_output_tokens=8, temperature=0
    ) as stream:
        events = list(stream)
    final = events[-1].response  # `get_final_response` waits for `completed`; 8 tokens may cut it
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-1] == f"response.{final.status}" and final.status in ("completed", "incomplete")
    assert kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text
    # Continued the moment the stream ended: the response was kept before its terminal event.
    follow = create(client, input="next", previous_response_id=final.id)
    assert follow.usage.input_tokens_details.cached_tokens > 0
    assert client.responses.retrieve(final.id).output_text == text


def test_a_json_schema_text_format_gives_a_valid_object_that_a_chain_continues(client: Any) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Tokyo"]}, "count": {"type": "integer"}},
        "required": ["city", "count"],
        "additionalProperties": False,
    }
    text_format = {"type": "json_schema", "name": "place", "schema": schema, "strict": True}
    first = create(
        client, input="Name a city.", text={"format": text_format}, max_output_tokens=200
    )
    assert first.status == "completed", first.output_text
    jsonschema.validate(json.loads(first.output_text), schema)
    assert first.text.format.type == "json_schema"
    # The next turn of the chain is free text again (each request gives its own format).
    second = create(client, input="Thanks.", previous_response_id=first.id)
    assert second.text.format.type == "text" and second.previous_response_id == first.id


def test_a_forced_tool_choice_gives_one_function_call_item_that_a_chain_answers(
    client: Any,
) -> None:
    """The Responses shape of a forced call runs chat's forced-call grammar: whatever the (random) model
    would rather say, the output is a `function_call` item for that function, its arguments valid."""
    forced = create(
        client,
        input="Weather in Paris?",
        tools=FUNCTIONS,
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=200,
    )
    assert forced.status == "completed", forced.output
    [call] = forced.output
    assert (
        call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    )
    assert call.id == "fc_" + call.call_id.removeprefix("call_")
    jsonschema.validate(json.loads(call.arguments), SCHEMAS["get_weather"])
    assert forced.tool_choice.type == "function" and forced.tool_choice.name == "get_weather"
    assert client.responses.retrieve(forced.id).output == forced.output

    # The call is pending in the chain: its output continues it, and the reply is free text again.
    answered = create(
        client,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        previous_response_id=forced.id,
        tools=FUNCTIONS,
    )
    assert answered.output[0].type == "message"
    assert answered.previous_response_id == forced.id
    assert answered.usage.input_tokens_details.cached_tokens >= forced.usage.input_tokens

    required = create(
        client,
        input="What now?",
        tools=FUNCTIONS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=200,
    )
    [call] = required.output
    assert call.type == "function_call" and call.name in SCHEMAS
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_a_streamed_forced_call_sends_openais_function_call_events(client: Any) -> None:
    with client.responses.stream(
        model=MODEL,
        input="What time is it?",
        tools=FUNCTIONS,
        tool_choice={"type": "function", "name": "get_time"},
        max_output_tokens=200,
        temperature=0,
    ) as stream:
        events = list(stream)
    final = events[-1].response
    assert events[-1].type == "response.completed" and final.status == "completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    [call] = final.output
    assert call.type == "function_call" and call.name == "get_time"
    jsonschema.validate(json.loads(call.arguments), SCHEMAS["get_time"])
    kinds = [e.type for e in events]
    assert kinds[2] == "response.output_item.added" and events[2].item.type == "function_call"
    assert kinds[-3:-1] == ["response.function_call_arguments.done", "response.output_item.done"]
    assert "response.output_text.delta" not in kinds
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert deltas and all(e.item_id == call.id for e in deltas)
    assert "".join(e.delta for e in deltas) == events[-3].arguments == call.arguments
    # The SDK's final item is its parsed subclass (`parsed_arguments`); the fields it was sent are the same.
    assert events[-2].item.model_dump() == call.model_dump(exclude={"parsed_arguments"})


def test_a_conversation_is_a_session_that_responses_append_to(client: Any, base_url: str) -> None:
    conversation = client.conversations.create(
        items=[{"role": "user", "content": "remember: cache"}], metadata={"topic": "words"}
    )
    first = create(client, input="which word?", conversation=conversation.id)
    second = create(client, input="again?", conversation=conversation.id)
    assert first.conversation.id == conversation.id
    assert second.usage.input_tokens_details.cached_tokens > 0
    items = client.conversations.items.list(conversation.id, order="asc")
    texts = [item.content[0].text for item in items.data]
    assert texts == [
        "remember: cache",
        "which word?",
        first.output_text,
        "again?",
        second.output_text,
    ]
    assert items.data[2].id == first.output[0].id  # the conversation lists the response's own items

    added = client.conversations.items.create(
        conversation.id, items=[{"role": "user", "content": "a note"}]
    )
    note_id = added.data[0].id
    assert (
        client.conversations.items.retrieve(note_id, conversation_id=conversation.id).id == note_id
    )
    client.conversations.items.delete(note_id, conversation_id=conversation.id)
    updated = client.conversations.update(conversation.id, metadata={"topic": "changed"})
    assert updated.metadata == {"topic": "changed"}

    # The same conversation as a session: visible at /v1/sessions, and `session_id` chat continues it.
    view = httpx.get(f"{base_url}/v1/sessions/{conversation.id}", headers=AUTH).json()
    assert view["num_turns"] == 2 and len(view["messages"]) == 5
    client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "by chat"}],
        max_tokens=4,
        extra_body={"session_id": conversation.id},
    )
    after_chat = client.conversations.items.list(conversation.id, order="asc").data
    assert [item.content[0].text for item in after_chat][5] == "by chat"
    third = create(client, input="and now?", conversation=conversation.id)
    assert third.usage.input_tokens_details.cached_tokens > 0

    client.conversations.delete(conversation.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conversation.id)


def test_another_keys_responses_and_conversations_do_not_exist(client: Any, base_url: str) -> None:
    from openai import OpenAI

    other = OpenAI(base_url=f"{base_url}/v1", api_key=OTHER_API_KEY, max_retries=0)
    theirs = create(other, input="mine")
    conversation = other.conversations.create()
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(theirs.id)
    with pytest.raises(openai.NotFoundError) as raised:
        create(client, input="x", previous_response_id=theirs.id)
    assert raised.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        create(client, input="x", conversation=conversation.id)
    assert other.responses.retrieve(theirs.id).id == theirs.id


BAD_INPUTS = [
    (
        "unknown previous response",
        {"previous_response_id": "resp_nope"},
        404,
        "previous_response_id",
    ),
    (
        "previous response with conversation",
        {"previous_response_id": "resp_x", "conversation": "conv_x"},
        400,
        "previous_response_id",
    ),
    ("unknown conversation", {"conversation": "conv_nope"}, 404, "conversation"),
    (
        "an output for no call",
        {"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]},
        400,
        "input.0.call_id",
    ),
    ("a built-in tool", {"tools": [{"type": "web_search"}]}, 400, "tools.0.type"),
    ("background", {"background": True}, 400, "background"),
    (
        "an image",
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        400,
        "input.0.content.0.type",
    ),
    (
        "an item reference",
        {"input": [{"type": "item_reference", "id": "msg_1"}]},
        400,
        "input.0.type",
    ),
    (
        "a JSON schema format without its schema",
        {"text": {"format": {"type": "json_schema", "name": "x"}}},
        400,
        "text.format.schema",
    ),
    ("an unknown text format", {"text": {"format": {"type": "yaml"}}}, 400, "text.format"),
    ("tool_choice required without tools", {"tool_choice": "required"}, 400, "tool_choice"),
    (
        "tool_choice naming no tool",
        {"tools": FUNCTIONS, "tool_choice": {"type": "function", "name": "nope"}},
        400,
        "tool_choice",
    ),
    (
        "an allowed_tools tool_choice",
        {"tools": FUNCTIONS, "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}},
        400,
        "tool_choice",
    ),
    ("max_output_tokens zero", {"max_output_tokens": 0}, 400, "max_output_tokens"),
    ("unknown field", {"frobnicate": 1}, 400, "frobnicate"),
    ("unknown model", {"model": "gpt-9"}, 404, "model"),
    (
        "too long with truncation disabled",
        {"input": "token cache engine replica " * 600, "truncation": "disabled"},
        400,
        "input",
    ),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("name", "fields", "status", "param"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_is_refused_naming_the_field(
    base_url: str, name: str, fields: dict[str, Any], status: int, param: str, stream: bool
) -> None:
    body = {"model": MODEL, "input": "hi", "stream": stream, **fields}
    response = httpx.post(f"{base_url}/v1/responses", json=body, headers=AUTH, timeout=60)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param, response.text


def test_refused_and_abandoned_turns_leave_the_conversation_as_it_was(
    client: Any, base_url: str, engine_handle: Any
) -> None:
    conversation = client.conversations.create(items=[{"role": "user", "content": "start"}])
    create(client, input="one", conversation=conversation.id)
    before = [i.id for i in client.conversations.items.list(conversation.id).data]
    stray = [{"type": "function_call_output", "call_id": "call_nope", "output": "x"}]
    with pytest.raises(openai.BadRequestError):
        create(client, input=stray, conversation=conversation.id)

    stats_before = engine_handle.stats.remote().result()
    body = {
        "model": MODEL,
        "input": "write a lot",
        "conversation": conversation.id,
        "max_output_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{base_url}/v1/responses", json=body, headers=AUTH, timeout=60
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(12):
            next(lines)
    # Gone long before 1,500 tokens: the engine request is cancelled and the turn stores nothing.
    deadline = time.monotonic() + 20
    while True:
        stats = engine_handle.stats.remote().result()
        if (
            stats.executor.num_cancelled_requests > stats_before.executor.num_cancelled_requests
            and stats.executor.num_active_requests == 0
        ):
            break
        assert time.monotonic() < deadline, f"the engine request was not cancelled: {stats}"
        time.sleep(0.2)
    generated = stats.executor.num_generated_tokens - stats_before.executor.num_generated_tokens
    assert generated < 1500
    deadline = time.monotonic() + 20
    while True:  # the lease is released once the Router has seen the client leave
        try:
            create(client, input="after", conversation=conversation.id, store=False)
            break
        except openai.ConflictError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    after = [i.id for i in client.conversations.items.list(conversation.id, order="desc").data]
    assert after[2:] == before  # only the last turn's two items are new


def test_truncation_auto_drops_old_turns_where_disabled_refuses(client: Any) -> None:
    filler = "token cache engine replica session " * 90  # ~450 tokens per turn
    previous = None
    for _ in range(4):
        response = create(
            client,
            input=filler,
            previous_response_id=previous,
            truncation="auto",
            max_output_tokens=2,
        )
        previous = response.id
    with pytest.raises(openai.BadRequestError) as refused:
        create(client, input=filler, previous_response_id=previous, max_output_tokens=200)
    assert refused.value.body["code"] == "context_length_exceeded"
    assert refused.value.body["param"] == "max_output_tokens"
    kept = create(
        client,
        input=filler,
        previous_response_id=previous,
        truncation="auto",
        max_output_tokens=200,
    )
    assert kept.usage.input_tokens + 200 <= 2048 and kept.truncation == "auto"
