"""Chat response shapes for tool calls, from a scripted token stream through the real detokenizer and parser.

The embedded model is random and never writes a tool call, so the engine side here replays the token ids of a
literal Hermes-format reply; everything after the engine (Generation, detokenizer, parser, chunks) is real.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from deployments import responses
from deployments.generation import Generation
from deployments.messages import FinishReason, GenerateRequest, TokenDelta
from deployments.tool_parsers import get_tool_parser

REPLY = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "東京"}}\n</tool_call>'


class _Replay:
    """Stands in for the Router's `EngineClient`: yields the reply's ids `step` at a time."""

    def __init__(
        self, token_ids: list[int], step: int = 3, finish: FinishReason = FinishReason.END_ID
    ) -> None:
        self._token_ids = token_ids
        self._step = step
        self._finish = finish

    async def open(self, request: GenerateRequest) -> _Cancellable:
        async def stream() -> AsyncIterator[TokenDelta]:
            ids, step = self._token_ids, self._step
            for start in range(0, len(ids), step):
                is_last = start + step >= len(ids)
                yield TokenDelta(
                    token_ids=ids[start : start + step],
                    finish_reason=self._finish if is_last else None,
                    logprobs=[-0.5] * len(ids[start : start + step]),
                )

        return _Cancellable(stream())


class _Cancellable:
    def __init__(self, inner: AsyncIterator[TokenDelta]) -> None:
        self._inner = inner

    def __anext__(self) -> Any:
        return self._inner.__anext__()

    def cancel(self) -> None:
        pass


async def _choice(tokenizer: Any, index: int = 0) -> responses.Choice:
    token_ids = tokenizer.encode(REPLY)
    request = GenerateRequest(request_id=f"r{index}", prompt_token_ids=[1, 2, 3], max_tokens=100)
    generation = Generation(_Replay(token_ids), request, tokenizer, skip_special_tokens=False)
    await generation.start()
    return responses.Choice(
        index=index,
        generation=generation,
        events=generation.events(),
        parser=get_tool_parser("hermes", make_id=lambda: "call_fixed"),
        tokenizer=tokenizer,
        has_logprobs=True,
    )


def test_whole_reply_carries_tool_calls_and_finish_reason(tokenizer: Any) -> None:
    async def main() -> Any:
        return await responses.chat_response("m", "chatcmpl-1", [await _choice(tokenizer)])

    reply = asyncio.run(main())
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    call = choice.message.tool_calls[0]
    assert (call.id, call.function.name) == ("call_fixed", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "東京"}
    assert len(choice.logprobs.content) == reply.usage.completion_tokens


def test_streamed_tool_call_deltas_follow_openai_and_never_leak_markup(tokenizer: Any) -> None:
    async def main() -> list[Any]:
        chunks = responses.chat_chunks(
            "m", "chatcmpl-1", [await _choice(tokenizer)], include_usage=True
        )
        return [chunk async for chunk in chunks]

    chunks = asyncio.run(main())
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    assert "<tool_call>" not in content and content.strip() == "Let me check."
    calls = [call for d in deltas for call in d.tool_calls or []]
    assert (
        calls[0].index == 0
        and calls[0].id == "call_fixed"
        and calls[0].function.name == "get_weather"
    )
    arguments = "".join(call.function.arguments or "" for call in calls)
    assert json.loads(arguments) == {"city": "東京"}
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["tool_calls"]
    assert chunks[-1].usage is not None and chunks[-1].choices == []


def test_several_choices_are_interleaved_with_their_indexes(tokenizer: Any) -> None:
    async def main() -> list[Any]:
        choices = [await _choice(tokenizer, 0), await _choice(tokenizer, 1)]
        return [
            chunk async for chunk in responses.chat_chunks("m", "c", choices, include_usage=False)
        ]

    chunks = asyncio.run(main())
    finished = sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason)
    assert finished == [0, 1]


def test_streamed_logprobs_cover_a_last_token_that_adds_no_text(tokenizer: Any) -> None:
    """The last token decodes to nothing (a special token, skipped): its logprob rides the finish chunk."""
    token_ids = [*tokenizer.encode("Hello there"), tokenizer.convert_tokens_to_ids("<|im_end|>")]
    request = GenerateRequest(request_id="r", prompt_token_ids=[1, 2, 3], max_tokens=len(token_ids))

    async def main() -> list[Any]:
        replay = _Replay(token_ids, step=1, finish=FinishReason.LENGTH)
        generation = Generation(replay, request, tokenizer, skip_special_tokens=True)
        await generation.start()
        choice = responses.Choice(
            index=0,
            generation=generation,
            events=generation.events(),
            parser=None,
            tokenizer=tokenizer,
            has_logprobs=True,
        )
        return [
            chunk async for chunk in responses.chat_chunks("m", "c", [choice], include_usage=True)
        ]

    chunks = asyncio.run(main())
    entries = [
        entry
        for chunk in chunks
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content
    ]
    assert len(entries) == len(token_ids) == chunks[-1].usage.completion_tokens
    assert entries[-1].token == "<|im_end|>"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
