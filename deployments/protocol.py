"""OpenAI wire models: what enters and leaves over HTTP (and through Python handles, as dicts)."""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

logger = logging.getLogger(__name__)


class OpenAIBaseModel(BaseModel):
    """Accepts unknown fields (clients send vendor extras) but logs their names once per model class."""

    model_config = ConfigDict(extra="allow")
    _warned: set[tuple[str, str]] = set()  # noqa: RUF012 - class-level de-duplication of warnings

    @model_validator(mode="after")
    def _log_ignored_fields(self) -> OpenAIBaseModel:
        if self.model_extra:
            for name in self.model_extra:
                key = (type(self).__name__, name)
                if key not in OpenAIBaseModel._warned:
                    OpenAIBaseModel._warned.add(key)
                    logger.warning("%s: ignoring unsupported field %r", key[0], name)
        return self


# ---- requests ---------------------------------------------------------------------------------------
class ContentPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(OpenAIBaseModel):
    name: str
    arguments: str


class ToolCall(OpenAIBaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def to_template_dict(self) -> dict[str, Any]:
        """The shape chat templates expect: string content, `developer` folded into `system`."""
        message: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text(),
        }
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class _SamplingFields(OpenAIBaseModel):
    model: str
    max_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None
    ignore_eos: bool = Field(default=False, description="vLLM extra: generate max_tokens, ignoring end tokens.")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return [s for s in stops if s]

    def stop_strings(self) -> list[str]:
        return list(self.stop or [])  # normalised to a list by the validator


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    session_id: str | None = Field(default=None, description="Continue this server-side session.")
    max_completion_tokens: int | None = Field(default=None, gt=0)
    logprobs: bool = False
    tools: list[dict[str, Any]] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] = Field(description="A string or a list of token ids.")
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: str | list[int]) -> str | list[int]:
        if len(value) == 0:
            raise ValueError("prompt must not be empty")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class CreateSessionRequest(OpenAIBaseModel):
    model: str | None = None
    system_prompt: str | None = None
    tools: list[dict[str, Any]] | None = None
    metadata: dict[str, str] = Field(default_factory=dict, max_length=16)


# ---- responses --------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class SessionTurn(BaseModel):
    """Attached to replies on a session: which session, and what this turn evicted to fit."""

    id: str
    num_turns: int
    num_evicted_messages: int
    evicted_roles: list[str]
    num_prompt_tokens: int
    is_prefix_continued: bool


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    session: SessionTurn | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    session: SessionTurn | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class CompletionResponse(BaseModel):
    """Used both for whole responses and for stream chunks (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "shepherd-serve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class EvictionView(BaseModel):
    at_turn: int
    num_messages: int
    num_tokens_freed: int
    roles: list[str]
    created_at: float


class SessionView(BaseModel):
    id: str
    object: Literal["session"] = "session"
    model: str
    created_at: float
    updated_at: float
    system_prompt: str | None
    tools: list[dict[str, Any]] | None
    metadata: dict[str, str]
    messages: list[dict[str, Any]]
    num_turns: int
    num_tokens: int
    context_window: int
    num_evicted_messages: int
    evictions: list[EvictionView]
    num_template_breaks: int


class SessionDeleted(BaseModel):
    id: str
    object: Literal["session.deleted"] = "session.deleted"
    deleted: bool = True
