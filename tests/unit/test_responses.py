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
from deployments.chat import ChoiceRun, Turn
from deployments.generation import Generation
from deployments.messages import FinishReason, GenerateRequest, TokenDelta
from deployments.served_model import ServedModel
from deployments.templating import ChatTemplate
from deployments.tool_parsers import get_tool_parser

REPLY = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "東京"}}\n</tool_call>'


class _Replay:
    """Stands in for the Router's `EngineClient`: yields the reply's ids `step` at a time."""

    def __init__(
        self,
        token_ids: list[int],
        step: int = 3,
        finish: FinishReason = FinishReason.END_ID,
        num_cached_tokens: int = 0,
    ) -> None:
        self._token_ids = token_ids
        self._step = step
        self._finish = finish
        self._num_cached_tokens = num_cached_tokens

    async def open(self, request: GenerateRequest) -> _Cancellable:
        async def stream() -> AsyncIterator[TokenDelta]:
            ids, step = self._token_ids, self._step
            for start in range(0, len(ids), step):
                is_last = start + step >= len(ids)
                yield TokenDelta(
                    token_ids=ids[start : start + step],
                    finish_reason=self._finish if is_last else None,
                    logprobs=[-0.5] * len(ids[start : start + step]),
                    num_prompt_tokens=len(request.prompt_token_ids) if start == 0 else 0,
                    num_cached_tokens=self._num_cached_tokens if start == 0 else 0,
                )

        return _Cancellable(stream())


class _Cancellable:
    def __init__(self, inner: AsyncIterator[TokenDelta]) -> None:
        self._inner = inner

    def __anext__(self) -> Any:
        return self._inner.__anext__()

    def cancel(self) -> None:
        pass


def _model(tokenizer: Any) -> ServedModel:
    return ServedModel("m", 2048, ChatTemplate(tokenizer), tool_parser_family="hermes")


async def _choice(tokenizer: Any, index: int = 0) -> ChoiceRun:
    token_ids = tokenizer.encode(REPLY)
    request = GenerateRequest(request_id=f"r{index}", prompt_token_ids=[1, 2, 3], max_tokens=100)
    generation = Generation(_Replay(token_ids), request, tokenizer, skip_special_tokens=False)
    await generation.start()
    return ChoiceRun(
        index,
        generation,
        _model(tokenizer),
        parser=get_tool_parser("hermes", make_id=lambda: "call_fixed"),
        has_logprobs=True,
        is_chat=True,
    )


def _turn(runs: list[ChoiceRun], response_id: str = "chatcmpl-1") -> Turn:
    return Turn(response_id, "m", runs)


def test_whole_reply_carries_tool_calls_and_finish_reason(tokenizer: Any) -> None:
    async def main() -> Any:
        return await responses.chat_response(_turn([await _choice(tokenizer)]))

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
        chunks = responses.chat_chunks(_turn([await _choice(tokenizer)]), include_usage=True)
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
        chunks = responses.chat_chunks(_turn(choices, "c"), include_usage=False)
        return [chunk async for chunk in chunks]

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
        choice = ChoiceRun(
            0, generation, _model(tokenizer), parser=None, has_logprobs=True, is_chat=True
        )
        chunks = responses.chat_chunks(_turn([choice], "c"), include_usage=True)
        return [chunk async for chunk in chunks]

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


def test_usage_reports_the_cached_prompt_tokens_once_per_prompt(tokenizer: Any) -> None:
    """Two choices of one prompt (`n=2`): the prompt and its cached tokens count once, the better match wins."""
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]
    token_ids = tokenizer.encode("a short reply")

    async def run(num_cached: int, index: int) -> ChoiceRun:
        request = GenerateRequest(request_id=f"r{index}", prompt_token_ids=prompt, max_tokens=50)
        replay = _Replay(token_ids, num_cached_tokens=num_cached)
        generation = Generation(replay, request, tokenizer)
        await generation.start()
        return ChoiceRun(
            index, generation, _model(tokenizer), parser=None, has_logprobs=False, is_chat=True
        )

    async def main() -> tuple[Any, list[Any]]:
        whole = await responses.chat_response(_turn([await run(0, 0), await run(4, 1)]))
        chunks = responses.chat_chunks(_turn([await run(4, 0)], "c"), include_usage=True)
        return whole, [chunk async for chunk in chunks]

    whole, chunks = asyncio.run(main())
    assert whole.usage.prompt_tokens == len(prompt)
    assert whole.usage.prompt_tokens_details.cached_tokens == 4
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 4
    assert chunks[-1].model_dump(exclude_none=True)["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 4
    }
