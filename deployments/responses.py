"""OpenAI response shapes built from a stream of text events (chat and completions, streaming or whole)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from deployments.generation import Generation, TextEvent
from deployments.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChunkChoice,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
    ResponseMessage,
    SessionTurn,
)

SessionInfo = Callable[[], SessionTurn | None]


def _no_session() -> SessionTurn | None:
    return None


async def chat_chunks(
    model: str,
    generation: Generation,
    events: AsyncIterator[TextEvent],
    *,
    include_usage: bool,
    session: SessionInfo = _no_session,
) -> AsyncIterator[ChatCompletionChunk]:
    request_id = generation.request.request_id

    def chunk(delta: DeltaMessage, finish: Any = None, **extra: Any) -> ChatCompletionChunk:
        choice = ChunkChoice(delta=delta, finish_reason=finish)
        return ChatCompletionChunk(id=request_id, model=model, choices=[choice], **extra)

    yield chunk(DeltaMessage(role="assistant", content=""))
    async with aclosing(events):
        async for event in events:
            if event.finish_reason is not None:
                yield chunk(DeltaMessage(content=event.text or None), event.finish_reason, session=session())
            elif event.text:
                yield chunk(DeltaMessage(content=event.text))
    if include_usage:
        yield ChatCompletionChunk(id=request_id, model=model, choices=[], usage=generation.usage())


async def chat_response(
    model: str, generation: Generation, events: AsyncIterator[TextEvent], *, session: SessionInfo = _no_session
) -> ChatCompletionResponse:
    text, finish = await collect(events)
    return ChatCompletionResponse(
        id=generation.request.request_id,
        model=model,
        choices=[ChatChoice(message=ResponseMessage(content=text), finish_reason=finish)],
        usage=generation.usage(),
        session=session(),
    )


async def completion_chunks(
    model: str, generation: Generation, *, echo_text: str | None, include_usage: bool
) -> AsyncIterator[CompletionResponse]:
    request_id = generation.request.request_id
    if echo_text is not None:
        yield CompletionResponse(id=request_id, model=model, choices=[CompletionChoice(text=echo_text)])
    async with aclosing(generation.events()) as events:
        async for event in events:
            choice = CompletionChoice(text=event.text, finish_reason=event.finish_reason)
            yield CompletionResponse(id=request_id, model=model, choices=[choice])
    if include_usage:
        yield CompletionResponse(id=request_id, model=model, choices=[], usage=generation.usage())


async def completion_response(model: str, generation: Generation, *, echo_text: str | None) -> CompletionResponse:
    text, finish = await collect(generation.events())
    choice = CompletionChoice(text=(echo_text or "") + text, finish_reason=finish)
    return CompletionResponse(
        id=generation.request.request_id, model=model, choices=[choice], usage=generation.usage()
    )


async def collect(events: AsyncIterator[TextEvent]) -> tuple[str, Any]:
    parts: list[str] = []
    finish: Any = "stop"
    async with aclosing(events):
        async for event in events:
            parts.append(event.text)
            finish = event.finish_reason or finish
    return "".join(parts), finish
