"""Double of `tensorrt_llm.sampling_params` (the LLM API's per-request parameters).

Fields, defaults, `__post_init__` and `_validate` follow tensorrt_llm/sampling_params.py as read at
NVIDIA/TensorRT-LLM@a98a9061 (version.py not stored at that commit; `@dataclass(slots=True, kw_only=True)`,
`stop_token_ids` are single tokens, `end_id=None` makes `LLM` fill it from its tokenizer). Only the
fields the double acts on are used further; the others are accepted and ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

from tensorrt_llm.bindings import executor as tllme


@dataclass(slots=True, kw_only=True)
class GuidedDecodingParams:
    json: Any = None
    regex: str | None = None
    grammar: str | None = None
    json_object: bool = False
    structural_tag: str | None = None

    def _validate(self) -> None:
        num_guides = sum(bool(getattr(self, f.name)) for f in fields(self))
        if num_guides > 1:
            raise ValueError(f"Only one guide can be used for a request, but got {num_guides}.")


@dataclass(slots=True, kw_only=True)
class SamplingParams:
    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    bad: str | list[str] | None = None
    bad_token_ids: list[int] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    embedding_bias: Any = None
    logits_processor: Any = None
    apply_batched_logits_processor: bool = False
    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    top_k: int | None = None
    top_p: float | None = None
    top_p_min: float | None = None
    top_p_reset_ids: int | None = None
    top_p_decay: float | None = None
    seed: int | None = None
    temperature: float | None = None
    min_tokens: int | None = None
    beam_search_diversity_rate: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    length_penalty: float | None = None
    early_stopping: int | None = None
    no_repeat_ngram_size: int | None = None
    min_p: float | None = None
    beam_width_array: list[int] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    return_context_logits: bool = False
    return_generation_logits: bool = False
    exclude_input_from_output: bool = True
    return_encoder_output: bool = False
    return_perf_metrics: bool = False
    additional_model_outputs: list[str] | None = None
    lookahead_config: Any = None
    guided_decoding: GuidedDecodingParams | None = None
    ignore_eos: bool = False
    detokenize: bool = True
    add_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    _stream_interval: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.pad_id is None:
            self.pad_id = self.end_id
        self.best_of = self.best_of or self.n
        self._validate()

    def _validate(self) -> None:
        if self.top_p is not None and (self.top_p < 0 or self.top_p > 1):
            raise ValueError(f"require 0 <= top_p <= 1, got top_p={self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"require top_k >= 0, got top_k={self.top_k}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"require temperature >= 0, got temperature={self.temperature}")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) cannot be less than n ({self.n})")
        if (
            self.best_of is not None
            and self.best_of > 1
            and self._greedy_decoding
            and not os.environ.get("TLLM_ALLOW_N_GREEDY_DECODING", None)
        ):
            raise ValueError("Greedy decoding in the LLM API does not allow multiple returns.")
        if self.guided_decoding is not None:
            self.guided_decoding._validate()
        self.logprobs = self.logprobs and int(self.logprobs)
        self.prompt_logprobs = self.prompt_logprobs and int(self.prompt_logprobs)

    @staticmethod
    def params_imply_greedy_decoding(
        *, temperature: float | None, top_p: float | None, top_k: int | None
    ) -> bool:
        return (
            (temperature is None and top_p is None and top_k is None)
            or top_k == 1
            or top_p == 0.0
            or temperature == 0
        )

    @property
    def _greedy_decoding(self) -> bool:
        return not self.use_beam_search and self.params_imply_greedy_decoding(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k
        )

    def _get_stop_words(self) -> list[list[int]]:
        if self.stop is not None:
            raise RuntimeError(
                f"{self.__class__.__name__}.stop ({self.stop}) is not processed by tokenizer, "
                "please call the setup method."
            )
        return [[i] for i in self.stop_token_ids or []]

    def _get_stop_reasons_and_words(self) -> list[tuple[int | str, list[int]]]:
        return list(zip(self.stop_token_ids or [], self._get_stop_words(), strict=False))

    def _get_sampling_config(self) -> Any:
        # beam width 1, n == best_of == num_return_sequences (sampling; beam search is not doubled)
        greedy = self._greedy_decoding
        return tllme.SamplingConfig(
            1,
            top_k=1 if greedy and self.top_k is None else self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            temperature=self.temperature,
            min_tokens=self.min_tokens,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            num_return_sequences=self.best_of,
        )

    def _get_guided_decoding_params(self) -> Any:
        """sampling_params.py: at most one guide; a dict schema is dumped, a JSON object has no guide."""
        guided = self.guided_decoding
        if guided is None:
            return None
        guide_type = tllme.GuidedDecodingParams.GuideType
        if guided.json_object:
            return tllme.GuidedDecodingParams(guide_type.JSON)
        if guided.json is not None:
            schema = guided.json
            if hasattr(schema, "model_json_schema"):
                schema = schema.model_json_schema()
            if isinstance(schema, dict):
                schema = json.dumps(schema)
            return tllme.GuidedDecodingParams(guide_type.JSON_SCHEMA, schema)
        if guided.regex is not None:
            return tllme.GuidedDecodingParams(guide_type.REGEX, guided.regex)
        if guided.grammar is not None:
            return tllme.GuidedDecodingParams(guide_type.EBNF_GRAMMAR, guided.grammar)
        if guided.structural_tag is not None:
            return tllme.GuidedDecodingParams(guide_type.STRUCTURAL_TAG, guided.structural_tag)
        return None

    def _get_output_config(self, is_pytorch_backend: bool = False) -> Any:
        # PyTorch backend: `config_kwargs["return_log_probs"] = bool(self.logprobs)`.
        return tllme.OutputConfig(
            return_log_probs=bool(self.logprobs),
            exclude_input_from_output=self.exclude_input_from_output,
            return_perf_metrics=self.return_perf_metrics,
        )
