"""What a turn produces, before it is shaped into an API's objects (`responses.py`): the steps of each choice
as they stream, and each choice's result once it finished. Plain data; no formatting, no I/O."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Protocol

from deployments.protocol import FinishReasonName, SessionTurn


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: str
    logprob: float
    # The most likely tokens at this step, most likely first (`top_logprobs`); empty unless asked for.
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class ContentPiece:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallPiece:
    """A piece of one tool call, as OpenAI streams `delta.tool_calls[i]`: first its id and name, then
    its arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    """One step of one choice: the text that became safe to send, split into content and tool-call pieces
    (chat with tools), the logprobs of the tokens this step releases, and the finish reason on the last."""

    index: int
    text: str
    pieces: list[ContentPiece | ToolCallPiece]
    logprobs: list[TokenLogprob] | None
    token_ids: list[int]
    finish_reason: FinishReasonName | None = None


@dataclass(frozen=True, slots=True)
class ToolCallResult:
    id: str
    name: str
    arguments: str


@dataclass(slots=True)
class ChoiceResult:
    """One finished choice: everything its deltas carried, folded."""

    index: int
    text: str
    content: str | None  # chat: the text outside tool calls; None when nothing but calls is left
    prompt_token_ids: list[int]
    token_ids: list[int]
    tool_calls: list[ToolCallResult] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReasonName = "stop"
    echo: str | None = (
        None  # completions with `echo`: the prompt's text, which the reply repeats first
    )


@dataclass(frozen=True, slots=True)
class TurnUsage:
    prompt_tokens: int
    completion_tokens: int
    # Prompt tokens whose KV the engine reused instead of computing (its prefix cache), as it reported.
    cached_tokens: int = 0
    # The prompt's leading ids that are stored ids the engine has seen before (a continued session or chain):
    # what the Responses API reports as cached, whichever engine serves it.
    num_reused_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class TurnOutput(Protocol):
    """A turn as the formatters read it (`chat.Turn`)."""

    @property
    def response_id(self) -> str: ...

    @property
    def model(self) -> str: ...

    @property
    def choice_indexes(self) -> list[int]: ...

    @property
    def returns_token_ids(self) -> bool:
        """The request asked for token ids in the reply (`return_token_ids`)."""
        ...

    def prompt_token_ids(self, index: int) -> list[int]: ...

    def deltas(self) -> AsyncGenerator[ChoiceDelta, None]:
        """Every choice's steps, interleaved as they arrive; raises ServingError if the engine fails."""
        ...

    def results(self) -> list[ChoiceResult]:
        """Each choice's result, in index order (once `deltas` is exhausted)."""
        ...

    def echo(self, index: int) -> str | None: ...

    def usage(self) -> TurnUsage: ...

    def session(self) -> SessionTurn | None: ...
