"""Mapping the engine contract onto TensorRT-LLM: GenerateRequest -> `Request`, results -> deltas.

Pure functions of the bindings module `tle` (passed in, never imported here), so they are testable
against the double and usable by the real bindings alike.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from deployments.config import TrtllmConfig
from deployments.executors.base import StopSequenceMatcher
from deployments.messages import (
    EngineCapabilities,
    FinishReason,
    GenerateRequest,
    GuidedDecodingKind,
    GuidedDecodingSpec,
    SamplingParams,
    TokenDelta,
)

# TensorRT-LLM FinishReason names -> contract. TIMED_OUT only follows allotted_time_ms, which is
# never set, and reads as the engine giving the request up.
_FINISH_REASONS = {
    "END_ID": FinishReason.END_ID,
    "STOP_WORDS": FinishReason.STOP,
    "LENGTH": FinishReason.LENGTH,
    "CANCELLED": FinishReason.CANCELLED,
    "TIMED_OUT": FinishReason.CANCELLED,
}


def kv_cache_kwargs(config: TrtllmConfig) -> dict[str, Any]:
    """The `KvCacheConfig` keywords both TensorRT-LLM APIs take by the same names (the binding's and the
    LLM API's; the LLM API adds `tokens_per_block`)."""
    return {
        "enable_block_reuse": config.enable_block_reuse,
        "max_tokens": config.max_kv_cache_tokens,
        "free_gpu_memory_fraction": config.free_gpu_memory_fraction,
        "host_cache_size": config.host_cache_size,
        "event_buffer_max_size": config.event_buffer_max_size,
        "enable_partial_reuse": config.enable_partial_reuse,
    }


def sampling_knobs(sampling: SamplingParams) -> dict[str, Any]:
    """The non-default sampling knobs, by the names both TensorRT-LLM APIs use (the 1.2 Executor's
    `SamplingConfig` and the LLM API's `SamplingParams`), so the engine's own defaults (and validation)
    apply to the rest.

    Greedy is `top_k=1` with no temperature: TRT-LLM has no temperature-0 mode.
    """
    kwargs: dict[str, Any] = {}
    if sampling.is_greedy:
        kwargs["top_k"] = 1
    else:
        kwargs["temperature"] = sampling.temperature
        if sampling.top_k > 0:
            kwargs["top_k"] = sampling.top_k
        # top_p <= 0 must be None (the binding rejects it); 1.0 is "off" either way.
        if 0.0 < sampling.top_p < 1.0:
            kwargs["top_p"] = sampling.top_p
    if sampling.seed is not None:
        kwargs["seed"] = sampling.seed
    if sampling.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = sampling.repetition_penalty
    if sampling.presence_penalty != 0.0:
        kwargs["presence_penalty"] = sampling.presence_penalty
    if sampling.frequency_penalty != 0.0:
        kwargs["frequency_penalty"] = sampling.frequency_penalty
    if sampling.min_tokens > 0:
        kwargs["min_tokens"] = sampling.min_tokens
    return kwargs


def build_sampling_config(tle: ModuleType, sampling: SamplingParams) -> Any:
    """`SamplingConfig(beam_width, *, ...)` with the non-default knobs (`sampling_knobs`)."""
    return tle.SamplingConfig(1, **sampling_knobs(sampling))


# The contract's guide kinds -> `GuidedDecodingParams.GuideType` names (nanobind/executor/request.cpp).
# A Lark grammar is an EBNF_GRAMMAR guide: llguidance reads that guide as Lark (TensorRT-LLM's
# `LLGuidanceMatcherFactory`), xgrammar as its own EBNF, so it goes only to llguidance.
_GUIDE_TYPES: dict[GuidedDecodingKind, str] = {
    "json_object": "JSON",
    "json_schema": "JSON_SCHEMA",
    "regex": "REGEX",
    "lark": "EBNF_GRAMMAR",
}
GUIDED_KINDS_BY_BACKEND: dict[str, tuple[GuidedDecodingKind, ...]] = {
    "xgrammar": ("json_object", "json_schema", "regex"),
    "llguidance": ("json_object", "json_schema", "regex", "lark"),
}
_NO_GUIDED_HINT = "set trtllm.guided_decoding_backend to enable guided decoding"


def trtllm_capabilities(guided_backend: str | None) -> EngineCapabilities:
    """Both TensorRT-LLM executors: seeds, penalties, min_tokens and the sampled token's logprobs; guided
    decoding with the kinds its grammar backend reads."""
    return EngineCapabilities(
        supports_seed=True,
        supports_penalties=True,
        supports_min_tokens=True,
        supports_logprobs=True,
        guided_decoding_kinds=GUIDED_KINDS_BY_BACKEND.get(guided_backend or "", ()),
        unsupported_hint="" if guided_backend else _NO_GUIDED_HINT,
    )


def build_guided_decoding_params(tle: ModuleType, spec: GuidedDecodingSpec | None) -> Any | None:
    """The binding's `GuidedDecodingParams(guide_type, guide=None)`; a JSON guide has no guide text."""
    if spec is None:
        return None
    guide_type = getattr(tle.GuidedDecodingParams.GuideType, _GUIDE_TYPES[spec.kind])
    if spec.kind == "json_object":
        return tle.GuidedDecodingParams(guide_type)
    return tle.GuidedDecodingParams(guide_type, guide=spec.grammar)


def xgrammar_tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """`GuidedDecodingConfig` keywords for xgrammar, as TensorRT-LLM's `_xgrammar_tokenizer_info`
    (tensorrt_llm/llmapi/tokenizer.py) builds them: the vocabulary in id order, the fast tokenizer's
    JSON, and EOS as the one stop token."""
    vocab = tokenizer.get_vocab()
    return {
        "encoded_vocab": [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])],
        "tokenizer_str": tokenizer.backend_tokenizer.to_str(),
        "stop_token_ids": [tokenizer.eos_token_id],
    }


def build_retention_config(
    tle: ModuleType, request: GenerateRequest, *, decode_retention_priority: int
) -> Any | None:
    """Pins a prompt range (e.g. a session's system prompt) above the decode priority."""
    if request.retention is None:
        return None
    token_range = tle.KvCacheRetentionConfig.TokenRangeRetentionConfig(
        request.retention.start, request.retention.end, request.retention.priority
    )
    # `directory` is a `std::string` in the 1.2 binding whose default (None) cannot convert: it
    # must be given (nanobind/executor/request.cpp); it only matters for GDS transfer modes.
    return tle.KvCacheRetentionConfig(
        [token_range], decode_retention_priority=decode_retention_priority, directory=""
    )


def build_request(
    tle: ModuleType, request: GenerateRequest, *, client_id: int, decode_retention_priority: int
) -> Any:
    """A streaming `Request`; everything after `max_tokens` is keyword-only in the bindings.

    Without an end id the engine must not stop on any token, so -1 is sent (the LLM API's ignore_eos
    convention); what `end_id=None` does is undocumented.
    """
    end_id = request.end_id if request.end_id is not None else -1
    pad_id = request.pad_id if request.pad_id is not None else request.end_id
    stop_words = [list(seq) for seq in request.stop_token_sequences if seq] or None
    return tle.Request(
        list(request.prompt_token_ids),
        request.max_tokens,
        streaming=True,
        sampling_config=build_sampling_config(tle, request.sampling),
        # Perf metrics carry the request's KV reuse (`kv_cache_metrics.num_reused_blocks`), the
        # only per-request cached-token figure the 1.2 Executor gives.
        output_config=tle.OutputConfig(
            return_log_probs=request.return_logprobs, return_perf_metrics=True
        ),
        end_id=end_id,
        pad_id=pad_id,
        stop_words=stop_words,
        client_id=client_id,
        kv_cache_retention_config=build_retention_config(
            tle, request, decode_retention_priority=decode_retention_priority
        ),
        guided_decoding_params=build_guided_decoding_params(tle, request.guided_decoding),
    )


def reused_prompt_tokens(result: Any, tokens_per_block: int, num_prompt_tokens: int) -> int:
    """The prompt tokens whose KV a 1.2 Executor `Result` says were reused: its perf metrics' reused
    blocks (`RequestPerfMetrics.kv_cache_metrics.num_reused_blocks`, fixed when the request was
    admitted) in tokens, capped by the prompt. With partial reuse the last reused block may hold fewer
    matching tokens than a whole block; the count is still that of whole blocks.
    """
    metrics = result.request_perf_metrics
    if metrics is None:
        return 0
    return min(
        int(metrics.kv_cache_metrics.num_reused_blocks) * tokens_per_block, num_prompt_tokens
    )


class DeltaAssembler:
    """Turns one request's streamed results into `TokenDelta`s that honour the contract.

    The engine stops on stop sequences itself but returns their tokens, possibly across several
    responses; a `StopSequenceMatcher` holds back any tokens that may start one, so a matched
    sequence never reaches the client. An end id at the tail of the output is dropped as well.
    Threading: used by the awaiter thread only.
    """

    __slots__ = (
        "_end_id",
        "_has_sent",
        "_num_logprobs_seen",
        "_held_logprobs",
        "_matcher",
        "_num_cached_tokens",
        "_num_generated",
        "_num_prompt_tokens",
        "_return_logprobs",
        "_stop_sequences",
        "_tail",
        "is_done",
    )

    def __init__(self, request: GenerateRequest) -> None:
        self._end_id = request.end_id
        self._stop_sequences = [tuple(s) for s in request.stop_token_sequences if s]
        self._matcher = StopSequenceMatcher(self._stop_sequences)
        self._return_logprobs = request.return_logprobs
        self._num_prompt_tokens = len(request.prompt_token_ids)
        self._num_cached_tokens = 0
        max_stop_len = max((len(s) for s in self._stop_sequences), default=0)
        self._tail = list(request.prompt_token_ids[-max_stop_len:]) if max_stop_len else []
        self._num_generated = 0
        self._held_logprobs: list[float] = []
        self._num_logprobs_seen = 0
        self._has_sent = False
        self.is_done = False

    def feed(
        self,
        token_ids: list[int],
        logprobs: list[float] | None,
        engine_reason: str | None,
        *,
        are_logprobs_cumulative: bool = False,
        num_cached_tokens: int = 0,
    ) -> TokenDelta | None:
        """One engine result (`engine_reason` is the FinishReason name when final).

        `num_cached_tokens`: the prompt tokens the engine reports reused so far; the first delta
        carries the count.

        `token_ids` are the new tokens. `logprobs` are theirs, or, with `are_logprobs_cumulative`,
        the request's whole vector so far, as the 1.2 Executor streams them (`createResult` in
        llmRequest.cpp; the vector may already hold entries past these tokens, which are ignored).
        Returns the delta to deliver, or None when nothing is ready. Sets `is_done` once a final
        delta is returned; a stop sequence the matcher sees first finishes the request early.
        """
        token_ids = list(token_ids)
        self._num_cached_tokens = max(self._num_cached_tokens, num_cached_tokens)
        if self._return_logprobs:
            new = list(logprobs or [])
            if are_logprobs_cumulative:
                new = new[self._num_logprobs_seen : self._num_logprobs_seen + len(token_ids)]
            new = new[: len(token_ids)]
            self._held_logprobs.extend(new + [0.0] * (len(token_ids) - len(new)))
            self._num_logprobs_seen += len(token_ids)
        if engine_reason == "END_ID" and token_ids and token_ids[-1] == self._end_id:
            token_ids.pop()
            self._held_logprobs = self._held_logprobs[: len(self._held_logprobs) - 1]
        self._remember(token_ids)
        emitted, is_stopped = self._matcher.feed(token_ids)
        reason: FinishReason | None = FinishReason.STOP if is_stopped else None
        if reason is None and engine_reason is not None:
            reason = _FINISH_REASONS.get(engine_reason, FinishReason.LENGTH)
            emitted += self._matcher.flush()
            if engine_reason == "STOP_WORDS":
                # The engine matched a sequence that began in the prompt: drop its generated part.
                del emitted[len(emitted) - min(self._num_stop_tokens_generated(), len(emitted)) :]
        if not emitted and reason is None:
            return None
        delta = TokenDelta(token_ids=emitted, finish_reason=reason)
        if self._return_logprobs:
            delta.logprobs = self._held_logprobs[: len(emitted)]
            self._held_logprobs = self._held_logprobs[len(emitted) :]
        if not self._has_sent:
            delta.num_prompt_tokens = self._num_prompt_tokens
            delta.num_cached_tokens = self._num_cached_tokens
            self._has_sent = True
        self.is_done = reason is not None
        return delta

    def _remember(self, token_ids: list[int]) -> None:
        self._num_generated += len(token_ids)
        if self._tail or self._stop_sequences:
            keep = max(len(s) for s in self._stop_sequences)
            self._tail = (self._tail + token_ids)[-keep:]

    def _num_stop_tokens_generated(self) -> int:
        for seq in self._stop_sequences:
            if tuple(self._tail[-len(seq) :]) == seq:
                return min(len(seq), self._num_generated)
        return 0


def finish_reason_name(result: Any) -> str | None:
    """The beam-0 FinishReason name of a final result, None while the request runs."""
    if not result.is_final:
        return None
    reasons = result.finish_reasons
    return str(reasons[0].name) if reasons else "LENGTH"
