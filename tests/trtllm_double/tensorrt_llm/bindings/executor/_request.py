"""Request, SamplingConfig, OutputConfig, retention config, Response and Result.

Signatures from nanobind/executor/request.cpp@ac456dca (reference §2.2, §3, §5): Request is
keyword-only after `max_tokens`, SamplingConfig after `beam_width`. Response.error_msg and
Response.result throw (RuntimeError) when the response is not of that kind; `has_error` is a method.
"""

from __future__ import annotations

import datetime
from typing import Any

from ._enums import FinishReason, KvCacheTransferMode, RequestType
from ._guided import GuidedDecodingParams


class SamplingConfig:
    def __init__(
        self,
        beam_width: int = 1,
        *,
        top_k: int | None = None,
        top_p: float | None = None,
        top_p_min: float | None = None,
        top_p_reset_ids: int | None = None,
        top_p_decay: float | None = None,
        seed: int | None = None,
        temperature: float | None = None,
        min_tokens: int | None = None,
        beam_search_diversity_rate: float | None = None,
        repetition_penalty: float | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        length_penalty: float | None = None,
        early_stopping: int | None = None,
        no_repeat_ngram_size: int | None = None,
        num_return_sequences: int | None = None,
        min_p: float | None = None,
        beam_width_array: list[int] | None = None,
    ) -> None:
        # executor.h checks (TLLM_CHECK -> RuntimeError)
        if beam_width < 1:
            raise RuntimeError("[TensorRT-LLM][ERROR] Assertion failed: beamWidth > 0")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise RuntimeError("[TensorRT-LLM][ERROR] Assertion failed: topP in (0, 1]")
        if temperature is not None and temperature < 0.0:
            raise RuntimeError("[TensorRT-LLM][ERROR] Assertion failed: temperature >= 0")
        if repetition_penalty is not None and repetition_penalty <= 0.0:
            raise RuntimeError("[TensorRT-LLM][ERROR] Assertion failed: repetitionPenalty > 0")
        self.beam_width = beam_width
        self.top_k = top_k
        self.top_p = top_p
        self.top_p_min = top_p_min
        self.top_p_reset_ids = top_p_reset_ids
        self.top_p_decay = top_p_decay
        self.seed = seed
        self.temperature = temperature
        self.min_tokens = min_tokens
        self.beam_search_diversity_rate = beam_search_diversity_rate
        self.repetition_penalty = repetition_penalty
        self.presence_penalty = presence_penalty
        self.frequency_penalty = frequency_penalty
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.no_repeat_ngram_size = no_repeat_ngram_size
        self.num_return_sequences = num_return_sequences
        self.min_p = min_p
        self.beam_width_array = beam_width_array


class OutputConfig:
    def __init__(
        self,
        return_log_probs: bool | None = None,
        return_context_logits: bool | None = None,
        return_generation_logits: bool | None = None,
        exclude_input_from_output: bool | None = None,
        return_encoder_output: bool | None = None,
        return_perf_metrics: bool | None = None,
        additional_model_outputs: list[Any] | None = None,
    ) -> None:
        self.return_log_probs = bool(return_log_probs)
        self.return_context_logits = bool(return_context_logits)
        self.return_generation_logits = bool(return_generation_logits)
        self.exclude_input_from_output = bool(exclude_input_from_output)
        self.return_encoder_output = bool(return_encoder_output)
        self.return_perf_metrics = bool(return_perf_metrics)
        self.additional_model_outputs = additional_model_outputs


class _TokenRangeRetentionConfig:
    def __init__(
        self,
        token_start: int,
        token_end: int | None,
        priority: int,
        duration_ms: datetime.timedelta | None = None,
    ) -> None:
        if not 0 <= priority <= 100:
            raise RuntimeError("[TensorRT-LLM][ERROR] Assertion failed: priority in [0, 100]")
        if token_end is not None and token_end <= token_start:
            raise RuntimeError("[TensorRT-LLM][ERROR] Assertion failed: tokenStart < tokenEnd")
        self.token_start = token_start
        self.token_end = token_end
        self.priority = priority
        self.duration_ms = duration_ms


class KvCacheRetentionConfig:
    TokenRangeRetentionConfig = _TokenRangeRetentionConfig

    def __init__(
        self,
        token_range_retention_configs: list[_TokenRangeRetentionConfig],
        decode_retention_priority: int = 35,
        decode_duration_ms: datetime.timedelta | None = None,
        transfer_mode: KvCacheTransferMode = KvCacheTransferMode.DRAM,
        directory: str | None = None,
    ) -> None:
        # nanobind/executor/request.cpp (1.2.x): `nb::init<..., tle::KvCacheTransferMode, std::string>()`
        # with `nb::arg("directory") = nb::none()`. A None default cannot convert to std::string, so
        # a call that leaves `directory` out is rejected like any other unconvertible argument.
        if not isinstance(directory, str):
            raise TypeError(
                "__init__(): incompatible function arguments. The following argument types are "
                "supported:\n    1. __init__(self, token_range_retention_configs: "
                "collections.abc.Sequence[KvCacheRetentionConfig.TokenRangeRetentionConfig], "
                "decode_retention_priority: int = 35, decode_duration_ms: datetime.timedelta | None "
                "= None, transfer_mode: KvCacheTransferMode = KvCacheTransferMode.DRAM, directory: "
                f"str = None) -> None\n\nInvoked with types: directory: {type(directory).__name__}"
            )
        if not 0 <= decode_retention_priority <= 100:
            raise RuntimeError("[TensorRT-LLM][ERROR] Assertion failed: priority in [0, 100]")
        self.token_range_retention_configs = list(token_range_retention_configs)
        self.decode_retention_priority = decode_retention_priority
        self.decode_duration_ms = decode_duration_ms
        self.transfer_mode = transfer_mode
        self.directory = directory


_DEFAULT_SAMPLING_CONFIG = SamplingConfig()
_DEFAULT_OUTPUT_CONFIG = OutputConfig()


class Request:
    BATCHED_POST_PROCESSOR_NAME = "batched"

    def __init__(
        self,
        input_token_ids: list[int],
        max_tokens: int,
        *,
        streaming: bool = False,
        sampling_config: SamplingConfig = _DEFAULT_SAMPLING_CONFIG,
        output_config: OutputConfig = _DEFAULT_OUTPUT_CONFIG,
        end_id: int | None = None,
        pad_id: int | None = None,
        position_ids: list[int] | None = None,
        bad_words: list[list[int]] | None = None,
        stop_words: list[list[int]] | None = None,
        embedding_bias: Any = None,
        external_draft_tokens_config: Any = None,
        prompt_tuning_config: Any = None,
        multimodal_input: Any = None,
        multimodal_embedding: Any = None,
        mrope_config: Any = None,
        lora_config: Any = None,
        lookahead_config: Any = None,
        kv_cache_retention_config: KvCacheRetentionConfig | None = None,
        logits_post_processor_name: str | None = None,
        logits_post_processor: Any = None,
        encoder_input_token_ids: list[int] | None = None,
        client_id: int | None = None,
        return_all_generated_tokens: bool = False,
        priority: float = 0.5,
        type: RequestType = RequestType.REQUEST_TYPE_CONTEXT_AND_GENERATION,
        context_phase_params: Any = None,
        encoder_input_features: Any = None,
        encoder_output_length: int | None = None,
        cross_attention_mask: Any = None,
        num_return_sequences: int = 1,
        eagle_config: Any = None,
        skip_cross_attn_blocks: Any = None,
        guided_decoding_params: Any = None,
        language_adapter_uid: int | None = None,
        allotted_time_ms: datetime.timedelta | None = None,
        cache_salt_id: int | None = None,
    ) -> None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            raise TypeError("__init__(): incompatible function arguments (max_tokens: int)")
        self._input_token_ids = [int(t) for t in input_token_ids]
        self._max_tokens = max_tokens
        self.streaming = streaming
        self.sampling_config = sampling_config
        self.output_config = output_config
        self.end_id = end_id
        self.pad_id = pad_id
        self.position_ids = position_ids
        self.bad_words = bad_words
        self.stop_words = stop_words
        self.embedding_bias = embedding_bias
        self.external_draft_tokens_config = external_draft_tokens_config
        self.prompt_tuning_config = prompt_tuning_config
        self.multimodal_input = multimodal_input
        self.multimodal_embedding = multimodal_embedding
        self.mrope_config = mrope_config
        self.lora_config = lora_config
        self.lookahead_config = lookahead_config
        self.kv_cache_retention_config = kv_cache_retention_config
        self.logits_post_processor_name = logits_post_processor_name
        self.logits_post_processor = logits_post_processor
        self.encoder_input_token_ids = encoder_input_token_ids
        self.client_id = client_id
        self.return_all_generated_tokens = return_all_generated_tokens
        self.priority = priority
        self.request_type = type
        self.context_phase_params = context_phase_params
        self.encoder_input_features = encoder_input_features
        self.encoder_output_length = encoder_output_length
        self.cross_attention_mask = cross_attention_mask
        self.num_return_sequences = num_return_sequences
        self.eagle_config = eagle_config
        self.skip_cross_attn_blocks = skip_cross_attn_blocks
        if guided_decoding_params is not None and not isinstance(
            guided_decoding_params, GuidedDecodingParams
        ):
            raise TypeError(
                "__init__(): incompatible function arguments (guided_decoding_params must be "
                "tensorrt_llm.bindings.executor.GuidedDecodingParams or None)"
            )
        self.guided_decoding_params = guided_decoding_params
        self.language_adapter_uid = language_adapter_uid
        self.allotted_time_ms = allotted_time_ms
        self.cache_salt_id = cache_salt_id

    @property
    def input_token_ids(self) -> list[int]:
        return list(self._input_token_ids)

    @property
    def max_tokens(self) -> int:
        return self._max_tokens


class KvCacheMetrics:
    """`RequestPerfMetrics.KvCacheMetrics`, bound as `KvCacheMetrics` with read-write fields
    (nanobind/executor/request.cpp@008b2b8d): the request's KV blocks at admission, of which
    `num_reused_blocks` were found in the reuse tree and `num_missed_blocks` were not."""

    def __init__(self) -> None:
        self.num_total_allocated_blocks = 0
        self.num_new_allocated_blocks = 0
        self.num_reused_blocks = 0
        self.num_missed_blocks = 0
        self.kv_cache_hit_rate = 0.0


class TimingMetrics:
    def __init__(self) -> None:
        zero = datetime.timedelta(0)
        self.arrival_time = zero
        self.first_scheduled_time = zero
        self.first_token_time = zero
        self.last_token_time = zero
        self.kv_cache_transfer_start = zero
        self.kv_cache_transfer_end = zero
        self.kv_cache_size = 0


class SpeculativeDecodingMetrics:
    def __init__(self) -> None:
        self.acceptance_rate = 0.0
        self.total_accepted_draft_tokens = 0
        self.total_draft_tokens = 0


class RequestPerfMetrics:
    """`Result.request_perf_metrics` when the request's `OutputConfig(return_perf_metrics=True)`
    (nanobind/executor/request.cpp@008b2b8d: `RequestPerfMetrics()` with read-write fields)."""

    def __init__(self) -> None:
        self.timing_metrics = TimingMetrics()
        self.kv_cache_metrics = KvCacheMetrics()
        self.speculative_decoding = SpeculativeDecodingMetrics()
        self.first_iter: int | None = None
        self.last_iter: int | None = None
        self.iter: int | None = None


class Result:
    """Per-beam lists; in streaming mode `output_token_ids` holds only the new tokens."""

    def __init__(
        self,
        *,
        is_final: bool,
        output_token_ids: list[list[int]],
        finish_reasons: list[FinishReason],
        log_probs: list[list[float]] | None = None,
        cum_log_probs: list[float] | None = None,
        decoding_iter: int = 0,
        request_perf_metrics: RequestPerfMetrics | None = None,
    ) -> None:
        self.is_final = is_final
        self.output_token_ids = output_token_ids
        self.finish_reasons = finish_reasons
        self.log_probs = log_probs
        self.cum_log_probs = cum_log_probs
        self.context_logits = None
        self.generation_logits = None
        self.spec_dec_fast_logits_info = None
        self.encoder_output = None
        self.sequence_index = 0
        self.is_sequence_final = is_final
        self.decoding_iter = decoding_iter
        self.avg_decoded_tokens_per_iter = 1.0
        self.context_phase_params = None
        self.request_perf_metrics = request_perf_metrics
        self.additional_outputs: list[Any] = []


class Response:
    def __init__(
        self,
        request_id: int,
        result_or_error: Result | str,
        client_id: int | None = None,
    ) -> None:
        self._request_id = request_id
        self._client_id = client_id
        self._result = result_or_error if isinstance(result_or_error, Result) else None
        self._error = result_or_error if isinstance(result_or_error, str) else None

    @property
    def request_id(self) -> int:
        return self._request_id

    @property
    def client_id(self) -> int | None:
        return self._client_id

    def has_error(self) -> bool:
        return self._error is not None

    @property
    def error_msg(self) -> str:
        if self._error is None:
            raise RuntimeError("Cannot get the error message of a response without an error")
        return self._error

    @property
    def result(self) -> Result:
        if self._result is None:
            raise RuntimeError(f"Cannot get the result of a response with an error: {self._error}")
        return self._result

    def clear_context_logits(self) -> None:
        if self._result is not None:
            self._result.context_logits = None

    def clear_generation_logits(self) -> None:
        if self._result is not None:
            self._result.generation_logits = None
