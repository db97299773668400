from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

import jinja2
import pytest

from deployments.tool_parsers import (
    FAMILIES,
    ParsedToolCall,
    ParseResult,
    StreamEvent,
    ToolCallParser,
    detect_family,
    get_tool_parser,
)

TEMPLATE_PATH = Path(__file__).parents[2] / "deployments" / "assets" / "chatml_tools.jinja"
MARKUP = ("<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]")


def counting_ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def parser(family: str) -> ToolCallParser:
    return get_tool_parser(family, make_id=counting_ids())


def call(index: int, name: str, arguments: object) -> ParsedToolCall:
    return ParsedToolCall(
        id=f"call_{index}", name=name, arguments=json.dumps(arguments, ensure_ascii=False)
    )


def fold(events: list[StreamEvent]) -> ParseResult:
    """Folds events like an OpenAI client, checking the order OpenAI's `delta.tool_calls` promises."""
    content = ""
    calls: list[list[str]] = []
    for event in events:
        if event.content is not None:
            assert event.tool_call_index is None
            content += event.content
            continue
        assert event.tool_call_index is not None
        if event.tool_call_index == len(
            calls
        ):  # a new call opens with its id and name, no arguments
            assert event.tool_call_id and event.name and event.arguments_delta is None
            calls.append([event.tool_call_id, event.name, ""])
        else:  # then only argument fragments for the latest call
            assert event.tool_call_index == len(calls) - 1
            assert (
                event.tool_call_id is None
                and event.name is None
                and event.arguments_delta is not None
            )
            calls[-1][2] += event.arguments_delta
    return ParseResult(content or None, [ParsedToolCall(*fields) for fields in calls])


def stream(family: str, chunks: list[str]) -> ParseResult:
    tool_parser = parser(family)
    events = [event for chunk in chunks for event in tool_parser.feed(chunk)]
    return fold(events + tool_parser.finish())


# ---- hermes ------------------------------------------------------------------------------------------
# Copied from vLLM tests/tool_parsers/test_hermes_tool_parser.py
# (test_hermes_parser_non_streaming_tool_call_between_tags).
VLLM_HERMES = '<tool_call>\n{"name": "final_answer", "arguments": {"trigger": true}}\n</tool_call>'
HERMES_TWO_CALLS = (
    "I'll check both cities.\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "東京", "note": "café 😀 \\"quoted\\" }"}}\n'
    "</tool_call>"
)


def test_hermes_call_from_vllm_tests() -> None:
    assert parser("hermes").parse(VLLM_HERMES) == ParseResult(
        None, [call(0, "final_answer", {"trigger": True})]
    )


def test_hermes_text_before_several_calls_with_unicode_arguments() -> None:
    result = parser("hermes").parse(HERMES_TWO_CALLS)
    assert result.content == "I'll check both cities."
    assert result.tool_calls == [
        call(0, "get_weather", {"city": "Paris", "unit": "celsius"}),
        call(1, "get_weather", {"city": "東京", "note": 'café 😀 "quoted" }'}),
    ]
    assert "東京" in result.tool_calls[1].arguments  # ensure_ascii=False: no \\u escapes


def test_hermes_parses_what_our_template_renders() -> None:
    arguments = '{"city": "Zürich", "days": [1, 2]}'
    rendered = (
        jinja2.Environment()
        .from_string(TEMPLATE_PATH.read_text())
        .render(
            messages=[
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": "Checking.",
                    "tool_calls": [
                        {
                            "id": "call_x",
                            "function": {"name": "get_weather", "arguments": arguments},
                        }
                    ],
                },
            ]
        )
    )
    assistant = rendered.split("<|im_start|>assistant\n", 1)[1].split("<|im_end|>", 1)[0]
    result = parser("hermes").parse(assistant)
    assert result == ParseResult("Checking.", [call(0, "get_weather", json.loads(arguments))])


def test_hermes_complete_call_without_close_tag_at_end_is_a_call() -> None:
    # vLLM tests/tool_parsers/test_hermes_tool_parser.py: test_hermes_parser_non_streaming_tool_call_until_eos
    text = '<tool_call>\n{"name": "final_answer", "arguments": {"trigger": true}}'
    assert parser("hermes").parse(text).tool_calls == [call(0, "final_answer", {"trigger": True})]


def test_hermes_text_after_calls_is_content() -> None:
    text = VLLM_HERMES + "\n\nDone, anything else?"
    assert parser("hermes").parse(text).content == "Done, anything else?"


# ---- llama3_json -------------------------------------------------------------------------------------
# Copied from vLLM tests/tool_parsers/test_llama3_json_tool_parser.py (test_extract_tool_calls_with_arguments,
# test_extract_tool_calls_multiple_json).
VLLM_LLAMA = '{"name": "searchTool", "parameters": {"query": "test query", "limit": 10}}'
VLLM_LLAMA_MULTIPLE = (
    '{"name": "searchTool", "parameters": {"query": "test1"}}; '
    '{"name": "getOpenIncidentsTool", "parameters": {}}; '
    '{"name": "searchTool", "parameters": {"query": "test2"}}'
)
LLAMA_TAGGED = '<|python_tag|>{"name": "get_weather", "arguments": {"city": "São Paulo 🌧"}}'


def test_llama_calls_from_vllm_tests() -> None:
    assert parser("llama3_json").parse(VLLM_LLAMA) == ParseResult(
        None, [call(0, "searchTool", {"query": "test query", "limit": 10})]
    )
    assert parser("llama3_json").parse(VLLM_LLAMA_MULTIPLE).tool_calls == [
        call(0, "searchTool", {"query": "test1"}),
        call(1, "getOpenIncidentsTool", {}),
        call(2, "searchTool", {"query": "test2"}),
    ]


def test_llama_python_tag_and_arguments_key() -> None:
    result = parser("llama3_json").parse(LLAMA_TAGGED)
    assert result == ParseResult(None, [call(0, "get_weather", {"city": "São Paulo 🌧"})])


def test_llama_json_after_text_is_content() -> None:
    # Unlike vLLM's non-streaming regex, on purpose: the Llama prompt asks for a message that *is* the call.
    text = 'Here is the result: {"name": "getOpenIncidentsTool", "parameters": {}}'
    assert parser("llama3_json").parse(text) == ParseResult(text, [])


# ---- mistral -----------------------------------------------------------------------------------------
# Copied from vLLM tests/tool_parsers/test_mistral_tool_parser.py (single_tool_add, argument_before_name for
# tokenizers < v11; multiple_tool_calls and wrong_json for v11+, decoded without control tokens).
VLLM_MISTRAL = '[TOOL_CALLS][{"name": "add", "arguments":{"a": 3.5, "b": 4}}]'
VLLM_MISTRAL_ARGUMENTS_FIRST = (
    '[TOOL_CALLS] [{"arguments":{"city": "San Francisco", "state": "CA", "unit": "celsius"}, '
    '"name": "get_current_weather"}]'
)
VLLM_MISTRAL_V11 = '[TOOL_CALLS]add{"a": 3.5, "b": 4}[TOOL_CALLS]multiply{"a": 3, "b": 6}'
VLLM_MISTRAL_V11_CONTENT = (
    """hi{hi[TOOL_CALLS]bash{"command": "print(\\"hello world!\\")\\nre.compile(r'{}')"}"""
)
MISTRAL_V11_CONTROL_TOKENS = (
    'Let me look.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
    '[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS]{"tz": "Europe/Paris"}'
)


def test_mistral_pre_v11_calls_from_vllm_tests() -> None:
    assert parser("mistral").parse(VLLM_MISTRAL) == ParseResult(
        None, [call(0, "add", {"a": 3.5, "b": 4})]
    )
    assert parser("mistral").parse(VLLM_MISTRAL_ARGUMENTS_FIRST).tool_calls == [
        call(0, "get_current_weather", {"city": "San Francisco", "state": "CA", "unit": "celsius"})
    ]


def test_mistral_v11_calls_from_vllm_tests() -> None:
    assert parser("mistral").parse(VLLM_MISTRAL_V11).tool_calls == [
        call(0, "add", {"a": 3.5, "b": 4}),
        call(1, "multiply", {"a": 3, "b": 6}),
    ]
    assert parser("mistral").parse(VLLM_MISTRAL_V11_CONTENT) == ParseResult(
        "hi{hi", [call(0, "bash", {"command": "print(\"hello world!\")\nre.compile(r'{}')"})]
    )


def test_mistral_v11_with_control_tokens() -> None:
    assert parser("mistral").parse(MISTRAL_V11_CONTROL_TOKENS) == ParseResult(
        "Let me look.",
        [call(0, "get_weather", {"city": "Paris"}), call(1, "get_time", {"tz": "Europe/Paris"})],
    )


def test_mistral_ids_are_nine_alphanumerics_for_its_templates() -> None:
    result = get_tool_parser("mistral").parse(VLLM_MISTRAL_V11)
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", tool_call.id) for tool_call in result.tool_calls)


# ---- malformed -> content ----------------------------------------------------------------------------
MALFORMED = [
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {invalid json}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>'),  # no name
    ("hermes", '<tool_call>\n{"name": "f", "arguments": "not an object"}\n</tool_call>'),
    ("hermes", 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1'),  # unterminated
    ("hermes", '<tool_call>{"name": "f", "arguments": {}}} trailing</tool_call>'),
    ("hermes", "Wrap calls in <tool_call> tags, like <tool_call>this</tool_call>."),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>'),
    (
        "llama3_json",
        '{"name": "invalidTool", "parameters": {invalid json}',
    ),  # vLLM test_..._invalid_json
    ("llama3_json", '{"parameters": {}}'),  # vLLM test_extract_tool_calls_missing_name_key
    (
        "llama3_json",
        '{"name": "toolWithoutParams"}',
    ),  # vLLM test_..._missing_parameters_and_arguments_key
    ("llama3_json", '  {"answer": 42, "unit": "m"}'),
    ("llama3_json", '<|python_tag|>brave_search.call(query="weather in Paris")'),
    ("mistral", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}, {"arguments": {}}]'),
    ("mistral", "[TOOL_CALLS][]"),
    # vLLM test_mistral_tool_parser.py "complex": vLLM keeps the truncated arguments, we return content.
    (
        "mistral",
        """hi{hi[TOOL_CALLS]bash{"command": "print(\\"hello world!\\")\\nre.compile(r\'{}\')""",
    ),
    ("mistral", "[TOOL_CALLS] sorry, no tool fits"),
]


@pytest.mark.parametrize(("family", "text"), MALFORMED)
def test_malformed_tool_call_is_returned_as_content(family: str, text: str) -> None:
    assert parser(family).parse(text) == ParseResult(text, [])


def test_malformed_call_after_a_valid_one_keeps_the_valid_one() -> None:
    text = VLLM_HERMES + '\n<tool_call>\n{"name": "f", "arguments": {oops}}\n</tool_call>'
    result = parser("hermes").parse(text)
    assert result.tool_calls == [call(0, "final_answer", {"trigger": True})]
    assert result.content == '<tool_call>\n{"name": "f", "arguments": {oops}}\n</tool_call>'


def test_plain_text_is_untouched() -> None:
    text = "  Hello [world] <b>bold</b> {braces}; done.\n\n"
    for family in FAMILIES:
        assert parser(family).parse(text) == ParseResult(text, [])
    assert parser("hermes").parse("") == ParseResult(None, [])


# ---- streaming ---------------------------------------------------------------------------------------
STREAMED = [
    ("hermes", VLLM_HERMES),
    ("hermes", HERMES_TWO_CALLS),
    ("hermes", VLLM_HERMES + "\n\nDone, anything else?"),
    ("hermes", "No tools needed: 2 + 2 = 4.  "),
    ("llama3_json", VLLM_LLAMA),
    ("llama3_json", VLLM_LLAMA_MULTIPLE),
    ("llama3_json", "\n" + LLAMA_TAGGED),
    ("llama3_json", 'Here is the result: {"name": "x", "parameters": {}}'),
    ("mistral", VLLM_MISTRAL),
    ("mistral", VLLM_MISTRAL_ARGUMENTS_FIRST),
    ("mistral", VLLM_MISTRAL_V11),
    ("mistral", VLLM_MISTRAL_V11_CONTENT),
    ("mistral", MISTRAL_V11_CONTROL_TOKENS),
    *MALFORMED,
]


@pytest.mark.parametrize(("family", "text"), STREAMED)
def test_stream_split_anywhere_matches_parse(family: str, text: str) -> None:
    # Detokenized deltas always hold whole characters, so character boundaries are every split that occurs.
    expected = parser(family).parse(text)
    for k in range(len(text) + 1):
        assert stream(family, [text[:k], text[k:]]) == expected, k
    assert stream(family, list(text)) == expected


def test_content_streams_before_the_call_completes_and_markup_never_leaks() -> None:
    tool_parser = parser("hermes")
    assert tool_parser.feed("Let me check.") == [StreamEvent(content="Let me check.")]
    assert (
        tool_parser.feed(" <tool") == []
    )  # could be the start of a marker: held like a stop string
    assert tool_parser.feed('_call>\n{"name": "f", "arguments": {"q": 1}}') == []
    assert tool_parser.feed("\n</tool_call>") == [
        StreamEvent(tool_call_index=0, tool_call_id="call_0", name="f"),
        StreamEvent(tool_call_index=0, arguments_delta='{"q": 1}'),
    ]
    assert tool_parser.finish() == []


def test_streamed_content_never_contains_markup() -> None:
    for family, text in STREAMED[:13]:
        tool_parser = parser(family)
        events = [event for char in text for event in tool_parser.feed(char)] + tool_parser.finish()
        assert not any(marker in (event.content or "") for event in events for marker in MARKUP)


def test_held_prefix_that_is_not_a_marker_is_released() -> None:
    tool_parser = parser("mistral")
    assert tool_parser.feed("see [TOOL") == [StreamEvent(content="see")]
    assert tool_parser.feed("S] and [1]") == [StreamEvent(content=" [TOOLS] and [1]")]
    assert tool_parser.finish() == []


# ---- ids, factory, detection -------------------------------------------------------------------------
def test_default_ids_are_openai_style_and_unique() -> None:
    result = get_tool_parser("hermes").parse(HERMES_TWO_CALLS)
    ids = [tool_call.id for tool_call in result.tool_calls]
    assert all(re.fullmatch(r"call_[A-Za-z0-9_-]{24}", tool_call_id) for tool_call_id in ids)
    assert len(set(ids)) == len(ids)


def test_unknown_family_names_the_choices() -> None:
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral"):
        get_tool_parser("gpt")


def test_detect_family_on_our_embedded_template() -> None:
    assert detect_family(TEMPLATE_PATH.read_text()) == "hermes"


@pytest.mark.parametrize(
    ("template", "family"),
    [
        ('{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}', "llama3_json"),
        ("{{- '<|python_tag|>' + tool_call.name + '.call(' }}", "llama3_json"),
        ('{{- "[TOOL_CALLS] [" }}{%- for tool_call in message.tool_calls %}', "mistral"),
        ("{% for message in messages %}{{ message.content }}{% endfor %}", None),
    ],
)
def test_detect_family_from_template_markup(template: str, family: str | None) -> None:
    assert detect_family(template) == family


def test_random_markup_soup_streams_like_parse_and_loses_nothing_without_calls() -> None:
    pieces = [
        *MARKUP,
        *'{ } [ ] ; " \\ <tool [TOOL get_weather 東京'.split(),
        " ",
        "\n",
        '{"name": "f", "arguments": {"a": 1}}',
        '{"name": "g", "parameters": {}}',
        '[{"name": "h", "arguments": {}}]',
    ]
    rng = random.Random(0)
    for _ in range(1500):
        family = rng.choice(FAMILIES)
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        expected = parser(family).parse(text)
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, 4)))
        chunks = [
            text[start:end] for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True)
        ]
        assert stream(family, chunks) == expected, (family, chunks)
        if not expected.tool_calls:
            assert expected.content == (text or None), (family, text)
