"""OpenAI Responses objects and their semantic stream events from a turn (`outputs.TurnOutput`).

Formatting only: the turn has detokenized and parsed; this shapes its steps into output items (a message with
one `output_text` part, then a `function_call` item per tool call) and numbers every event. The streamed
events and the whole response come from the same builder, so both show the same items and ids.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Iterator
from contextlib import aclosing

from deployments.errors import ServingError
from deployments.outputs import ContentPiece, TurnOutput
from deployments.protocol import FinishReasonName
from deployments.protocol_responses import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    ConversationRef,
    ErrorEvent,
    FunctionToolCall,
    IncompleteDetails,
    InputTokensDetails,
    LifecycleEvent,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    ResponseError,
    ResponseEvent,
    ResponseObject,
    ResponsesRequest,
    ResponseStatus,
    ResponseUsage,
    TextDeltaEvent,
    TextDoneEvent,
    finish_status,
    function_call_item_id,
    output_message_id,
)

TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


class ResponseBuilder:
    """Builds one response from a turn: `events()` for a stream, `response()` once it is over.

    `events()` yields `response.created` and `response.in_progress`, the item events as the turn's deltas
    arrive, and last `response.completed` (or `response.incomplete` when `max_output_tokens` cut it).
    A stream that breaks ends with `failed(error)`: an `error` event, then `response.failed`.
    """

    def __init__(self, turn: TurnOutput, request: ResponsesRequest) -> None:
        self._turn = turn
        self._request = request
        self._created_at = int(time.time())
        self._output: list[OutputItem] = []
        self._open: OutputItem | None = None
        self._finish: FinishReasonName | None = None
        self._num_events = 0

    # ---- the stream ----------------------------------------------------------------------------------
    async def events(self) -> AsyncGenerator[ResponseEvent, None]:
        yield self._lifecycle("response.created", self.response("in_progress"))
        yield self._lifecycle("response.in_progress", self.response("in_progress"))
        async with aclosing(self._turn.deltas()) as deltas:
            async for delta in deltas:
                for piece in delta.pieces:
                    if isinstance(piece, ContentPiece):
                        for event in self._text(piece.text):
                            yield event
                        continue
                    if piece.id is not None:  # a new call: its id and name come first
                        for event in self._close_open():
                            yield event
                        for event in self._open_call(piece.id, piece.name or ""):
                            yield event
                    if piece.arguments:
                        for event in self._arguments(piece.arguments):
                            yield event
                if delta.finish_reason is not None:
                    self._finish = delta.finish_reason
        if not self._output:
            for event in self._text(""):  # nothing was generated: still one (empty) message
                yield event
        for event in self._close_open():
            yield event
        status = finish_status(self._finish)
        yield self._lifecycle(f"response.{status}", self.response(status))

    async def whole(self) -> ResponseObject:
        """The finished response without a stream: the events drained, the last response returned."""
        final: ResponseObject | None = None
        async with aclosing(self.events()) as events:
            async for event in events:
                if isinstance(event, LifecycleEvent) and event.type in TERMINAL_EVENTS:
                    final = event.response
        assert final is not None, "events() always ends with a terminal event"
        return final

    def failed(self, error: ServingError) -> list[ResponseEvent]:
        """The end of a stream that broke after it began: an `error` event, then `response.failed`."""
        code = str(error.code if error.code is not None else error.status_code)
        return [
            ErrorEvent(
                type="error",
                sequence_number=self._next(),
                code=code,
                message=error.message,
                param=error.param,
            ),
            self._lifecycle(
                "response.failed",
                self.response(
                    "failed", error=ResponseError(code="server_error", message=error.message)
                ),
            ),
        ]

    # ---- the response object -------------------------------------------------------------------------
    def response(
        self, status: ResponseStatus, *, error: ResponseError | None = None
    ) -> ResponseObject:
        """The response as it stands; a finished one carries usage (and token ids when asked)."""
        request, turn = self._request, self._turn
        is_over = status != "in_progress"
        usage = turn.usage() if is_over else None
        output_token_ids = None
        if is_over and turn.returns_token_ids and status != "failed":
            output_token_ids = turn.results()[0].token_ids
        conversation_id = request.conversation_id
        return ResponseObject(
            id=turn.response_id,
            created_at=self._created_at,
            completed_at=int(time.time()) if status == "completed" else None,
            status=status,
            error=error,
            incomplete_details=IncompleteDetails(reason="max_output_tokens")
            if status == "incomplete"
            else None,
            model=turn.model,
            output=[item.model_copy(deep=True) for item in self._output],
            instructions=request.instructions,
            max_output_tokens=request.max_output_tokens,
            metadata=request.metadata or {},
            parallel_tool_calls=request.parallel_tool_calls is not False,
            previous_response_id=request.previous_response_id,
            conversation=ConversationRef(id=conversation_id) if conversation_id else None,
            temperature=request.temperature,
            top_p=request.top_p,
            tool_choice=request.tool_choice or "auto",
            tools=[tool for tool in request.tools or [] if isinstance(tool, dict)],
            truncation=request.truncation or "disabled",
            text=request.text or {"format": {"type": "text"}},
            store=request.store is not False,
            user=request.user,
            usage=None
            if usage is None
            else ResponseUsage(
                input_tokens=usage.prompt_tokens,
                input_tokens_details=InputTokensDetails(cached_tokens=usage.num_reused_tokens),
                output_tokens=usage.completion_tokens,
                total_tokens=usage.total_tokens,
            ),
            prompt_token_ids=turn.prompt_token_ids(0) if turn.returns_token_ids else None,
            output_token_ids=output_token_ids,
        )

    # ---- items -----------------------------------------------------------------------------------------
    def _text(self, text: str) -> Iterator[ResponseEvent]:
        if isinstance(self._open, FunctionToolCall):
            yield from self._close_open()
        message = self._open
        if message is None:
            message = OutputMessage(
                id=self._message_id(), status="in_progress", content=[OutputText(text="")]
            )
            yield from self._add(message)
            yield ContentPartEvent(
                type="response.content_part.added",
                sequence_number=self._next(),
                item_id=message.id,
                output_index=len(self._output) - 1,
                part=OutputText(text=""),
            )
        assert isinstance(message, OutputMessage)
        if text:
            message.content[0].text += text
            yield TextDeltaEvent(
                type="response.output_text.delta",
                sequence_number=self._next(),
                item_id=message.id,
                output_index=len(self._output) - 1,
                delta=text,
            )

    def _open_call(self, call_id: str, name: str) -> Iterator[ResponseEvent]:
        call = FunctionToolCall(
            id=function_call_item_id(call_id),
            call_id=call_id,
            name=name,
            arguments="",
            status="in_progress",
        )
        yield from self._add(call)

    def _arguments(self, arguments: str) -> Iterator[ResponseEvent]:
        call = self._open
        assert isinstance(call, FunctionToolCall), (
            "the parser sends a call's id before its arguments"
        )
        call.arguments += arguments
        yield ArgumentsDeltaEvent(
            type="response.function_call_arguments.delta",
            sequence_number=self._next(),
            item_id=call.id,
            output_index=len(self._output) - 1,
            delta=arguments,
        )

    def _add(self, item: OutputItem) -> Iterator[ResponseEvent]:
        self._output.append(item)
        self._open = item
        yield OutputItemEvent(
            type="response.output_item.added",
            sequence_number=self._next(),
            output_index=len(self._output) - 1,
            item=item.model_copy(deep=True),
        )

    def _close_open(self) -> Iterator[ResponseEvent]:
        item, self._open = self._open, None
        if item is None:
            return
        index = len(self._output) - 1
        if isinstance(item, OutputMessage):
            item.status = "incomplete" if self._finish == "length" else "completed"
            part = item.content[0]
            yield TextDoneEvent(
                type="response.output_text.done",
                sequence_number=self._next(),
                item_id=item.id,
                output_index=index,
                text=part.text,
            )
            yield ContentPartEvent(
                type="response.content_part.done",
                sequence_number=self._next(),
                item_id=item.id,
                output_index=index,
                part=part.model_copy(),
            )
        else:
            item.status = "completed"
            yield ArgumentsDoneEvent(
                type="response.function_call_arguments.done",
                sequence_number=self._next(),
                item_id=item.id,
                output_index=index,
                name=item.name,
                arguments=item.arguments,
            )
        yield OutputItemEvent(
            type="response.output_item.done",
            sequence_number=self._next(),
            output_index=index,
            item=item.model_copy(deep=True),
        )

    def _message_id(self) -> str:
        # The first message keeps the id the stored history uses; text after a tool call starts another.
        base = output_message_id(self._turn.response_id)
        num_messages = sum(isinstance(item, OutputMessage) for item in self._output)
        return base if num_messages == 0 else f"{base}_{num_messages}"

    def _lifecycle(self, kind: str, response: ResponseObject) -> LifecycleEvent:
        return LifecycleEvent(type=kind, sequence_number=self._next(), response=response)

    def _next(self) -> int:
        number, self._num_events = self._num_events, self._num_events + 1
        return number
