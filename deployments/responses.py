"""OpenAI chat and completion objects from a turn (`outputs.TurnOutput`): streamed chunks or one whole
response, one or several choices. Formatting only: the turn has already detokenized and parsed."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Literal

from deployments.outputs import ChoiceDelta, ContentPiece, TokenLogprob, TurnOutput, TurnUsage
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
    FinishReasonName,
    FunctionCall,
    PromptTokensDetails,
    ResponseMessage,
    ResponseToolCall,
    ToolCallDelta,
    ToolCallFunctionDelta,
    Usage,
)
from deployments.protocol import TokenLogprob as WireTokenLogprob


def usage(turn_usage: TurnUsage) -> Usage:
    return Usage(
        prompt_tokens=turn_usage.prompt_tokens,
        completion_tokens=turn_usage.completion_tokens,
        total_tokens=turn_usage.total_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=turn_usage.cached_tokens),
    )


async def _drain(turn: TurnOutput) -> None:
    async with aclosing(turn.deltas()) as deltas:
        async for _ in deltas:
            pass


# ---- chat -----------------------------------------------------------------------------------------------
def _chat_logprobs(logprobs: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
    if logprobs is None:
        return None
    return ChoiceLogprobs(
        content=[
            WireTokenLogprob(
                token=lp.token,
                logprob=lp.logprob,
                bytes=list(lp.token.encode()),
                top_logprobs=[
                    {"token": token, "logprob": logprob, "bytes": list(token.encode())}
                    for token, logprob in lp.top
                ],
            )
            for lp in logprobs
        ]
    )


def _chunk_choices(delta: ChoiceDelta, returns_token_ids: bool) -> list[ChunkChoice]:
    """One chunk per piece (the first carries the step's logprobs and token ids), then the finish chunk."""
    choices = []
    for position, piece in enumerate(delta.pieces):
        if isinstance(piece, ContentPiece):
            message = DeltaMessage(content=piece.text)
        else:
            call = ToolCallDelta(
                index=piece.index,
                id=piece.id,
                type="function" if piece.id else None,
                function=ToolCallFunctionDelta(name=piece.name, arguments=piece.arguments),
            )
            message = DeltaMessage(tool_calls=[call])
        logprobs = delta.logprobs if position == 0 else ([] if delta.logprobs is not None else None)
        choices.append(
            ChunkChoice(
                index=delta.index,
                delta=message,
                logprobs=_chat_logprobs(logprobs),
                token_ids=delta.token_ids if returns_token_ids and position == 0 else None,
            )
        )
    if delta.finish_reason is not None:
        # Tokens that added no text (a special token last, held-back bytes) still have logprobs.
        rest = delta.logprobs if not delta.pieces and delta.logprobs else None
        choices.append(
            ChunkChoice(
                index=delta.index,
                delta=DeltaMessage(),
                finish_reason=delta.finish_reason,
                logprobs=_chat_logprobs(rest),
                token_ids=delta.token_ids if returns_token_ids and not delta.pieces else None,
            )
        )
    return choices


async def chat_chunks(
    turn: TurnOutput, *, include_usage: bool
) -> AsyncGenerator[ChatCompletionChunk, None]:
    response_id, model, returns_token_ids = turn.response_id, turn.model, turn.returns_token_ids
    for index in turn.choice_indexes:
        role = ChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))
        yield ChatCompletionChunk(
            id=response_id,
            model=model,
            choices=[role],
            prompt_token_ids=turn.prompt_token_ids(index) if returns_token_ids else None,
        )
    async with aclosing(turn.deltas()) as deltas:
        async for delta in deltas:
            for choice in _chunk_choices(delta, returns_token_ids):
                is_last = choice.finish_reason is not None
                yield ChatCompletionChunk(
                    id=response_id,
                    model=model,
                    choices=[choice],
                    session=turn.session() if is_last else None,
                )
    if include_usage:
        yield ChatCompletionChunk(
            id=response_id, model=model, choices=[], usage=usage(turn.usage())
        )


async def chat_response(turn: TurnOutput) -> ChatCompletionResponse:
    await _drain(turn)
    choices = []
    results = turn.results()
    for result in results:
        calls = [
            ResponseToolCall(
                id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments)
            )
            for call in result.tool_calls
        ]
        choices.append(
            ChatChoice(
                index=result.index,
                message=ResponseMessage(content=result.content, tool_calls=calls or None),
                logprobs=_chat_logprobs(result.logprobs),
                finish_reason=result.finish_reason,
                token_ids=result.token_ids if turn.returns_token_ids else None,
            )
        )
    return ChatCompletionResponse(
        id=turn.response_id,
        model=turn.model,
        choices=choices,
        usage=usage(turn.usage()),
        session=turn.session(),
        # Every choice of a chat request continues the same prompt.
        prompt_token_ids=results[0].prompt_token_ids if turn.returns_token_ids else None,
    )


# ---- completions ----------------------------------------------------------------------------------------
def _completion_finish(finish_reason: FinishReasonName | None) -> Literal["stop", "length"] | None:
    # A completion has no tool-call parser, so "tool_calls" never comes; narrowed for the wire type.
    return "length" if finish_reason == "length" else (None if finish_reason is None else "stop")


def _completion_logprobs(
    logprobs: list[TokenLogprob] | None, offset: int
) -> CompletionLogprobs | None:
    if logprobs is None:
        return None
    offsets = []
    for logprob in logprobs:
        offsets.append(offset)
        offset += len(logprob.token)
    # The legacy format maps each alternative's text to its logprob (alternatives with equal text collide).
    has_top = any(lp.top for lp in logprobs)
    return CompletionLogprobs(
        tokens=[lp.token for lp in logprobs],
        token_logprobs=[lp.logprob for lp in logprobs],
        top_logprobs=[dict(lp.top) for lp in logprobs] if has_top else None,
        text_offset=offsets,
    )


async def completion_chunks(
    turn: TurnOutput, *, include_usage: bool
) -> AsyncGenerator[CompletionResponse, None]:
    response_id, model, returns_token_ids = turn.response_id, turn.model, turn.returns_token_ids
    offsets: dict[int, int] = {}
    for index in turn.choice_indexes:
        echo = turn.echo(index)
        offsets[index] = len(echo) if echo is not None else 0
        if echo is not None or returns_token_ids:
            choice = CompletionChoice(
                index=index,
                text=echo or "",
                prompt_token_ids=turn.prompt_token_ids(index) if returns_token_ids else None,
            )
            yield CompletionResponse(id=response_id, model=model, choices=[choice])
    async with aclosing(turn.deltas()) as deltas:
        async for delta in deltas:
            choice = CompletionChoice(
                index=delta.index,
                text=delta.text,
                finish_reason=delta.finish_reason
                if delta.finish_reason != "tool_calls"
                else "stop",
                logprobs=_completion_logprobs(delta.logprobs, offsets[delta.index]),
            )
            offsets[delta.index] += len(delta.text)
            yield CompletionResponse(id=response_id, model=model, choices=[choice])
    if include_usage:
        yield CompletionResponse(id=response_id, model=model, choices=[], usage=usage(turn.usage()))


async def completion_response(turn: TurnOutput) -> CompletionResponse:
    await _drain(turn)
    choices = []
    for result in turn.results():
        prefix = result.echo or ""
        choices.append(
            CompletionChoice(
                index=result.index,
                text=prefix + result.text,
                finish_reason=result.finish_reason
                if result.finish_reason != "tool_calls"
                else "stop",
                logprobs=_completion_logprobs(result.logprobs, len(prefix)),
            )
        )
    return CompletionResponse(
        id=turn.response_id, model=turn.model, choices=choices, usage=usage(turn.usage())
    )
