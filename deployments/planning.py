"""From an OpenAI request to what the engine runs: every check of what this server and its engine can honour
(all 400s, raised before a session's turn lease is taken), the sampling, and the token budget."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from deployments import grammars
from deployments.config import RouterConfig
from deployments.errors import ContextLengthExceeded, RequestError
from deployments.messages import (
    EngineCapabilities,
    GenerateRequest,
    GuidedDecodingSpec,
    RetentionRange,
    SamplingParams,
)
from deployments.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    NamedToolChoice,
    ResponseFormat,
    StructuredOutputs,
)
from deployments.protocol_responses import FunctionTool, ResponsesRequest
from deployments.served_model import ServedModel

# Markup that a tool-call grammar asks for as one token when the vocabulary has it as one.
_TOOL_MARKERS = ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]")


@dataclass(frozen=True, slots=True)
class TurnSpec:
    """A request that passed every check, reduced to what the turn pipeline needs."""

    n: int
    sampling: SamplingParams
    stop: list[str]
    requested_max_tokens: int | None
    ignore_eos: bool
    has_logprobs: bool
    returns_token_ids: bool = False
    # The request's own tools (chat without a session); a session's come from the session.
    tools: list[dict[str, Any]] | None = None
    num_top_logprobs: int = 0
    # What the reply must match: a response format, a forced tool call, or `structured_outputs`.
    guided_decoding: GuidedDecodingSpec | None = None


class RequestPlanner:
    """Checks requests against the served model and the engine's capabilities, and builds engine requests."""

    def __init__(
        self, model: ServedModel, capabilities: EngineCapabilities, settings: RouterConfig
    ) -> None:
        self._model = model
        self._capabilities = capabilities
        self.default_max_tokens = settings.default_max_tokens
        tokenizer = model.template.tokenizer
        self._marker_token_ids = {
            marker: token_id
            for marker in _TOOL_MARKERS
            if len(token_id_list := tokenizer.encode(marker, add_special_tokens=False)) == 1
            for token_id in token_id_list
        }
        chat_template = str(getattr(tokenizer, "chat_template", "") or "")
        self._has_v11_tool_calls = "[ARGS]" in chat_template

    # ---- checks --------------------------------------------------------------------------------------
    def chat(self, body: ChatCompletionRequest, session_id: str | None) -> TurnSpec:
        """Raises RequestError (400) or NotFoundError (404) naming the field this server cannot honour."""
        self._model.check_name(body.model)
        if not self._model.template.has_template:
            raise RequestError(
                "this model has no chat template; use /v1/completions", param="messages"
            )
        if body.tools and self._model.tool_parser_family is None:
            raise RequestError(
                "this model's chat template has no known tool-call format; set router.tool_parser",
                param="tools",
            )
        if body.logprobs and not self._capabilities.supports_logprobs:
            raise RequestError(
                "logprobs are not supported by this engine" + self._hint(), param="logprobs"
            )
        num_top_logprobs = self._top_logprobs(body.top_logprobs or 0, "top_logprobs")
        if session_id is not None:
            if body.tools:
                raise RequestError(
                    "a session's tools are set when the session is created", param="tools"
                )
            if body.n > 1:
                raise RequestError(
                    "n > 1 cannot continue a session: which reply would it keep?", param="n"
                )
            if any(message.role in ("system", "developer") for message in body.messages):
                raise RequestError(
                    "a session's system prompt is set when the session is created",
                    param="messages",
                )
        if session_id is None:
            # Every message is rendered (the session's own check adds its system prompt, `sessions/`).
            # Assistant text is not counted: some templates drop parts of it (reasoning).
            self._model.template.check_fits(
                sum(len(m.text()) for m in body.messages if m.role != "assistant"),
                self._model.max_model_len,
            )
        guided = self._forced_tool_call(body)
        if guided is not None and (body.response_format or body.structured_outputs):
            param = "response_format" if body.response_format else "structured_outputs"
            raise RequestError(
                "a forced tool call (tool_choice) already decides the reply's format", param=param
            )
        guided = guided or self._guided_decoding(body)
        return TurnSpec(
            n=body.n,
            sampling=self._sampling(body),
            stop=body.stop_strings(),
            requested_max_tokens=body.requested_max_tokens(),
            ignore_eos=body.ignore_eos,
            has_logprobs=body.logprobs,
            returns_token_ids=body.return_token_ids,
            tools=body.tool_dicts(),
            num_top_logprobs=num_top_logprobs,
            guided_decoding=guided,
        )

    def completion(self, body: CompletionRequest) -> TurnSpec:
        self._model.check_name(body.model)
        if body.suffix is not None:
            raise RequestError("suffix is not supported", param="suffix")
        if body.logprobs is not None and not self._capabilities.supports_logprobs:
            raise RequestError(
                "logprobs are not supported by this engine" + self._hint(), param="logprobs"
            )
        for prompt in body.prompts():
            if isinstance(prompt, str):
                self._model.template.check_fits(
                    len(prompt), self._model.max_model_len, param="prompt"
                )
        return TurnSpec(
            n=body.n,
            sampling=self._sampling(body),
            stop=body.stop_strings(),
            requested_max_tokens=body.requested_max_tokens(),
            ignore_eos=body.ignore_eos,
            has_logprobs=body.logprobs is not None,
            returns_token_ids=body.return_token_ids,
            # Completions' `logprobs: N` asks for the N most likely tokens at each step.
            num_top_logprobs=self._top_logprobs(body.logprobs or 0, "logprobs"),
            guided_decoding=self._guided_decoding(body),
        )

    def responses(self, body: ResponsesRequest, *, has_input: bool) -> TurnSpec:
        """The Responses API's checks (400, or 404 for the model), before any stored state is touched."""
        self._model.check_name(body.model)
        if not self._model.template.has_template:
            raise RequestError(
                "this model has no chat template; use /v1/completions", param="input"
            )
        refusals = (
            ("background", body.background, "background responses are not supported: a response runs "
             "while its request is open (stream it to see it progress)"),
            ("prompt", body.prompt, "prompt templates are not supported; send input and instructions"),
            ("context_management", body.context_management, "context_management is not supported; "
             "use truncation: auto"),
            ("reasoning", body.reasoning and any(v is not None for v in body.reasoning.values()),
             "reasoning options are not supported by this model"),
            ("top_logprobs", body.top_logprobs, "top_logprobs are not supported"),
        )  # fmt: skip
        for param, value, message in refusals:
            if value:
                raise RequestError(f"{param}: {message}", param=param)
        guided = self._text_format(body)
        include = body.unsupported_include()
        if include is not None:
            raise RequestError(f"include {include!r} is not supported", param="include")
        if not has_input and body.previous_response_id is None and body.conversation is None:
            raise RequestError("input: give at least one input item", param="input")
        tools = body.function_tools()
        if tools and self._model.tool_parser_family is None:
            raise RequestError(
                "this model's chat template has no known tool-call format; set router.tool_parser",
                param="tools",
            )
        forced = self._responses_forced_call(body, tools)
        if forced is not None and guided is not None:
            raise RequestError(
                "a forced tool call (tool_choice) already decides the reply's format",
                param="text.format",
            )
        guided = forced or guided
        caps = self._capabilities
        sampling = SamplingParams(
            temperature=(1.0 if caps.supports_sampling else 0.0)
            if body.temperature is None
            else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
        )
        self._check_greedy(sampling)
        return TurnSpec(
            n=1,
            sampling=sampling,
            stop=[],
            requested_max_tokens=body.max_output_tokens,
            ignore_eos=body.ignore_eos,
            has_logprobs=False,
            returns_token_ids=body.return_token_ids,
            tools=[tool.to_chat_tool() for tool in tools]
            if tools and body.tool_choice != "none"
            else None,
            guided_decoding=guided,
        )

    def _text_format(self, body: ResponsesRequest) -> GuidedDecodingSpec | None:
        """`text.format`: plain text, or JSON (any object, or one a schema validates) by guided decoding."""
        text_format = (body.text or {}).get("format") or {"type": "text"}
        kind = text_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            spec = grammars.json_object_spec()
            return self._checked(spec, "text.format", body.ignore_eos, "text.format 'json_object'")
        if kind == "json_schema":
            schema = text_format.get("schema")
            if not isinstance(schema, dict):
                raise RequestError(
                    "text.format.schema: give the JSON schema the reply must match",
                    param="text.format.schema",
                )
            spec = grammars.json_schema_spec(schema)
            param = "text.format.schema"
            return self._checked(spec, param, body.ignore_eos, "text.format 'json_schema'")
        raise RequestError(
            f"text.format {kind!r} is not supported (text, json_object or json_schema)",
            param="text.format",
        )

    # ---- engine requests -----------------------------------------------------------------------------
    def generate_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        spec: TurnSpec,
        *,
        max_tokens: int | None = None,
        session_id: str | None = None,
        retention: RetentionRange | None = None,
        choice_index: int = 0,
    ) -> GenerateRequest:
        """`max_tokens` is given when a session already fitted the turn to the context window. The choices
        of one prompt (`n` > 1) sample with seeds `seed`, `seed + 1`, ... (vLLM's `n` children): the same
        seed would make them all alike."""
        if max_tokens is None:
            max_tokens = self.max_tokens(len(prompt_token_ids), spec.requested_max_tokens)
        template = self._model.template
        sampling = spec.sampling
        if choice_index and sampling.seed is not None:
            sampling = replace(sampling, seed=(sampling.seed + choice_index) % 2**64)
        return GenerateRequest(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            max_tokens=max_tokens,
            session_id=session_id,
            retention=retention,
            sampling=sampling,
            end_id=None if spec.ignore_eos else template.end_id,
            pad_id=template.tokenizer.pad_token_id,
            stop_token_sequences=() if spec.ignore_eos else template.stop_sequences,
            return_logprobs=spec.has_logprobs,
            num_top_logprobs=spec.num_top_logprobs,
            guided_decoding=spec.guided_decoding,
        )

    def max_tokens(self, num_prompt_tokens: int, requested: int | None) -> int:
        """The token budget: what was asked for, or the default, within the context window."""
        window = self._model.max_model_len
        room = window - num_prompt_tokens
        if room <= 0:
            raise ContextLengthExceeded(
                f"the prompt has {num_prompt_tokens} tokens; this model's context window is "
                f"{window} tokens and leaves no room to generate"
            )
        if requested is None:
            return min(self.default_max_tokens, room)
        if requested > room:
            raise ContextLengthExceeded(
                f"max_tokens={requested} plus the prompt's {num_prompt_tokens} tokens exceeds the "
                f"context window of {window} tokens",
                param="max_tokens",
            )
        return requested

    # ---- sampling and guided decoding -----------------------------------------------------------------
    def _hint(self) -> str:
        hint = self._capabilities.unsupported_hint
        return f" ({hint})" if hint else ""

    def _top_logprobs(self, requested: int, param: str) -> int:
        supported = self._capabilities.max_top_logprobs
        if requested > supported:
            raise RequestError(
                f"{param}={requested}: this engine returns at most {supported} most likely tokens per "
                f"step{self._hint()}",
                param=param,
            )
        return requested

    def _forced_tool_call(self, body: ChatCompletionRequest) -> GuidedDecodingSpec | None:
        """`tool_choice: "required"` or a named function: the reply is a call in the model's markup."""
        choice = body.tool_choice
        if choice != "required" and not isinstance(choice, NamedToolChoice):
            return None
        assert body.tools  # the protocol refuses a forced call without tools
        return self._tool_call_guide(
            [tool.model_dump(exclude_none=True) for tool in body.tools],
            choice.function.get("name") if isinstance(choice, NamedToolChoice) else None,
            is_parallel=body.parallel_tool_calls is not False,
            ignore_eos=body.ignore_eos,
        )

    def _responses_forced_call(
        self, body: ResponsesRequest, tools: list[FunctionTool]
    ) -> GuidedDecodingSpec | None:
        """The Responses API's `tool_choice` onto chat's forced call: the same grammar over the same tools
        (in the chat-template shape), so the turn's tool-call parser reads it as a `function_call` item."""
        is_forced, name = body.forced_function()
        if not is_forced:
            return None
        if not tools:
            raise RequestError(
                "tool_choice: forcing a function call needs function tools in tools",
                param="tool_choice",
            )
        if name is not None and name not in {tool.name for tool in tools}:
            raise RequestError(
                f"tool_choice names function {name!r}, which is not in tools", param="tool_choice"
            )
        return self._tool_call_guide(
            [tool.to_chat_tool() for tool in tools],
            name,
            is_parallel=body.parallel_tool_calls is not False,
            ignore_eos=body.ignore_eos,
        )

    def _tool_call_guide(
        self,
        tools: list[dict[str, Any]],
        function_name: str | None,
        *,
        is_parallel: bool,
        ignore_eos: bool,
    ) -> GuidedDecodingSpec:
        family = self._model.tool_parser_family
        assert family is not None  # checked with the tools
        spec = grammars.tool_call_spec(
            family,
            tools,
            token_ids=self._marker_token_ids,
            function_name=function_name,
            is_parallel=is_parallel,
            has_v11_calls=self._has_v11_tool_calls,
        )
        return self._checked(spec, "tool_choice", ignore_eos, "a forced tool call")

    def _guided_decoding(
        self, body: ChatCompletionRequest | CompletionRequest
    ) -> GuidedDecodingSpec | None:
        if body.structured_outputs is not None and body.response_format is not None:
            raise RequestError(
                "give response_format or structured_outputs, not both", param="structured_outputs"
            )
        if body.structured_outputs is not None:
            spec = _structured_outputs_spec(body.structured_outputs)
            return self._checked(spec, "structured_outputs", body.ignore_eos, "structured_outputs")
        if body.response_format is None or body.response_format.type == "text":
            return None
        spec = _response_format_spec(body.response_format)
        param = "response_format.json_schema" if spec.kind == "json_schema" else "response_format"
        return self._checked(spec, param, body.ignore_eos, f"response_format {spec.kind!r}")

    def _checked(
        self, spec: GuidedDecodingSpec, param: str, ignore_eos: bool, what: str
    ) -> GuidedDecodingSpec:
        if spec.kind not in self._capabilities.guided_decoding_kinds:
            raise RequestError(
                f"{what} needs guided decoding of kind {spec.kind!r}, which this engine does not "
                f"enforce{self._hint()}",
                param=param,
            )
        if ignore_eos:
            raise RequestError(
                f"ignore_eos cannot be combined with {what}: the grammar decides where the reply ends",
                param="ignore_eos",
            )
        error = grammars.validation_error(spec)
        if error is not None:
            raise RequestError(f"{param}: {error}", param=param)
        return spec

    def _sampling(self, body: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
        caps = self._capabilities
        if body.seed is not None and not caps.supports_seed:
            raise RequestError("seed is not supported by this engine" + self._hint(), param="seed")
        if not caps.supports_penalties:
            for param, value, neutral in (
                ("presence_penalty", body.presence_penalty, 0.0),
                ("frequency_penalty", body.frequency_penalty, 0.0),
                ("repetition_penalty", body.repetition_penalty, 1.0),
            ):
                if value != neutral:
                    raise RequestError(
                        f"{param} is not supported by this engine" + self._hint(), param=param
                    )
        if body.min_tokens and not caps.supports_min_tokens:
            raise RequestError(
                "min_tokens is not supported by this engine" + self._hint(), param="min_tokens"
            )
        logit_bias = body.logit_bias_pairs()
        if logit_bias:
            if not caps.supports_logit_bias:
                raise RequestError(
                    "logit_bias is not supported by this engine" + self._hint(), param="logit_bias"
                )
            vocab_size = self._model.template.vocab_size
            outside = [token_id for token_id, _ in logit_bias if token_id >= vocab_size]
            if outside:
                raise RequestError(
                    f"logit_bias: token id {outside[0]} is outside the vocabulary [0, {vocab_size})",
                    param="logit_bias",
                )
        # A greedy-only engine decodes greedily when the request leaves temperature unset (its default, as a
        # model's generation_config.json sets one) and refuses a request that would sample.
        default_temperature = 1.0 if caps.supports_sampling else 0.0
        sampling = SamplingParams(
            temperature=default_temperature if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            seed=body.seed,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty,
            min_tokens=body.min_tokens,
            logit_bias=logit_bias,
        )
        self._check_greedy(sampling)
        return sampling

    def _check_greedy(self, sampling: SamplingParams) -> None:
        if not self._capabilities.supports_sampling and not sampling.is_greedy:
            raise RequestError(
                "temperature: this engine decodes greedily only (engine.transformers.sampling: greedy); "
                "set temperature to 0 or leave it unset",
                param="temperature",
            )


def _response_format_spec(response_format: ResponseFormat) -> GuidedDecodingSpec:
    if response_format.type == "json_object":
        return grammars.json_object_spec()
    assert response_format.json_schema is not None  # the protocol requires it for json_schema
    return grammars.json_schema_spec(response_format.json_schema.json_schema)


def _structured_outputs_spec(outputs: StructuredOutputs) -> GuidedDecodingSpec:
    if outputs.json_schema is not None:
        if isinstance(outputs.json_schema, str):
            return GuidedDecodingSpec("json_schema", outputs.json_schema)
        return grammars.json_schema_spec(outputs.json_schema)
    if outputs.regex is not None:
        return grammars.regex_spec(outputs.regex)
    if outputs.choice is not None:
        if len(outputs.choice) > grammars.MAX_CHOICES:
            raise RequestError(
                f"structured_outputs.choice: at most {grammars.MAX_CHOICES} choices are accepted",
                param="structured_outputs.choice",
            )
        return grammars.choice_spec(outputs.choice)
    if outputs.grammar is not None:
        return grammars.lark_spec(outputs.grammar)
    return grammars.json_object_spec()
