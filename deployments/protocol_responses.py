"""OpenAI Responses and Conversations wire shapes: requests in, items both ways, responses and events out.

Items and chat-template messages convert here, in one place: an input item becomes a message that keeps the
item's id (`id`; a tool call keeps its function-call item's id as `item_id`), so a conversation lists the same
ids it was given. Messages written by chat turns (`session_id`) have no ids; theirs derive from their position
and content, and are written into the messages on the first edit, so they never move.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from deployments.errors import RequestError
from deployments.protocol import FinishReasonName, OpenAIBaseModel, StrictRequest

Message = dict[str, Any]
Item = dict[str, Any]
# `include` values that ask for parts of items this server never produces: accepted, nothing to add.
_INCLUDABLE = frozenset(
    {
        "file_search_call.results",
        "web_search_call.results",
        "web_search_call.action.sources",
        "message.input_image.image_url",
        "computer_call_output.output.image_url",
        "code_interpreter_call.outputs",
        "reasoning.encrypted_content",
    }
)
_TEXT_PARTS = ("input_text", "output_text", "text")


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def output_message_id(response_id: str) -> str:
    """The id of a response's message item (the same when streamed, stored and listed)."""
    return "msg_" + response_id.removeprefix("resp_")


def function_call_item_id(call_id: str) -> str:
    """The item id of a function call, from its `call_id` (the same when streamed, stored and listed)."""
    return "fc_" + call_id.removeprefix("call_")


def _check_metadata(value: dict[str, str]) -> dict[str, str]:
    if len(value) > 16:
        raise ValueError("at most 16 key-value pairs")
    for key, text in value.items():
        if len(key) > 64 or len(text) > 512:
            raise ValueError("keys are at most 64 characters and values at most 512")
    return value


# OpenAI's limits on `metadata`.
Metadata = Annotated[dict[str, str], AfterValidator(_check_metadata)]


# ---- input items --------------------------------------------------------------------------------------
class InputMessage(OpenAIBaseModel):
    type: Literal["message"] = "message"
    id: str | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[dict[str, Any]]


class FunctionCallInput(OpenAIBaseModel):
    type: Literal["function_call"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str


class FunctionCallOutputInput(OpenAIBaseModel):
    type: Literal["function_call_output"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    output: str | list[dict[str, Any]]


InputItem = InputMessage | FunctionCallInput | FunctionCallOutputInput
_ITEM_TYPES: dict[str, type[InputItem]] = {
    "message": InputMessage,
    "function_call": FunctionCallInput,
    "function_call_output": FunctionCallOutputInput,
}


def parse_items(raw: list[Any], field: str) -> list[InputItem]:
    """Validates input items one by one, so that a 400 names the item and its field (`input.2.call_id`)."""
    items: list[InputItem] = []
    for index, entry in enumerate(raw):
        where = f"{field}.{index}"
        if not isinstance(entry, dict):
            raise RequestError(f"{where}: an item must be an object", param=where)
        kind = entry.get("type", "message")
        model = _ITEM_TYPES.get(kind) if isinstance(kind, str) else None
        if model is None:
            raise RequestError(
                f"{where}.type: {kind!r} items are not supported; this server takes message, "
                "function_call and function_call_output items (no built-in tools, no item references)",
                param=f"{where}.type",
            )
        try:
            item = model.model_validate(entry)
        except ValidationError as error:
            first = error.errors()[0]
            param = ".".join([where, *(str(part) for part in first["loc"])])
            raise RequestError(f"{param}: {first['msg']}", param=param) from None
        _part_texts(item, where)  # refuses images and files here, before anything is planned
        items.append(item)
    return items


def _part_texts(item: InputItem, where: str) -> str:
    if isinstance(item, FunctionCallInput):
        return item.arguments
    value = item.content if isinstance(item, InputMessage) else item.output
    if isinstance(value, str):
        return value
    name = "content" if isinstance(item, InputMessage) else "output"
    texts = []
    for index, part in enumerate(value):
        kind = part.get("type")
        text = part.get("refusal") if kind == "refusal" else part.get("text")
        if kind not in (*_TEXT_PARTS, "refusal") or not isinstance(text, str):
            param = f"{where}.{name}.{index}.type"
            raise RequestError(
                f"{param}: {kind!r} parts are not supported; this server takes text only",
                param=param,
            )
        texts.append(text)
    return "".join(texts)


def to_messages(items: list[InputItem]) -> tuple[list[Message], list[Item]]:
    """Input items as chat-template messages (consecutive assistant text and calls form one message), and
    as stored items (each with its id, as `input_items` and conversations list them)."""
    messages: list[Message] = []
    stored: list[Item] = []
    for item in items:
        text = _part_texts(item, "")
        if isinstance(item, InputMessage):
            item_id = item.id or new_item_id("msg")
            role = "system" if item.role == "developer" else item.role
            messages.append({"role": role, "content": text, "id": item_id})
            stored.append(_message_item(item_id, item.role, text))
        elif isinstance(item, FunctionCallInput):
            item_id = item.id or function_call_item_id(item.call_id)
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
                "item_id": item_id,
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append(
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [call],
                        "id": new_item_id("msg"),
                    }
                )
            stored.append(_call_item(item_id, item.call_id, item.name, item.arguments))
        else:
            item_id = item.id or new_item_id("fco")
            messages.append(
                {"role": "tool", "tool_call_id": item.call_id, "content": text, "id": item_id}
            )
            stored.append(_output_item(item_id, item.call_id, text))
    return messages, stored


def reply_message(
    response_id: str, content: str | None, tool_calls: list[tuple[str, str, str]]
) -> Message:
    """A response's reply as the history keeps it: `tool_calls` are (call_id, name, arguments)."""
    message: Message = {
        "role": "assistant",
        "content": content or "",
        "id": output_message_id(response_id),
    }
    if tool_calls:
        message["tool_calls"] = [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": arguments},
                "item_id": function_call_item_id(call_id),
            }
            for call_id, name, arguments in tool_calls
        ]
    return message


# ---- messages as items --------------------------------------------------------------------------------
def _message_item(item_id: str, role: str, text: str) -> Item:
    if role == "assistant":
        part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
    else:
        part = {"type": "input_text", "text": text}
    return {
        "id": item_id,
        "type": "message",
        "role": role,
        "status": "completed",
        "content": [part],
    }


def _call_item(item_id: str, call_id: str, name: str, arguments: str) -> Item:
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": "completed",
    }


def _output_item(item_id: str, call_id: str, output: str) -> Item:
    return {
        "id": item_id,
        "type": "function_call_output",
        "call_id": call_id,
        "output": output,
        "status": "completed",
    }


def _derived_id(index: int, message: Message) -> str:
    digest = hashlib.sha256(f"{index}\0{json.dumps(message, sort_keys=True)}".encode()).hexdigest()
    return "msg_" + digest[:32]


def _with_ids(messages: list[Message]) -> list[Message]:
    """Copies of the messages with every item id written in (derived where a chat turn left none)."""
    out = []
    for index, message in enumerate(messages):
        copy = {**message, "id": message.get("id") or _derived_id(index, message)}
        if message.get("tool_calls"):
            copy["tool_calls"] = [
                {**call, "item_id": call.get("item_id") or function_call_item_id(str(call["id"]))}
                for call in message["tool_calls"]
            ]
        out.append(copy)
    return out


def message_items(messages: list[Message]) -> list[Item]:
    """A conversation's messages as items, in order."""
    items: list[Item] = []
    for message in _with_ids(messages):
        role, text = message["role"], str(message.get("content") or "")
        if role == "tool":
            items.append(_output_item(message["id"], str(message.get("tool_call_id")), text))
        elif role != "assistant" or text or not message.get("tool_calls"):
            items.append(_message_item(message["id"], role, text))
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            arguments = function.get("arguments")
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments)
            name = str(function.get("name"))
            items.append(_call_item(call["item_id"], str(call["id"]), name, arguments))
    return items


def without_item(messages: list[Message], item_id: str) -> list[Message] | None:
    """The messages without one item (a message, or one call of an assistant message); None if absent."""
    kept: list[Message] = []
    is_found = False
    for message in _with_ids(messages):
        calls = message.get("tool_calls") or []
        if message["id"] == item_id and not (message["role"] == "assistant" and calls):
            is_found = True
            continue
        if message["id"] == item_id:  # the text of an assistant message that also called tools
            message = {**message, "content": ""}
            is_found = True
        remaining = [call for call in calls if call["item_id"] != item_id]
        if len(remaining) != len(calls):
            is_found = True
            if not remaining and not message.get("content"):
                continue
            message = {**message, "tool_calls": remaining}
            if not remaining:
                del message["tool_calls"]
        kept.append(message)
    return kept if is_found else None


def page(
    items: list[Item], *, after: str | None, limit: int, order: Literal["asc", "desc"]
) -> ItemList:
    """One page of an OpenAI list: `after` is the id of the last item of the previous page."""
    ordered = items if order == "asc" else items[::-1]
    start = 0
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise RequestError(f"after: no item {after!r} in this list", param="after")
        start = ids.index(after) + 1
    data = ordered[start : start + limit]
    return ItemList(
        data=data,
        first_id=data[0]["id"] if data else None,
        last_id=data[-1]["id"] if data else None,
        has_more=start + limit < len(ordered),
    )


# ---- requests -----------------------------------------------------------------------------------------
class FunctionTool(OpenAIBaseModel):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def to_chat_tool(self) -> dict[str, Any]:
        """The chat-template shape (`{"type": "function", "function": {...}}`)."""
        function: dict[str, Any] = {
            "name": self.name,
            "parameters": self.parameters or {"type": "object", "properties": {}},
        }
        if self.description is not None:
            function["description"] = self.description
        return {"type": "function", "function": function}


class ResponsesRequest(StrictRequest):
    """`POST /v1/responses`. Fields this server cannot honour are refused by `planning.py`, naming them."""

    model: str
    input: str | list[Any] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    store: bool | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, gt=0)
    max_tool_calls: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    metadata: Metadata | None = None
    truncation: Literal["auto", "disabled"] | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    background: bool | None = None
    prompt: dict[str, Any] | None = None
    context_management: list[Any] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    service_tier: str | None = None
    # vLLM-compatible extensions (the OpenAI client sends them through `extra_body`).
    top_k: int | None = Field(default=None, ge=0, le=2**31 - 1)
    ignore_eos: bool = Field(
        default=False, description="Generate max_output_tokens, ignoring end tokens."
    )
    return_token_ids: bool = Field(
        default=False,
        description="Debugging: the prompt's token ids and the generated ids in the reply "
        "(`prompt_token_ids`, `output_token_ids`); never stored.",
    )

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str | list):
            raise ValueError("a string or a list of items")
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice_shape(cls, value: Any) -> Any:
        shapes = "'none', 'auto', 'required' or {'type': 'function', 'name': ...}"
        if value is None or value in ("none", "auto", "required"):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{value!r} is not one of {shapes}")
        kind = value.get("type")
        if kind != "function":
            raise ValueError(
                f"{kind!r} tool choices are not supported; this server takes {shapes} "
                "(function tools only)"
            )
        if not isinstance(value.get("name"), str) or not value["name"]:
            raise ValueError(
                "a function tool choice names its function: {'type': 'function', 'name': ...}"
            )
        return value

    @model_validator(mode="after")
    def _check(self) -> ResponsesRequest:
        if self.previous_response_id is not None and self.conversation is not None:
            raise ValueError(
                "previous_response_id cannot be used together with conversation (a response continues "
                "one or the other)"
            )
        if isinstance(self.conversation, dict) and not isinstance(self.conversation.get("id"), str):
            raise ValueError("conversation must be the conversation's id, or {'id': ...}")
        return self

    @property
    def conversation_id(self) -> str | None:
        if isinstance(self.conversation, dict):
            return str(self.conversation["id"])
        return self.conversation

    def input_items(self) -> list[InputItem]:
        """The input as items: a string is one user message."""
        if self.input is None:
            return []
        if isinstance(self.input, str):
            return [InputMessage(role="user", content=self.input)]
        return parse_items(self.input, "input")

    def function_tools(self) -> list[FunctionTool]:
        """Raises RequestError naming a tool that is not a function (web search and other built-in tools)."""
        tools = []
        for index, raw in enumerate(self.tools or []):
            kind = raw.get("type") if isinstance(raw, dict) else None
            if kind != "function":
                raise RequestError(
                    f"tools.{index}.type: {kind!r} tools are not supported; this server runs function "
                    "tools only (built-in tools such as web search need OpenAI's servers)",
                    param=f"tools.{index}.type",
                )
            try:
                tools.append(FunctionTool.model_validate(raw))
            except ValidationError as error:
                first = error.errors()[0]
                param = ".".join([f"tools.{index}", *(str(part) for part in first["loc"])])
                raise RequestError(f"{param}: {first['msg']}", param=param) from None
        return tools

    def forced_function(self) -> tuple[bool, str | None]:
        """(whether the reply must be a function call, the function it must call or None for any of
        `tools`), from `tool_choice` (`required`, or `{"type": "function", "name": ...}`)."""
        if isinstance(self.tool_choice, dict):
            return True, str(self.tool_choice["name"])
        return self.tool_choice == "required", None

    def unsupported_include(self) -> str | None:
        return next((value for value in self.include or [] if value not in _INCLUDABLE), None)


class ConversationCreateRequest(StrictRequest):
    items: list[Any] | None = Field(default=None, max_length=20)
    metadata: Metadata | None = None
    safety_identifier: str | None = None


class ConversationUpdateRequest(StrictRequest):
    metadata: Metadata | None


class ItemsCreateRequest(StrictRequest):
    items: list[Any] = Field(min_length=1, max_length=20)


# ---- responses ----------------------------------------------------------------------------------------
class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class FunctionToolCall(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


OutputItem = OutputMessage | FunctionToolCall


class InputTokensDetails(BaseModel):
    cached_tokens: int
    cache_write_tokens: int = 0  # OpenAI's explicit cache writes; this server has none


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseError(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ConversationRef(BaseModel):
    id: str


ResponseStatus = Literal["completed", "failed", "in_progress", "incomplete"]


def _only_when_set() -> Any:
    return Field(default=None, exclude_if=lambda value: value is None)


class ResponseObject(BaseModel):
    """OpenAI's `Response`; `prompt_token_ids`/`output_token_ids` only with `return_token_ids`."""

    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    completed_at: int | None = None
    status: ResponseStatus
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    conversation: ConversationRef | None = None
    temperature: float | None = None
    top_p: float | None = None
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    truncation: Literal["auto", "disabled"] = "disabled"
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    reasoning: dict[str, Any] = Field(default_factory=lambda: {"effort": None, "summary": None})
    background: bool = False
    store: bool = True
    user: str | None = None
    usage: ResponseUsage | None = None
    prompt_token_ids: list[int] | None = _only_when_set()
    output_token_ids: list[int] | None = _only_when_set()


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


class ItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Item]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ConversationObject(BaseModel):
    id: str
    object: Literal["conversation"] = "conversation"
    created_at: int
    metadata: dict[str, str]


class ConversationDeleted(BaseModel):
    id: str
    object: Literal["conversation.deleted"] = "conversation.deleted"
    deleted: bool = True


# ---- streaming events (each carries `type` and `sequence_number`) ---------------------------------------
class ResponseEvent(BaseModel):
    type: str
    sequence_number: int


class LifecycleEvent(ResponseEvent):
    """`response.created`, `.in_progress`, `.completed`, `.incomplete`, `.failed`."""

    response: ResponseObject


class OutputItemEvent(ResponseEvent):
    """`response.output_item.added` / `.done`."""

    output_index: int
    item: OutputItem


class ContentPartEvent(ResponseEvent):
    """`response.content_part.added` / `.done`."""

    item_id: str
    output_index: int
    content_index: int = 0
    part: OutputText


class TextDeltaEvent(ResponseEvent):
    """`response.output_text.delta`."""

    item_id: str
    output_index: int
    content_index: int = 0
    delta: str
    logprobs: list[Any] = Field(default_factory=list)


class TextDoneEvent(ResponseEvent):
    """`response.output_text.done`."""

    item_id: str
    output_index: int
    content_index: int = 0
    text: str
    logprobs: list[Any] = Field(default_factory=list)


class ArgumentsDeltaEvent(ResponseEvent):
    """`response.function_call_arguments.delta`."""

    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(ResponseEvent):
    """`response.function_call_arguments.done`."""

    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(ResponseEvent):
    """`error`: a failure after the stream began (the status is already 200)."""

    code: str | None
    message: str
    param: str | None


def finish_status(finish_reason: FinishReasonName | None) -> ResponseStatus:
    return "incomplete" if finish_reason == "length" else "completed"
