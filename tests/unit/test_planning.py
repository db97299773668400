"""Request planning: how a request's sampling fields become SamplingParams, for an engine that samples per
request and for a greedy-only one (`engine.transformers.sampling: greedy`)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from deployments.config import RouterConfig
from deployments.errors import RequestError
from deployments.messages import (
    GUIDED_DECODING_KINDS,
    EngineCapabilities,
    GuidedDecodingSpec,
    SamplingParams,
)
from deployments.planning import RequestPlanner, TurnSpec
from deployments.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from deployments.protocol_responses import ResponsesRequest
from deployments.served_model import ServedModel
from deployments.templating import ChatTemplate


def sampling_of(tokenizer: Any, caps: EngineCapabilities, **fields: Any) -> SamplingParams:
    model = ServedModel("m", 2048, ChatTemplate(tokenizer), tool_parser_family="hermes")
    planner = RequestPlanner(model, caps, RouterConfig())
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )
    return planner.chat(body, session_id=None).sampling


GREEDY_ONLY = EngineCapabilities(supports_sampling=False)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"temperature": 0},
        {"temperature": 0, "top_p": 0.95},
        {"temperature": 0, "top_k": 40},
        {"top_p": 0.9},
        {"temperature": 0.7, "top_k": 1},
    ],
)
def test_a_greedy_only_engine_serves_every_request_that_decodes_greedily(
    fields: dict[str, Any], tokenizer: Any
) -> None:
    assert sampling_of(tokenizer, GREEDY_ONLY, **fields).is_greedy


@pytest.mark.parametrize("fields", [{"temperature": 0.7}, {"temperature": 1.0, "top_p": 0.9}])
def test_asking_a_greedy_only_engine_to_sample_is_a_400_naming_temperature(
    fields: dict[str, Any], tokenizer: Any
) -> None:
    with pytest.raises(RequestError) as refused:
        sampling_of(tokenizer, GREEDY_ONLY, **fields)
    assert refused.value.status_code == 400 and refused.value.param == "temperature"
    assert refused.value.message.startswith("temperature: ")


def test_an_engine_that_samples_keeps_openais_default_temperature_of_one(tokenizer: Any) -> None:
    sampling = sampling_of(tokenizer, EngineCapabilities())
    assert sampling.temperature == 1.0 and not sampling.is_greedy


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_it_is_tokenized(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """5 MiB of text cannot fit 2048 tokens of at most `max_chars_per_token` characters: a 400 at once,
    rather than seconds of tokenizing on the Router's loop."""
    from deployments.errors import ContextLengthExceeded
    from deployments.protocol import CompletionRequest

    model = ServedModel("m", 2048, ChatTemplate(tokenizer), tool_parser_family="hermes")
    planner = RequestPlanner(model, EngineCapabilities(), RouterConfig())

    def never(*_: Any, **__: Any) -> Any:
        raise AssertionError("tokenized a prompt that cannot fit")

    for name in ("render", "render_prompt", "encode", "encode_rendered", "encode_prompt"):
        monkeypatch.setattr(model.template, name, never, raising=False)
    huge = "x" * (5 * 1024 * 1024)
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": huge}]}
    )
    with pytest.raises(ContextLengthExceeded) as refused:
        planner.chat(chat, session_id=None)
    assert refused.value.param == "messages" and "5242880 characters" in refused.value.message
    completion = CompletionRequest.model_validate({"model": "m", "prompt": ["ok", huge]})
    with pytest.raises(ContextLengthExceeded) as refused:
        planner.completion(completion)
    assert refused.value.param == "prompt"
    # What fits any tokenization's bound passes on to be tokenized.
    fits = "x" * (2048 * (model.template.max_chars_per_token or 0))
    body = {"model": "m", "messages": [{"role": "user", "content": fits}]}
    planner.chat(ChatCompletionRequest.model_validate(body), session_id=None)


# ---- structured outputs, logit_bias and top logprobs ---------------------------------------------------
FULL = EngineCapabilities(
    supports_seed=True,
    supports_penalties=True,
    supports_min_tokens=True,
    supports_logprobs=True,
    supports_logit_bias=True,
    max_top_logprobs=20,
    guided_decoding_kinds=GUIDED_DECODING_KINDS,
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time"}}


def plan(tokenizer: Any, caps: EngineCapabilities = FULL, **fields: Any) -> TurnSpec:
    model = ServedModel("m", 2048, ChatTemplate(tokenizer), tool_parser_family="hermes")
    body = parse_request(
        ChatCompletionRequest,
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields},
    )
    return RequestPlanner(model, caps, RouterConfig()).chat(body, session_id=None)


def refusal(tokenizer: Any, caps: EngineCapabilities = FULL, **fields: Any) -> RequestError:
    with pytest.raises(RequestError) as refused:
        plan(tokenizer, caps, **fields)
    assert refused.value.status_code == 400
    return refused.value


def test_a_json_schema_response_format_becomes_a_validated_guide(tokenizer: Any) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    spec = plan(tokenizer, response_format=response_format).guided_decoding
    assert spec is not None and spec.kind == "json_schema" and json.loads(spec.grammar) == schema
    assert plan(tokenizer, response_format={"type": "json_object"}).guided_decoding == (
        GuidedDecodingSpec("json_object")
    )
    assert plan(tokenizer, response_format={"type": "text"}).guided_decoding is None


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ({"type": "object", "properties": {"a": {"type": "strin"}}}, "strin"),
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        (
            {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(4000)}},
            "at most",
        ),
    ],
    ids=["invalid", "unsupported keyword", "unsupported keyword 2", "too large"],
)
def test_a_schema_that_cannot_be_enforced_is_a_400_naming_it(
    tokenizer: Any, schema: dict[str, Any], says: str
) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    error = refusal(tokenizer, response_format=response_format)
    assert error.param == "response_format.json_schema" and says in error.message


def test_structured_outputs_take_exactly_one_constraint_in_vllms_names(tokenizer: Any) -> None:
    choice = plan(tokenizer, structured_outputs={"choice": ["yes", "no (maybe)"]})
    assert choice.guided_decoding == GuidedDecodingSpec("regex", r"(yes|no \(maybe\))")
    lark = plan(tokenizer, structured_outputs={"grammar": 'start: "a"'}).guided_decoding
    assert lark == GuidedDecodingSpec("lark", 'start: "a"')
    assert refusal(tokenizer, structured_outputs={"regex": "(a"}).param == "structured_outputs"
    both = refusal(tokenizer, structured_outputs={"regex": "a", "choice": ["b"]})
    assert "exactly one" in both.message and both.param == "structured_outputs"
    unknown = refusal(tokenizer, structured_outputs={"structural_tag": "{}"})
    assert unknown.param == "structured_outputs.structural_tag"
    twice = refusal(
        tokenizer, structured_outputs={"regex": "a"}, response_format={"type": "json_object"}
    )
    assert twice.param == "structured_outputs"


def test_a_forced_tool_call_is_a_grammar_over_the_markup_of_the_template(tokenizer: Any) -> None:
    required = plan(tokenizer, tools=[WEATHER, CLOCK], tool_choice="required").guided_decoding
    assert required is not None and required.kind == "lark"
    open_id = tokenizer.convert_tokens_to_ids("<tool_call>")
    assert f"<[{open_id}]>" in required.grammar and "get_time" in required.grammar
    named = plan(
        tokenizer,
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    ).guided_decoding
    assert named is not None and "get_time" not in named.grammar and "call (" not in named.grammar
    missing = refusal(
        tokenizer, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}
    )
    assert missing.param == "tool_choice" and "nope" in missing.message
    conflict = refusal(
        tokenizer, tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}
    )
    assert conflict.param == "response_format"


# The Responses API's shape of the same tools (`{"type": "function", "name": ...}`, no nested `function`).
RESPONSE_TOOLS = [
    {"type": "function", **WEATHER["function"]},
    {"type": "function", "name": "get_time"},
]


def plan_response(tokenizer: Any, caps: EngineCapabilities = FULL, **fields: Any) -> TurnSpec:
    model = ServedModel("m", 2048, ChatTemplate(tokenizer), tool_parser_family="hermes")
    body = parse_request(ResponsesRequest, {"model": "m", "input": "hi", **fields})
    return RequestPlanner(model, caps, RouterConfig()).responses(body, has_input=True)


def response_refusal(
    tokenizer: Any, caps: EngineCapabilities = FULL, **fields: Any
) -> RequestError:
    with pytest.raises(RequestError) as refused:
        plan_response(tokenizer, caps, **fields)
    assert refused.value.status_code == 400
    return refused.value


def test_a_forced_responses_tool_choice_is_chats_grammar_over_the_same_tools(
    tokenizer: Any,
) -> None:
    chat_named = plan(
        tokenizer,
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    ).guided_decoding
    named = plan_response(
        tokenizer, tools=RESPONSE_TOOLS, tool_choice={"type": "function", "name": "get_weather"}
    ).guided_decoding
    assert named is not None and named == chat_named
    required = plan_response(tokenizer, tools=RESPONSE_TOOLS, tool_choice="required")
    assert (
        required.guided_decoding
        == plan(tokenizer, tools=[WEATHER, CLOCK], tool_choice="required").guided_decoding
    )
    assert required.tools is not None and len(required.tools) == 2
    for free in ("auto", "none", None):
        assert (
            plan_response(tokenizer, tools=RESPONSE_TOOLS, tool_choice=free).guided_decoding is None
        )


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"tools": RESPONSE_TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "nope"),
        ({"tool_choice": "required"}, "needs function tools"),
        ({"tools": RESPONSE_TOOLS, "tool_choice": {"type": "function"}}, "names its function"),
        ({"tools": RESPONSE_TOOLS, "tool_choice": "always"}, "'always'"),
        (
            {"tools": RESPONSE_TOOLS, "tool_choice": {"type": "allowed_tools", "mode": "auto"}},
            "'allowed_tools'",
        ),
        ({"tools": RESPONSE_TOOLS, "tool_choice": {"type": "web_search_preview"}}, "function"),
        ({"tools": RESPONSE_TOOLS, "tool_choice": 3}, "3 is not"),
    ],
)
def test_a_bad_responses_tool_choice_is_a_400_naming_it(
    tokenizer: Any, fields: dict[str, Any], says: str
) -> None:
    error = response_refusal(tokenizer, **fields)
    assert error.param == "tool_choice" and says in error.message


def test_a_forced_responses_call_needs_guided_decoding_and_no_other_format(
    tokenizer: Any,
) -> None:
    """As in chat: an engine without guided decoding refuses the forced call, naming tool_choice."""
    greedy = EngineCapabilities(supports_sampling=False, unsupported_hint="use per_request")
    error = response_refusal(tokenizer, greedy, tools=RESPONSE_TOOLS, tool_choice="required")
    assert error.param == "tool_choice" and "per_request" in error.message
    conflict = response_refusal(
        tokenizer,
        tools=RESPONSE_TOOLS,
        tool_choice="required",
        text={"format": {"type": "json_object"}},
    )
    assert conflict.param == "text.format"
    ignoring = response_refusal(
        tokenizer, tools=RESPONSE_TOOLS, tool_choice="required", ignore_eos=True
    )
    assert ignoring.param == "ignore_eos"


def test_guides_need_an_engine_that_enforces_them_and_an_end(tokenizer: Any) -> None:
    greedy = EngineCapabilities(supports_sampling=False, unsupported_hint="use per_request")
    error = refusal(tokenizer, greedy, response_format={"type": "json_object"})
    assert error.param == "response_format" and "per_request" in error.message
    error = refusal(tokenizer, greedy, tools=[WEATHER], tool_choice="required")
    assert error.param == "tool_choice"
    error = refusal(tokenizer, response_format={"type": "json_object"}, ignore_eos=True)
    assert error.param == "ignore_eos"


@pytest.mark.parametrize(
    ("logit_bias", "says"),
    [
        ({"100000": 1.0}, "outside the vocabulary"),
        ({"5": 150}, "[-100, 100]"),
        ({"a": 1}, "token ids"),
    ],
)
def test_a_logit_bias_outside_the_vocabulary_or_range_is_a_400(
    tokenizer: Any, logit_bias: dict[str, Any], says: str
) -> None:
    error = refusal(tokenizer, logit_bias=logit_bias)
    assert error.param == "logit_bias" and says in error.message


def test_logit_bias_and_top_logprobs_reach_the_engine_request(tokenizer: Any) -> None:
    spec = plan(tokenizer, logit_bias={"9": -100, "5": 2.5}, logprobs=True, top_logprobs=3)
    assert spec.sampling.logit_bias == ((5, 2.5), (9, -100.0))
    assert spec.num_top_logprobs == 3 and spec.has_logprobs
    assert refusal(tokenizer, logprobs=True, top_logprobs=21).param == "top_logprobs"
    no_tops = replace(FULL, max_top_logprobs=0)
    assert refusal(tokenizer, no_tops, logprobs=True, top_logprobs=2).param == "top_logprobs"
    no_bias = replace(FULL, supports_logit_bias=False)
    assert refusal(tokenizer, no_bias, logit_bias={"5": 1}).param == "logit_bias"


def test_completions_logprobs_ask_for_that_many_alternatives(tokenizer: Any) -> None:
    model = ServedModel("m", 2048, ChatTemplate(tokenizer), tool_parser_family=None)
    planner = RequestPlanner(model, FULL, RouterConfig())
    body = parse_request(CompletionRequest, {"model": "m", "prompt": "hi", "logprobs": 4})
    assert planner.completion(body).num_top_logprobs == 4
    with pytest.raises(RequestError) as refused:
        parse_request(CompletionRequest, {"model": "m", "prompt": "hi", "logprobs": 21})
    assert refused.value.param == "logprobs"


def test_the_choices_of_one_prompt_sample_with_consecutive_seeds(tokenizer: Any) -> None:
    model = ServedModel("m", 2048, ChatTemplate(tokenizer), tool_parser_family="hermes")
    planner = RequestPlanner(model, FULL, RouterConfig())
    spec = plan(tokenizer, seed=2**64 - 1, n=3)
    seeds = [
        planner.generate_request("r", [1, 2], spec, choice_index=i).sampling.seed for i in range(3)
    ]
    assert seeds == [2**64 - 1, 0, 1]
    unseeded = plan(tokenizer, n=2)
    assert planner.generate_request("r", [1], unseeded, choice_index=1).sampling.seed is None
