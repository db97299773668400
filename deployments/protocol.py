"""OpenAI wire models: what enters and leaves over HTTP (and through Python handles, as dicts)."""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deployments.errors import RequestError

logger = logging.getLogger(__name__)
RequestT = TypeVar("RequestT", bound=BaseModel)


def parse_request(model: type[RequestT], body: Any) -> RequestT:
    """Validate an untrusted body; the 400 names the first offending field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        loc = first["loc"]
        param = ".".join(str(part) for part in loc) or None
        text = str(first["msg"]).removeprefix("Value error, ")
        if param is None:
            # A whole-request check: its message starts with the field it is about.
            candidate = text.split(" ", 1)[0]
            param = candidate if candidate in model.model_fields else None
        message = f"{param}: {text}" if param and not text.startswith(param) else text
        if first["type"] == "extra_forbidden":
            message = f"{param}: unknown field (not part of this API)"
        if len(loc) > 1 and loc[0] == "tools" and isinstance(loc[1], int):
            message += f" (tool {_tool_name(body, loc[1])!r})"
        raise RequestError(message, param=param) from None


def _has_non_finite_number(value: Any) -> bool:
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            return True
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _tool_name(body: dict[str, Any], index: int) -> str | None:
    try:
        return str(body["tools"][index]["function"]["name"])
    except (KeyError, IndexError, TypeError):
        return None


class OpenAIBaseModel(BaseModel):
    """Nested OpenAI objects: unknown fields are tolerated (clients send vendor extras inside messages)."""

    model_config = ConfigDict(extra="allow")


class StrictRequest(BaseModel):
    """Top-level request bodies: an unknown field is a 400 that names it, as OpenAI answers."""

    model_config = ConfigDict(extra="forbid")


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


class FunctionDefinition(OpenAIBaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("type", "object") != "object":
            raise ValueError("a function's parameters must be a JSON Schema of type 'object'")
        if "properties" in value and not isinstance(value["properties"], dict):
            raise ValueError("'properties' must be an object")
        # HTTP bodies are refused at parse (limits.parse_json); this catches handle callers' dicts, whose
        # NaN would be stored and echoed as null.
        if _has_non_finite_number(value):
            raise ValueError("a JSON Schema number must be finite (NaN and Infinity are not JSON)")
        return value


class Tool(OpenAIBaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"]
    function: dict[str, str]


class JsonSchemaFormat(OpenAIBaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    # `schema` would shadow a BaseModel attribute: the wire name is kept with an alias.
    json_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema: required when type is 'json_schema'")
        return self


class StructuredOutputs(StrictRequest):
    """vLLM's `structured_outputs` (sent through the client's `extra_body`): exactly one constraint."""

    json_schema: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = Field(default=None, min_length=1)
    choice: list[str] | None = Field(default=None, min_length=1)
    grammar: str | None = Field(
        default=None, min_length=1, description="A Lark grammar in llguidance's dialect."
    )
    json_object: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [
            name
            for name, value in (
                ("json", self.json_schema),
                ("regex", self.regex),
                ("choice", self.choice),
                ("grammar", self.grammar),
                ("json_object", self.json_object),
            )
            if value
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of json, regex, choice, grammar or json_object"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self


class _SamplingFields(StrictRequest):
    model: str
    max_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    logit_bias: dict[str, float] | None = Field(default=None, max_length=1024)
    response_format: ResponseFormat | None = None
    # vLLM-compatible extras (the OpenAI client sends them through `extra_body`).
    top_k: int | None = Field(default=None, ge=0, le=2**31 - 1)
    # Divides positive logits (multiplies negative ones): bounded so that no row turns inf in bf16/fp32.
    repetition_penalty: float = Field(default=1.0, ge=0.01, le=100.0)
    min_tokens: int = Field(default=0, ge=0, le=2**31 - 1)
    ignore_eos: bool = Field(default=False, description="Generate max_tokens, ignoring end tokens.")
    return_token_ids: bool = Field(
        default=False,
        description="vLLM's extension: the prompt's token ids and each choice's generated ids in the reply "
        "(streamed: the prompt's in the first chunk, each chunk's own ids).",
    )
    structured_outputs: StructuredOutputs | None = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdecimal():
                raise ValueError(f"keys are token ids; {key!r} is not one")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"the bias of token {key} is {bias}; biases lie in [-100, 100]")
        return value

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple(sorted((int(key), bias) for key, bias in (self.logit_bias or {}).items()))

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
    session_id: str | None = Field(
        default=None, min_length=1, description="Continue this server-side session."
    )
    max_completion_tokens: int | None = Field(default=None, gt=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _check_tools(self) -> ChatCompletionRequest:
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.get("name")
            if name not in {tool.function.name for tool in self.tools or []}:
                raise ValueError(f"tool_choice names function {name!r}, which is not in tools")
        elif self.tool_choice in ("auto", "required") and not self.tools:
            raise ValueError(f"tool_choice {self.tool_choice!r} needs tools")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        if not self.tools or self.tool_choice == "none":
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A string, a list of strings, a list of token ids, or a list of such lists."
    )
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if len(value) == 0 or (
            isinstance(value, list) and any(isinstance(p, str | list) and not p for p in value)
        ):
            raise ValueError("prompt must not be empty")
        return value

    def prompts(self) -> list[str | list[int]]:
        """Single-or-batch normalised once: a list of prompts, each text or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


# OpenAI's limits on `metadata`: 16 pairs, keys up to 64 characters, values up to 512.
MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 64, 512


class CreateSessionRequest(StrictRequest):
    """A session's system prompt is capped against the context window when the session is created
    (`sessions/manager.py`), before anything is stored."""

    model: str | None = None
    system_prompt: str | None = None
    tools: list[Tool] | None = None
    metadata: dict[str, str] = Field(default_factory=dict, max_length=16)

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, str]) -> dict[str, str]:
        for key, text in value.items():
            if len(key) > MAX_METADATA_KEY_CHARS:
                raise ValueError(f"keys are at most {MAX_METADATA_KEY_CHARS} characters")
            if len(text) > MAX_METADATA_VALUE_CHARS:
                raise ValueError(
                    f"the value of {key!r} has {len(text)} characters; at most "
                    f"{MAX_METADATA_VALUE_CHARS} are allowed"
                )
        return value


# ---- responses --------------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV the engine reused (its prefix cache)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ToolCallFunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ToolCallFunctionDelta


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[Any] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class SessionTurn(BaseModel):
    """Attached to replies on a session: which session, and what this turn evicted to fit."""

    id: str
    num_turns: int
    num_evicted_messages: int
    evicted_roles: list[str]
    num_prompt_tokens: int
    is_prefix_continued: bool


FinishReasonName = Literal["stop", "length", "tool_calls"]


def _only_when_set() -> Any:
    """An optional field that stays off the wire unless set (vLLM's `return_token_ids` extras)."""
    return Field(default=None, exclude_if=lambda value: value is None)


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReasonName | None = None
    token_ids: list[int] | None = _only_when_set()


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    session: SessionTurn | None = None
    prompt_token_ids: list[int] | None = _only_when_set()


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReasonName
    token_ids: list[int] | None = _only_when_set()


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    session: SessionTurn | None = None
    prompt_token_ids: list[int] | None = _only_when_set()


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[Any] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: CompletionLogprobs | None = None
    prompt_token_ids: list[int] | None = _only_when_set()
    token_ids: list[int] | None = _only_when_set()


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


class TokenizeRequest(StrictRequest):
    """vLLM's /tokenize: either a prompt or chat messages."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(StrictRequest):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
