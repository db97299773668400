"""Guided-decoding specs: built from OpenAI requests (JSON object or schema, regex, choice, Lark, a forced tool
call in the model's own markup), checked, and turned into llguidance grammars.

The router builds and validates specs (`planning.py`); the transformers engine compiles them
(`executors/hf_processors.py`); TensorRT-LLM receives them as its own `GuidedDecodingParams`. llguidance
(guidance-ai/llguidance) is the grammar engine: TensorRT-LLM's PyTorch backend ships it as one of its two
backends, it rejects JSON Schema keywords it cannot enforce instead of ignoring them, it compiles lazily (a
schema costs a millisecond, not a compile step), and its Lark dialect embeds JSON schemas (`%json{...}`) and
single tokens (`<[id]>`), which is what forcing a tool call in a chat template's markup needs.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any, cast

from deployments.messages import GuidedDecodingSpec

# The largest schema, regex or grammar a request may carry (characters of its text): compiling and holding it
# is per request work on the engine, so it is bounded like the body itself.
MAX_GRAMMAR_CHARS = 64 * 1024
MAX_CHOICES = 256

# JSON as models write it (`json.dumps` spacing), with no optional whitespace: free whitespace lets a small
# model loop on spaces and newlines until max_tokens, and any JSON parser reads the compact form.
JSON_FORMAT: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
_DEFAULTS = cast(Any, JSON_FORMAT)  # llguidance types it as its `JsonCompileOptions`
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
# Characters with a meaning in both regex dialects the engines read (llguidance's Rust regex, xgrammar's).
_REGEX_META = frozenset("\\.+*?()|[]{}^$")


# ---- specs --------------------------------------------------------------------------------------------
def json_object_spec() -> GuidedDecodingSpec:
    return GuidedDecodingSpec("json_object")


def json_schema_spec(schema: Mapping[str, Any]) -> GuidedDecodingSpec:
    return GuidedDecodingSpec("json_schema", json.dumps(schema, ensure_ascii=False))


def regex_spec(pattern: str) -> GuidedDecodingSpec:
    return GuidedDecodingSpec("regex", pattern)


def choice_spec(choices: Sequence[str]) -> GuidedDecodingSpec:
    """Exactly one of `choices` (vLLM's `choice`), as a regex every engine's backend reads."""
    return GuidedDecodingSpec("regex", "(" + "|".join(_regex_literal(c) for c in choices) + ")")


def lark_spec(grammar: str) -> GuidedDecodingSpec:
    return GuidedDecodingSpec("lark", grammar)


def _regex_literal(text: str) -> str:
    return "".join("\\" + char if char in _REGEX_META else char for char in text)


def tool_call_spec(
    family: str,
    tools: Sequence[Mapping[str, Any]],
    *,
    token_ids: Mapping[str, int],
    function_name: str | None = None,
    is_parallel: bool = True,
    has_v11_calls: bool = False,
) -> GuidedDecodingSpec:
    """A reply that is one or more tool calls (one when `function_name` names the tool, or when not
    `is_parallel`), written in `family`'s markup as `tool_parsers.py` reads it.

    Args:
        family: `hermes`, `llama3_json` or `mistral`.
        tools: OpenAI tool definitions (`{"type": "function", "function": {...}}`).
        token_ids: markup strings that are single tokens of the model's vocabulary (`<tool_call>`,
            `[TOOL_CALLS]`, ...): the grammar then asks for that token, as the model was trained to write it.
        has_v11_calls: mistral only: `[TOOL_CALLS]name[ARGS]{...}` (tokenizer v11+), else a JSON array.
    Raises:
        ValueError: unknown family, or `function_name` is not one of `tools`.
    """
    functions = [tool["function"] for tool in tools]
    if function_name is not None:
        functions = [f for f in functions if f["name"] == function_name]
        if not functions:
            raise ValueError(f"no tool named {function_name!r}")
    is_single = function_name is not None or not is_parallel

    def literal(text: str) -> str:
        token_id = token_ids.get(text)
        return f"<[{token_id}]>" if token_id is not None else json.dumps(text)

    if family == "hermes":
        call = _json_rule(_calls_schema(functions, "arguments"))
        rule = f"{literal('<tool_call>')} {literal(chr(10))} {call} {literal(chr(10))} "
        rule += literal("</tool_call>")
        return lark_spec(_repeated(rule, '"\\n"', is_single))
    if family == "llama3_json":
        call = _json_rule(_calls_schema(functions, "parameters"))
        return lark_spec(_repeated(call, '"; "', is_single))
    if family == "mistral":
        bot = literal("[TOOL_CALLS]")
        if has_v11_calls:
            alternatives = " | ".join(
                f"{json.dumps(f['name'])} {literal('[ARGS]')} {_json_rule(_parameters(f))}"
                for f in functions
            )
            return lark_spec(_repeated(f"{bot} ({alternatives})", None, is_single))
        array: dict[str, Any] = {
            "type": "array",
            "items": _calls_schema(functions, "arguments"),
            "minItems": 1,
        }
        if is_single:
            array["maxItems"] = 1
        return lark_spec(f"start: {bot} {_json_rule(array)}\n")
    raise ValueError(f"no tool-call grammar for the {family!r} format")


def _parameters(function: Mapping[str, Any]) -> dict[str, Any]:
    return dict(function.get("parameters") or _ANY_OBJECT)


def _calls_schema(functions: Sequence[Mapping[str, Any]], arguments_key: str) -> dict[str, Any]:
    """`{"name": <one of the functions>, <arguments_key>: <its parameters>}`; the name comes first."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, arguments_key: _parameters(f)},
            "required": ["name", arguments_key],
            "additionalProperties": False,
        }
        for f in functions
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def _json_rule(schema: Mapping[str, Any]) -> str:
    return "%json" + json.dumps({**schema, "x-guidance": JSON_FORMAT}, ensure_ascii=False)


def _repeated(call: str, separator: str | None, is_single: bool) -> str:
    if is_single:
        return f"start: call\ncall: {call}\n"
    joiner = f"{separator} call" if separator else "call"
    return f"start: call ({joiner})*\ncall: {call}\n"


# ---- llguidance ---------------------------------------------------------------------------------------
def to_llguidance(spec: GuidedDecodingSpec) -> str:
    """The llguidance top-level grammar (JSON text) of a spec.

    Raises:
        ValueError: a JSON schema that is not JSON.
    """
    import llguidance

    matcher = llguidance.LLMatcher
    if spec.kind == "json_object":
        return str(matcher.grammar_from_json_schema(json.dumps(_ANY_OBJECT), defaults=_DEFAULTS))
    if spec.kind == "json_schema":
        return str(matcher.grammar_from_json_schema(spec.grammar, defaults=_DEFAULTS))
    if spec.kind == "regex":
        return str(matcher.grammar_from_regex(spec.grammar))
    return str(matcher.grammar_from_lark(spec.grammar))


@functools.lru_cache(maxsize=1024)
def validation_error(spec: GuidedDecodingSpec) -> str | None:
    """Why the spec cannot be enforced (a malformed schema, regex or grammar, a schema keyword llguidance does
    not implement, a spec over `MAX_GRAMMAR_CHARS`), or None. Cached: agents resend the same schemas."""
    if len(spec.grammar) > MAX_GRAMMAR_CHARS:
        return f"is {len(spec.grammar)} characters long; at most {MAX_GRAMMAR_CHARS} are accepted"
    import llguidance

    try:
        error = llguidance.LLMatcher.validate_grammar(to_llguidance(spec))
    except (ValueError, TypeError) as exc:
        return str(exc)
    return str(error).strip() or None
