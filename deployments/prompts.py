"""From an OpenAI request to a `GenerateRequest`: prompt ids, token budget, sampling, stop ids (router side)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deployments.config import AppConfig
from deployments.errors import ContextLengthExceeded, RequestError
from deployments.messages import EngineCapabilities, GenerateRequest, RetentionRange, SamplingParams
from deployments.protocol import ChatCompletionRequest, CompletionRequest
from deployments.tokenization import ChatTemplate, encode, stop_token_ids
from deployments.tool_parsers import detect_family


def model_context_window(model_dir: str) -> int | None:
    """The context window a Hugging Face config.json (or a trtllm-build engine config.json) declares."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        return None
    config = json.loads(path.read_text())
    build = config.get("build_config") or {}
    for value in (build.get("max_seq_len"), config.get("max_position_embeddings")):
        if isinstance(value, int) and value > 0:
            return value
    return None


class PromptBuilder:
    """Owns the tokenizer-side decisions so that router handlers stay a readable flow."""

    def __init__(
        self, config: AppConfig, tokenizer: Any, model_dir: str, capabilities: EngineCapabilities
    ) -> None:
        self._config = config
        self._tokenizer = tokenizer
        self._template = (
            ChatTemplate(tokenizer) if getattr(tokenizer, "chat_template", None) else None
        )
        self._capabilities = capabilities
        self.model_name = config.model.served_model_name or Path(model_dir).name
        window = config.model.max_model_len or model_context_window(model_dir)
        if window is None:
            raise ValueError(
                f"{model_dir}: no context window in config.json; set model.max_model_len"
            )
        self.max_model_len = window
        self._end_id, self._stop_sequences = stop_token_ids(tokenizer)
        template_text = str(getattr(tokenizer, "chat_template", "") or "")
        configured = config.router.tool_parser
        self.tool_parser_family = (
            detect_family(template_text) if configured == "auto" else configured
        )

    def check_chat(self, body: ChatCompletionRequest) -> None:
        """What this server cannot honour for a chat request is refused up front, naming the field."""
        if self._template is None:
            raise RequestError(
                "this model has no chat template; use /v1/completions", param="messages"
            )
        if body.tool_choice == "required" or (
            body.tool_choice is not None and not isinstance(body.tool_choice, str)
        ):
            # Forcing a call needs guided decoding, which neither engine offers here.
            raise RequestError(
                "tool_choice 'required' or a named function needs guided decoding, which this server does not "
                "support; use 'auto'",
                param="tool_choice",
            )
        if body.tools and self.tool_parser_family is None:
            raise RequestError(
                "this model's chat template has no known tool-call format; set router.tool_parser",
                param="tools",
            )
        if body.top_logprobs:
            raise RequestError(
                "top_logprobs > 0 is not supported (only the sampled token's)", param="top_logprobs"
            )
        if body.logprobs and not self._capabilities.supports_logprobs:
            raise RequestError("logprobs are not supported by this engine", param="logprobs")

    def check_completion(self, body: CompletionRequest) -> None:
        if body.suffix is not None:
            raise RequestError("suffix is not supported", param="suffix")
        if body.logprobs:
            raise RequestError(
                "logprobs > 0 is not supported (use 0: the sampled token's)", param="logprobs"
            )
        if body.logprobs is not None and not self._capabilities.supports_logprobs:
            raise RequestError("logprobs are not supported by this engine", param="logprobs")

    def render_chat(self, body: ChatCompletionRequest) -> list[int]:
        self.check_chat(body)
        assert self._template is not None
        messages = [message.to_template_dict() for message in body.messages]
        return self._template.render(messages, tools=body.tool_dicts())

    def render_tokenize(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        add_generation_prompt: bool,
    ) -> list[int]:
        if self._template is None:
            raise RequestError("this model has no chat template", param="messages")
        return self._template.render(
            messages, tools=tools, add_generation_prompt=add_generation_prompt
        )

    def encode_prompt(
        self, prompt: str | list[int], *, add_special_tokens: bool = True
    ) -> list[int]:
        if isinstance(prompt, str):
            return encode(self._tokenizer, prompt, add_special_tokens=add_special_tokens)
        vocab_size = len(self._tokenizer)
        bad = next((token_id for token_id in prompt if not 0 <= token_id < vocab_size), None)
        if bad is not None:
            raise RequestError(
                f"prompt: token id {bad} is outside the vocabulary [0, {vocab_size})",
                param="prompt",
            )
        return list(prompt)

    def decode(self, token_ids: list[int]) -> str:
        return str(self._tokenizer.decode(token_ids, skip_special_tokens=True))

    def generate_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        body: ChatCompletionRequest | CompletionRequest,
        *,
        max_tokens: int | None = None,
        session_id: str | None = None,
        retention: RetentionRange | None = None,
    ) -> GenerateRequest:
        """`max_tokens` is given when a session already fitted the turn to the context window."""
        if max_tokens is None:
            max_tokens = self._max_tokens(len(prompt_token_ids), body.requested_max_tokens())
        return GenerateRequest(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            max_tokens=max_tokens,
            session_id=session_id,
            retention=retention,
            sampling=self._sampling(body),
            end_id=None if body.ignore_eos else self._end_id,
            pad_id=self._tokenizer.pad_token_id,
            stop_token_sequences=() if body.ignore_eos else self._stop_sequences,
            return_logprobs=bool(body.logprobs is not None and body.logprobs is not False),
        )

    def _max_tokens(self, num_prompt_tokens: int, requested: int | None) -> int:
        room = self.max_model_len - num_prompt_tokens
        if room <= 0:
            raise ContextLengthExceeded(
                f"the prompt has {num_prompt_tokens} tokens; this model's context window is "
                f"{self.max_model_len} tokens and leaves no room to generate"
            )
        if requested is None:
            return min(self._config.router.default_max_tokens, room)
        if requested > room:
            raise ContextLengthExceeded(
                f"max_tokens={requested} plus the prompt's {num_prompt_tokens} tokens exceeds the "
                f"context window of {self.max_model_len} tokens",
                param="max_tokens",
            )
        return requested

    def _sampling(self, body: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
        caps = self._capabilities
        if body.seed is not None and not caps.supports_seed:
            raise RequestError("seed is not supported by this engine", param="seed")
        if not caps.supports_penalties:
            for param, value, neutral in (
                ("presence_penalty", body.presence_penalty, 0.0),
                ("frequency_penalty", body.frequency_penalty, 0.0),
                ("repetition_penalty", body.repetition_penalty, 1.0),
            ):
                if value != neutral:
                    raise RequestError(f"{param} is not supported by this engine", param=param)
        if body.min_tokens and not caps.supports_min_tokens:
            raise RequestError("min_tokens is not supported by this engine", param="min_tokens")
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
        )
        if not caps.supports_sampling and not sampling.is_greedy:
            raise RequestError(
                "temperature: this engine decodes greedily only (engine.transformers.sampling: greedy); "
                "set temperature to 0 or leave it unset",
                param="temperature",
            )
        return sampling
