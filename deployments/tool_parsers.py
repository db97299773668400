"""Tool calls extracted from generated text, per model family, for whole texts and for streams.

Formats, as vLLM's vllm/entrypoints/openai/tool_parsers/{hermes,llama,mistral}_tool_parser.py read them:
- `hermes` (Hermes 2 Pro/3, Qwen2.5/3, our assets/chatml_tools.jinja): repeated
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, possibly after text.
- `llama3_json` (Llama 3.1-3.3): the message is `{"name": ..., "parameters": {...}}` ("arguments" too),
  maybe after `<|python_tag|>`, several joined by `;`.
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (tokenizer < v11) or, per call,
  `[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}` (v11+; decoding may drop `[CALL_ID]id` and `[ARGS]`).
`<|python_tag|>` and `[TOOL_CALLS]` are special tokens: the detokenizer must keep special tokens to show them.

One state machine serves `parse` and `feed`/`finish`, so a stream split anywhere yields what `parse` yields.
Text outside markup is content; whitespace touching valid markup belongs to the markup. A call is sent once
its markup is complete and valid: an event with index, id and name, then one with all its arguments
(`json.dumps(..., ensure_ascii=False)`). Malformed markup (bad JSON, no name, arguments not an object,
unterminated at the end) is released verbatim as content, never raised.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

_ALPHANUMERIC = string.ascii_letters + string.digits


@dataclass(frozen=True, slots=True)
class ParsedToolCall:
    id: str
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends `function.arguments`


@dataclass(frozen=True, slots=True)
class ParseResult:
    content: str | None  # None when no text is left outside the tool calls
    tool_calls: list[ParsedToolCall]


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One piece of a streamed message, shaped like OpenAI's `delta.content` / `delta.tool_calls[i]`."""

    content: str | None = None
    tool_call_index: int | None = None
    tool_call_id: str | None = None
    name: str | None = None
    arguments_delta: str | None = None


class ToolCallParser(Protocol):
    """Extracts tool calls for one request; use either `parse` or `feed`... `finish`, once.

    Never raises on model output: text that is not a valid tool call comes back as content.
    Not thread-safe; the router drives it from one request's coroutine.
    """

    def parse(self, text: str) -> ParseResult:
        """The whole generated text at once (non-streaming responses)."""
        ...

    def feed(self, text_delta: str) -> list[StreamEvent]:
        """The next detokenized text; returns what can be sent now (text that may start markup is held)."""
        ...

    def finish(self) -> list[StreamEvent]:
        """At the end of generation: releases held text; unfinished markup becomes content."""
        ...


def new_tool_call_id() -> str:
    """OpenAI-style id: "call_" and 24 url-safe characters."""
    return "call_" + secrets.token_urlsafe(18)


def new_mistral_tool_call_id() -> str:
    """Mistral's chat templates raise unless a tool call id is 9 alphanumerics, and clients send ids back."""
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))


@dataclass(frozen=True, slots=True)
class _Region:
    """The outcome of one piece of tool-call markup at the head of the buffer."""

    end: int  # characters of the buffer it covers
    calls: (
        list[tuple[str, str]] | None
    )  # (name, arguments); None: malformed, buffer[:end] is content


class _JsonScanner:
    """Finds where a JSON object or array ends in a growing buffer, reading each character once."""

    def __init__(self, start: int) -> None:
        self.start = start
        self._pos = start
        self._depth = 0
        self._is_in_string = False
        self._is_escaped = False
        self._end: int | None = None

    def end(self, text: str) -> int | None:
        """The index just past the closing bracket, or None while the value is still open."""
        if self._end is not None:
            return self._end
        for pos in range(self._pos, len(text)):
            char = text[pos]
            if self._is_in_string:
                if self._is_escaped:
                    self._is_escaped = False
                elif char == "\\":
                    self._is_escaped = True
                elif char == '"':
                    self._is_in_string = False
            elif char == '"':
                self._is_in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._end = pos + 1
                    return self._end
        self._pos = len(text)
        return None


def _reject_constant(name: str) -> None:
    raise ValueError(
        f"{name} is not JSON"
    )  # json.loads accepts NaN/Infinity, which json.dumps can't undo


def _loads(text: str) -> object:
    """The decoded value, or None when the text is not strict JSON."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None


def _arguments(value: object) -> str | None:
    """Arguments normalised to JSON text; some models double-encode them as a string."""
    if isinstance(value, str):
        value = _loads(value)
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def _call(value: object, argument_keys: tuple[str, ...] = ("arguments",)) -> tuple[str, str] | None:
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    key = next((key for key in argument_keys if key in value), None)
    arguments = _arguments(value[key]) if key is not None else None
    if not isinstance(name, str) or not name or arguments is None:
        return None
    return name, arguments


def _skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _starts_with(text: str, pos: int, token: str) -> bool | None:
    """Whether `token` is at `pos`; None while the text ends inside a prefix of it."""
    if text.startswith(token, pos):
        return True
    return None if token.startswith(text[pos:]) else False


class _MarkupParser:
    """The shared state machine; a family names its markers and matches one region of markup.

    Content mode: text streams out, except a tail that could begin a marker (the stop-string hold-back of
    detokenizer.py) and trailing whitespace, which belongs to the markup if a marker follows. Region mode
    (buffer starts at a marker): `_match_region` is re-run as text arrives until it can decide.
    """

    _MARKERS: tuple[str, ...] = ()  # per family: markers that open a region anywhere in the text

    def __init__(self, make_id: Callable[[], str] | None = None) -> None:
        self._make_id = make_id or self._new_id
        self._reset()

    def _new_id(self) -> str:
        return new_tool_call_id()

    def _reset(self) -> None:
        self._buffer = ""
        self._is_in_region = False
        self._region_whitespace = (
            ""  # whitespace before the open region: content again if it is malformed
        )
        self._is_at_start = True  # nothing but whitespace seen yet
        self._is_after_call = False  # only whitespace since the last valid call
        self._num_calls = 0
        self._scanner: _JsonScanner | None = None

    # ---- per family ----------------------------------------------------------------------------------
    def _anchored_markers(self) -> tuple[str, ...]:
        """Markers that open a region only after nothing but whitespace (at the start, or after a call)."""
        return ()

    def _match_region(self, buffer: str, is_final: bool) -> _Region | None:
        """Decides the region at the head of `buffer` (which starts with a marker); None: need more text.

        Invariant that keeps streaming equal to `parse`: return a non-None result only when no longer
        `buffer` could change it, unless `is_final`.
        """
        raise NotImplementedError

    def _json_end(self, buffer: str, start: int) -> int | None:
        if self._scanner is None or self._scanner.start != start:
            self._scanner = _JsonScanner(start)
        return self._scanner.end(buffer)

    # ---- ToolCallParser -----------------------------------------------------------------------------
    def parse(self, text: str) -> ParseResult:
        self._reset()
        return collect(self.feed(text) + self.finish())

    def feed(self, text_delta: str) -> list[StreamEvent]:
        self._buffer += text_delta
        return self._drain(is_final=False)

    def finish(self) -> list[StreamEvent]:
        return self._drain(is_final=True)

    def _drain(self, is_final: bool) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        while True:
            if self._is_in_region:
                region = self._match_region(self._buffer, is_final)
                if region is None:
                    if not is_final:
                        return events
                    region = _Region(
                        len(self._buffer), None
                    )  # unterminated at the end of generation
                self._close_region(region, events)
                continue
            start = self._find_marker()
            if start is None:
                self._release_content(events, is_final)
                return events
            self._open_region(start, events)

    def _find_marker(self) -> int | None:
        starts = [index for index in map(self._buffer.find, self._MARKERS) if index != -1]
        stripped = self._buffer.lstrip()
        if any(stripped.startswith(marker) for marker in self._anchored_markers()):
            starts.append(len(self._buffer) - len(stripped))
        return min(starts, default=None)

    def _held_length(self) -> int:
        """How many trailing characters could still become the start of a marker."""
        buffer = self._buffer
        stripped = buffer.lstrip()
        if any(marker.startswith(stripped) for marker in self._anchored_markers()):
            return len(buffer)
        markers = self._MARKERS
        longest = max(map(len, markers), default=1) - 1
        for size in range(min(longest, len(buffer)), 0, -1):
            if any(marker.startswith(buffer[-size:]) for marker in markers):
                return size
        return 0

    def _release_content(self, events: list[StreamEvent], is_final: bool) -> None:
        cut = len(self._buffer)
        if not is_final:
            cut = len(self._buffer[: cut - self._held_length()].rstrip())
        text, self._buffer = self._buffer[:cut], self._buffer[cut:]
        self._emit_content(events, text.lstrip() if self._is_after_call else text)

    def _open_region(self, start: int, events: list[StreamEvent]) -> None:
        head = self._buffer[:start]
        text = head.rstrip()
        self._region_whitespace = head[len(text) :]
        self._emit_content(events, text.lstrip() if self._is_after_call else text)
        self._buffer = self._buffer[start:]
        self._is_in_region = True

    def _close_region(self, region: _Region, events: list[StreamEvent]) -> None:
        assert region.end > 0, "a region always covers its marker"
        raw, self._buffer = self._buffer[: region.end], self._buffer[region.end :]
        whitespace, self._region_whitespace = self._region_whitespace, ""
        self._is_in_region = False
        self._scanner = None
        if region.calls is None:
            self._emit_content(events, raw if self._is_after_call else whitespace + raw)
            return
        for name, arguments in region.calls:
            index = self._num_calls
            self._num_calls += 1
            events.append(
                StreamEvent(tool_call_index=index, tool_call_id=self._make_id(), name=name)
            )
            events.append(StreamEvent(tool_call_index=index, arguments_delta=arguments))
        self._is_at_start = False
        self._is_after_call = True

    def _emit_content(self, events: list[StreamEvent], text: str) -> None:
        if not text:
            return
        self._is_at_start = False
        self._is_after_call = False
        previous = events[-1].content if events else None
        if previous is not None:  # one content event per step keeps the router's chunks few
            events[-1] = StreamEvent(content=previous + text)
        else:
            events.append(StreamEvent(content=text))


class HermesToolParser(_MarkupParser):
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.

    Like vLLM, a complete object whose `</tool_call>` never came (generation ended) still counts as a call.
    """

    _OPEN = "<tool_call>"
    _CLOSE = "</tool_call>"
    _MARKERS = (_OPEN,)

    def _match_region(self, buffer: str, is_final: bool) -> _Region | None:
        start = _skip_whitespace(buffer, len(self._OPEN))
        if start == len(buffer):
            return None
        if buffer[start] != "{":
            return _Region(start, None)
        end = self._json_end(buffer, start)
        if end is None:
            return None
        call = _call(_loads(buffer[start:end]))
        if call is None:
            return _Region(end, None)
        close = _skip_whitespace(buffer, end)
        is_closed = _starts_with(buffer, close, self._CLOSE)
        if is_closed:
            return _Region(close + len(self._CLOSE), [call])
        if (
            is_closed is None
        ):  # the close tag is still arriving, or was cut off by the end of generation
            return _Region(len(buffer), [call]) if is_final else None
        return _Region(end, None)


class Llama3JsonToolParser(_MarkupParser):
    """A message that is a JSON call, optionally after `<|python_tag|>`; calls are joined by `;`.

    Unlike vLLM's non-streaming parser, JSON after other text is content: the Llama 3.1 prompt asks for a
    message that *is* the call, and content must stream before the end of generation.
    `<|python_tag|>` followed by built-in tool code (`brave_search.call(...)`) is content too.
    """

    _PYTHON_TAG = "<|python_tag|>"
    _MARKERS = (_PYTHON_TAG,)

    def _anchored_markers(self) -> tuple[str, ...]:
        if self._is_after_call:
            return ("{", ";")
        return ("{",) if self._is_at_start else ()

    def _match_region(self, buffer: str, is_final: bool) -> _Region | None:
        start = 0
        if buffer.startswith((self._PYTHON_TAG, ";")):
            start = _skip_whitespace(buffer, 1 if buffer[0] == ";" else len(self._PYTHON_TAG))
        if start == len(buffer):
            return None
        if buffer[start] != "{":
            return _Region(start, None)
        end = self._json_end(buffer, start)
        if end is None:
            return None
        call = _call(_loads(buffer[start:end]), ("arguments", "parameters"))
        return _Region(end, None if call is None else [call])


class MistralToolParser(_MarkupParser):
    """`[TOOL_CALLS]` then a JSON array of calls (< v11), or `name[CALL_ID]id[ARGS]{...}` per call (v11+).

    The model's own ids (`[CALL_ID]`, `"id"` keys) are dropped: every call gets a fresh 9-character id.
    """

    _BOT = "[TOOL_CALLS]"
    _MARKERS = (_BOT,)

    def _new_id(self) -> str:
        return new_mistral_tool_call_id()

    def _match_region(self, buffer: str, is_final: bool) -> _Region | None:
        start = _skip_whitespace(buffer, len(self._BOT))
        if start == len(buffer):
            return None
        if buffer[start] == "[":  # pre-v11: one array holds every call
            end = self._json_end(buffer, start)
            if end is None:
                return None
            items = _loads(buffer[start:end])
            calls = [_call(item) for item in items] if isinstance(items, list) else []
            valid = [call for call in calls if call is not None]
            return _Region(end, valid if calls and len(valid) == len(calls) else None)
        pos = start
        while pos < len(buffer) and (buffer[pos].isalnum() or buffer[pos] in "_-."):
            pos += 1
        if pos == start:
            return _Region(start, None)
        name = buffer[start:pos]
        for token in ("[CALL_ID]", "[ARGS]"):
            found = _starts_with(buffer, pos, token)
            if found is None:
                return None
            if found:
                pos += len(token)
                while token == "[CALL_ID]" and pos < len(buffer) and buffer[pos].isalnum():
                    pos += 1
        pos = _skip_whitespace(buffer, pos)
        if pos == len(buffer):
            return None
        if buffer[pos] != "{":
            return _Region(pos, None)
        end = self._json_end(buffer, pos)
        if end is None:
            return None
        arguments = _arguments(_loads(buffer[pos:end]))
        return _Region(end, None if arguments is None else [(name, arguments)])


_PARSERS: dict[str, type[_MarkupParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
}
FAMILIES: tuple[str, ...] = tuple(_PARSERS)


def get_tool_parser(family: str, *, make_id: Callable[[], str] | None = None) -> ToolCallParser:
    """A fresh parser for one request. `make_id` replaces the random tool call ids (tests).

    Raises:
        ValueError: `family` is not one of `FAMILIES`.
    """
    if family not in _PARSERS:
        raise ValueError(
            f"unknown tool parser family {family!r}; choose one of {', '.join(FAMILIES)}"
        )
    return _PARSERS[family](make_id)


def detect_family(chat_template: str) -> str | None:
    """Guesses the family from the markup a chat template renders for tool calls; None if it shows none."""
    if "[TOOL_CALLS]" in chat_template:
        return "mistral"
    if "<tool_call>" in chat_template:
        return "hermes"
    if "<|python_tag|>" in chat_template or "ipython" in chat_template:
        return "llama3_json"
    return None


def collect(events: list[StreamEvent]) -> ParseResult:
    """Folds stream events into one result, as a client folds `delta`s (and how `parse` is built)."""
    content = "".join(event.content for event in events if event.content is not None)
    calls = [
        ParsedToolCall(
            id=head.tool_call_id or "",
            name=head.name,
            arguments="".join(
                event.arguments_delta or ""
                for event in events
                if event.tool_call_index == head.tool_call_index
            ),
        )
        for head in events
        if head.name is not None
    ]
    return ParseResult(content=content or None, tool_calls=calls)
