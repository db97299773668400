"""Responses API objects and stream events (`responses_api.py`) from a scripted token stream through the real
detokenizer and tool-call parser, as `test_responses.py` does for chat; and the item conversions."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from deployments.chat import ChoiceRun
from deployments.errors import EngineError, RequestError
from deployments.generation import Generation
from deployments.messages import FinishReason, GenerateRequest
from deployments.protocol_responses import (
    ResponsesRequest,
    message_items,
    page,
    parse_items,
    to_messages,
    without_item,
)
from deployments.responses_api import ResponseBuilder
from deployments.tool_parsers import get_tool_parser
from tests.unit.test_responses import REPLY, _Cancellable, _model, _Replay, _turn

TOOLS = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]


async def _builder(
    tokenizer: Any, text: str, *, tools: bool = True, finish: FinishReason = FinishReason.END_ID
) -> ResponseBuilder:
    request = GenerateRequest(request_id="resp_abc", prompt_token_ids=[1, 2, 3], max_tokens=100)
    replay = _Replay(tokenizer.encode(text), step=2, finish=finish)
    generation = Generation(replay, request, tokenizer, skip_special_tokens=not tools)
    await generation.start()
    parser = get_tool_parser("hermes", make_id=lambda: "call_fixed") if tools else None
    run = ChoiceRun(
        0, generation, _model(tokenizer), parser=parser, has_logprobs=False, is_chat=True
    )
    body = ResponsesRequest(model="m", input="weather?", tools=TOOLS if tools else None)
    return ResponseBuilder(_turn([run], "resp_abc"), body)


def test_stream_events_follow_openai_order_with_consecutive_sequence_numbers(
    tokenizer: Any,
) -> None:
    async def main() -> list[Any]:
        builder = await _builder(tokenizer, REPLY)
        return [event async for event in builder.events()]

    events = asyncio.run(main())
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert "<tool_call>" not in text and text.strip() == "Let me check."
    message_done = kinds.index("response.output_item.done")
    assert kinds[message_done - 2 : message_done] == [
        "response.output_text.done",
        "response.content_part.done",
    ]
    call_added = next(e for e in events[message_done:] if e.type == "response.output_item.added")
    assert call_added.item.call_id == "call_fixed" and call_added.item.id == "fc_fixed"
    arguments = "".join(
        e.delta for e in events if e.type == "response.function_call_arguments.delta"
    )
    assert json.loads(arguments) == {"city": "東京"}
    assert kinds[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = events[-1].response
    assert final.status == "completed" and final.usage.output_tokens > 0
    message, call = final.output
    assert message.id == "msg_abc" and message.content[0].text == text
    assert (call.type, call.name, call.status) == ("function_call", "get_weather", "completed")


def test_the_whole_response_equals_the_streamed_one_and_the_sdk_reads_it(tokenizer: Any) -> None:
    from openai.types.responses import Response

    async def main() -> tuple[Any, Any]:
        streamed = [event async for event in (await _builder(tokenizer, REPLY)).events()]
        whole = await (await _builder(tokenizer, REPLY)).whole()
        return streamed[-1].response, whole

    streamed, whole = asyncio.run(main())
    assert whole.output == streamed.output and whole.status == "completed"
    parsed = Response.model_validate(whole.model_dump(mode="json"))
    assert parsed.output_text.strip() == "Let me check."
    assert parsed.usage.input_tokens_details.cached_tokens == 0


def test_a_reply_cut_by_max_output_tokens_is_incomplete(tokenizer: Any) -> None:
    async def main() -> Any:
        builder = await _builder(
            tokenizer, "plain words here", tools=False, finish=FinishReason.LENGTH
        )
        return [event async for event in builder.events()]

    events = asyncio.run(main())
    final = events[-1]
    assert final.type == "response.incomplete"
    assert final.response.incomplete_details.reason == "max_output_tokens"
    assert final.response.output[0].status == "incomplete"


def test_a_stream_that_breaks_ends_with_an_error_event_and_a_failed_response(
    tokenizer: Any,
) -> None:
    class _Breaking(_Replay):
        async def open(self, request: GenerateRequest) -> Any:
            stream = await super().open(request)

            async def first_then_fail() -> Any:
                yield await stream.__anext__()
                raise EngineError("the engine stopped")

            return _Cancellable(first_then_fail())

    async def main() -> list[Any]:
        request = GenerateRequest(request_id="resp_abc", prompt_token_ids=[1], max_tokens=100)
        generation = Generation(
            _Breaking(tokenizer.encode("some words and more")), request, tokenizer
        )
        await generation.start()
        run = ChoiceRun(
            0, generation, _model(tokenizer), parser=None, has_logprobs=False, is_chat=True
        )
        builder = ResponseBuilder(_turn([run], "resp_abc"), ResponsesRequest(model="m", input="x"))
        events = []
        with pytest.raises(EngineError) as raised:
            async for event in builder.events():
                events.append(event)
        return events + builder.failed(raised.value)

    events = asyncio.run(main())
    assert [e.sequence_number for e in events] == list(range(len(events)))
    error, failed = events[-2:]
    assert error.type == "error" and error.message == "the engine stopped"
    assert failed.type == "response.failed" and failed.response.error.code == "server_error"
    assert failed.response.usage is not None and events[-3].type == "response.output_text.delta"


# ---- items -----------------------------------------------------------------------------------------
def test_items_become_messages_that_keep_their_ids_and_list_back_the_same() -> None:
    raw = [
        {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
        {
            "type": "message",
            "id": "msg_1",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Checking."}],
        },
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": "{}",
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]
    messages, items = to_messages(parse_items(raw, "input"))
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert (
        messages[1]["content"] == "Checking." and messages[1]["tool_calls"][0]["item_id"] == "fc_1"
    )
    listed = message_items(messages)
    assert [i["id"] for i in listed] == [i["id"] for i in items]
    assert [i["type"] for i in listed] == [
        "message",
        "message",
        "function_call",
        "function_call_output",
    ]
    # Removing the call keeps the assistant text; removing the text too drops the message.
    without_call = without_item(messages, "fc_1")
    assert without_call is not None and without_call[1] == {
        "role": "assistant",
        "content": "Checking.",
        "id": "msg_1",
    }
    without_text = without_item(without_call, "msg_1")
    assert without_text is not None and [m["role"] for m in without_text] == ["user", "tool"]
    assert without_item(messages, "nope") is None


def test_chat_written_messages_get_stable_ids_that_an_edit_writes_in() -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    first, second = message_items(messages), message_items(messages)
    assert [i["id"] for i in first] == [i["id"] for i in second]
    edited = without_item(messages, first[0]["id"])
    assert edited is not None and [m["id"] for m in edited] == [first[1]["id"]]


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ([{"type": "web_search_call", "id": "ws"}], "input.0.type"),
        (
            [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}],
            "input.0.content.0.type",
        ),
        ([{"type": "function_call_output", "output": "x"}], "input.0.call_id"),
        (["just a string"], "input.0"),
        ([{"role": "robot", "content": "x"}], "input.0.role"),
    ],
)
def test_unsupported_or_malformed_items_are_refused_naming_the_field(raw: Any, param: str) -> None:
    with pytest.raises(RequestError) as raised:
        parse_items(raw, "input")
    assert raised.value.param == param


def test_pages_follow_openai_cursor_lists() -> None:
    items = [{"id": f"i{k}"} for k in range(5)]
    first = page(items, after=None, limit=2, order="desc")
    assert (
        [i["id"] for i in first.data] == ["i4", "i3"] and first.has_more and first.last_id == "i3"
    )
    rest = page(items, after="i3", limit=10, order="desc")
    assert [i["id"] for i in rest.data] == ["i2", "i1", "i0"] and not rest.has_more
    with pytest.raises(RequestError):
        page(items, after="nope", limit=2, order="asc")
