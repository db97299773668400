"""OpenAI response shapes built from generations: chat (with tool calls and logprobs) and completions,
streaming or whole, one or several choices."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from deployments.generation import Generation, TextEvent
from deployments.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    FunctionCall,
    ResponseMessage,
    ResponseToolCall,
    SessionTurn,
    TokenLogprob,
    ToolCallDelta,
    ToolCallFunctionDelta,
    Usage,
)
from deployments.tool_parsers import ToolCallParser

SessionInfo = Callable[[], SessionTurn | None]


def _no_session() -> SessionTurn | None:
    return None


@dataclass(slots=True)
class Choice:
    """One choice in flight: its generation, the text events to read (a session turn wraps them), and how to
    read them (tool-call parsing, logprobs)."""

    index: int
    generation: Generation
    events: AsyncGenerator[TextEvent, None]
    parser: ToolCallParser | None = None
    tokenizer: Any = None
    has_logprobs: bool = False
    num_tool_calls: int = field(default=0)


def total_usage(choices: list[Choice]) -> Usage:
    """Each prompt counts once, however many choices it has (choices of one prompt share its id list)."""
    prompts = {
        id(c.generation.request.prompt_token_ids): c.generation.num_prompt_tokens for c in choices
    }
    prompt = sum(prompts.values())
    completion = sum(c.generation.num_completion_tokens for c in choices)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _token_logprobs(choice: Choice, pairs: list[tuple[int, float]]) -> ChoiceLogprobs | None:
    if not choice.has_logprobs:
        return None
    content = []
    for token_id, logprob in pairs:
        token = choice.tokenizer.decode([token_id])
        content.append(TokenLogprob(token=token, logprob=logprob, bytes=list(token.encode())))
    return ChoiceLogprobs(content=content)


async def merge(streams: list[AsyncGenerator[Any, None]]) -> AsyncGenerator[Any, None]:
    """Interleave several streams as items arrive (n > 1); one stream passes straight through."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for item in only:
                yield item
        return
    queue: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue()

    async def pump(stream: AsyncGenerator[Any, None]) -> None:
        try:
            async with aclosing(stream):
                async for item in stream:
                    await queue.put((False, item))
            await queue.put((True, None))
        except BaseException as error:
            await queue.put((True, error))

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        remaining = len(tasks)
        while remaining:
            is_end, item = await queue.get()
            if not is_end:
                yield item
                continue
            remaining -= 1
            if isinstance(item, BaseException):
                raise item
    finally:
        for task in tasks:
            task.cancel()


# ---- chat -----------------------------------------------------------------------------------------------
async def _choice_chunks(choice: Choice) -> AsyncGenerator[ChunkChoice, None]:
    async with aclosing(choice.events) as events:
        async for event in events:
            for delta in _deltas(choice, event.text, is_final=event.finish_reason is not None):
                logprobs = _token_logprobs(choice, choice.generation.take_logprobs())
                yield ChunkChoice(index=choice.index, delta=delta, logprobs=logprobs)
            if event.finish_reason is not None:
                finish = "tool_calls" if choice.num_tool_calls else event.finish_reason
                # Tokens that added no text (a special token last, held-back bytes) still have logprobs.
                rest = choice.generation.take_logprobs()
                yield ChunkChoice(
                    index=choice.index,
                    delta=DeltaMessage(),
                    finish_reason=finish,
                    logprobs=_token_logprobs(choice, rest) if rest else None,
                )


def _deltas(choice: Choice, text: str, *, is_final: bool) -> list[DeltaMessage]:
    if choice.parser is None:
        return [DeltaMessage(content=text)] if text else []
    events = choice.parser.feed(text) if text else []
    if is_final:
        events += choice.parser.finish()
    deltas = []
    for event in events:
        if event.content:
            deltas.append(DeltaMessage(content=event.content))
        elif event.tool_call_index is not None:
            if event.name is not None:
                choice.num_tool_calls += 1
            function = ToolCallFunctionDelta(name=event.name, arguments=event.arguments_delta)
            call = ToolCallDelta(
                index=event.tool_call_index,
                id=event.tool_call_id,
                type="function" if event.tool_call_id else None,
                function=function,
            )
            deltas.append(DeltaMessage(tool_calls=[call]))
    return deltas


async def chat_chunks(
    model: str,
    request_id: str,
    choices: list[Choice],
    *,
    include_usage: bool,
    session: SessionInfo = _no_session,
) -> AsyncGenerator[ChatCompletionChunk, None]:
    for choice in choices:
        role = ChunkChoice(index=choice.index, delta=DeltaMessage(role="assistant", content=""))
        yield ChatCompletionChunk(id=request_id, model=model, choices=[role])
    async with aclosing(merge([_choice_chunks(c) for c in choices])) as merged:
        async for chunk_choice in merged:
            is_last = chunk_choice.finish_reason is not None
            yield ChatCompletionChunk(
                id=request_id,
                model=model,
                choices=[chunk_choice],
                session=session() if is_last else None,
            )
    if include_usage:
        yield ChatCompletionChunk(
            id=request_id, model=model, choices=[], usage=total_usage(choices)
        )


async def _chat_choice(choice: Choice) -> ChatChoice:
    text, finish = await collect(choice.events)
    logprobs = _token_logprobs(choice, choice.generation.take_logprobs())
    if choice.parser is None:
        return ChatChoice(
            index=choice.index,
            message=ResponseMessage(content=text),
            logprobs=logprobs,
            finish_reason=finish,
        )
    parsed = choice.parser.parse(text)
    calls = [
        ResponseToolCall(
            id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments)
        )
        for call in parsed.tool_calls
    ]
    message = ResponseMessage(content=parsed.content, tool_calls=calls or None)
    return ChatChoice(
        index=choice.index,
        message=message,
        logprobs=logprobs,
        finish_reason="tool_calls" if calls else finish,
    )


async def chat_response(
    model: str, request_id: str, choices: list[Choice], *, session: SessionInfo = _no_session
) -> ChatCompletionResponse:
    results = await asyncio.gather(*(_chat_choice(c) for c in choices))
    return ChatCompletionResponse(
        id=request_id,
        model=model,
        choices=list(results),
        usage=total_usage(choices),
        session=session(),
    )


# ---- completions ----------------------------------------------------------------------------------------
def _completion_logprobs(
    choice: Choice, pairs: list[tuple[int, float]], offset: int
) -> CompletionLogprobs | None:
    if not choice.has_logprobs:
        return None
    tokens = [choice.tokenizer.decode([token_id]) for token_id, _ in pairs]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[lp for _, lp in pairs],
        top_logprobs=None,
        text_offset=offsets,
    )


async def _completion_choice_chunks(
    choice: Choice, echo_text: str | None
) -> AsyncGenerator[CompletionChoice, None]:
    offset = 0
    if echo_text is not None:
        offset = len(echo_text)
        yield CompletionChoice(index=choice.index, text=echo_text)
    async with aclosing(choice.events) as events:
        async for event in events:
            pairs = choice.generation.take_logprobs()
            logprobs = _completion_logprobs(choice, pairs, offset)
            offset += len(event.text)
            yield CompletionChoice(
                index=choice.index,
                text=event.text,
                finish_reason=event.finish_reason,
                logprobs=logprobs,
            )


async def completion_chunks(
    model: str,
    request_id: str,
    choices: list[Choice],
    echo: list[str | None],
    *,
    include_usage: bool,
) -> AsyncGenerator[CompletionResponse, None]:
    streams = [_completion_choice_chunks(c, e) for c, e in zip(choices, echo, strict=True)]
    async with aclosing(merge(streams)) as merged:
        async for choice in merged:
            yield CompletionResponse(id=request_id, model=model, choices=[choice])
    if include_usage:
        yield CompletionResponse(id=request_id, model=model, choices=[], usage=total_usage(choices))


async def completion_response(
    model: str, request_id: str, choices: list[Choice], echo: list[str | None]
) -> CompletionResponse:
    async def one(choice: Choice, echo_text: str | None) -> CompletionChoice:
        text, finish = await collect(choice.events)
        prefix = echo_text or ""
        logprobs = _completion_logprobs(choice, choice.generation.take_logprobs(), len(prefix))
        return CompletionChoice(
            index=choice.index, text=prefix + text, finish_reason=finish, logprobs=logprobs
        )

    results = await asyncio.gather(*(one(c, e) for c, e in zip(choices, echo, strict=True)))
    return CompletionResponse(
        id=request_id, model=model, choices=list(results), usage=total_usage(choices)
    )


async def collect(events: AsyncGenerator[TextEvent, None]) -> tuple[str, Any]:
    parts: list[str] = []
    finish: Any = "stop"
    async with aclosing(events):
        async for event in events:
            parts.append(event.text)
            finish = event.finish_reason or finish
    return "".join(parts), finish
