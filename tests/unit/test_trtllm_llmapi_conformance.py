"""The LLM API double (`tensorrt_llm.LLM`, `tensorrt_llm.llmapi`) against the real TensorRT-LLM
sources, as read in the stored copies of NVIDIA/TensorRT-LLM:

- LLM_ARGS: tensorrt_llm/llmapi/llm_args.py@c40f1157 (`KvCacheConfig`, `BaseLlmArgs`). The same
  commit is the project's 1.2-line source of nanobind executorConfig.cpp; its version.py is not
  stored, so the version is not read from the commit itself.
- SAMPLING: tensorrt_llm/sampling_params.py@a98a9061 (`GuidedDecodingParams`, `SamplingParams`).
- RESULT: tensorrt_llm/executor/result.py@a678b91a (`Logprob`, `CompletionOutput`,
  `GenerationResultBase`).
- LLM_PY: tensorrt_llm/llmapi/llm.py@4c05a748 (`BaseLLM`, with `scheduling_params`, `cache_salt`,
  `TorchLlmArgs` and the "got invalid argument" key check).

Each table row is (name, kind, default) for a signature, or (field, default) for a pydantic model or
dataclass; only what production passes or reads is pinned.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any

import pytest

from tests import trtllm_support as _support  # puts the double on sys.path

llmapi: Any = importlib.import_module("tensorrt_llm.llmapi")
result_mod: Any = importlib.import_module("tensorrt_llm.executor.result")
sampling_mod: Any = importlib.import_module("tensorrt_llm.sampling_params")
tensorrt_llm: Any = importlib.import_module("tensorrt_llm")

POS = inspect.Parameter.POSITIONAL_OR_KEYWORD
VAR_KW = inspect.Parameter.VAR_KEYWORD
REQUIRED = inspect.Parameter.empty
FACTORY = object()  # a dataclass field with default_factory (list)

LLM_ARGS = "tensorrt_llm/llmapi/llm_args.py@c40f1157"
SAMPLING = "tensorrt_llm/sampling_params.py@a98a9061"
RESULT = "tensorrt_llm/executor/result.py@a678b91a"
LLM_PY = "tensorrt_llm/llmapi/llm.py@4c05a748"

# `LLM.__init__`'s explicit parameters (LLM_PY, mirrored by BaseLlmArgs' "Explicit arguments").
LLM_INIT = [
    ("model", POS, REQUIRED),
    ("tokenizer", POS, None),
    ("tokenizer_mode", POS, "auto"),
    ("skip_tokenizer_init", POS, False),
    ("trust_remote_code", POS, False),
    ("tensor_parallel_size", POS, 1),
    ("dtype", POS, "auto"),
    ("revision", POS, None),
    ("tokenizer_revision", POS, None),
    ("kwargs", VAR_KW, REQUIRED),
]
GENERATE_ASYNC = [
    ("inputs", POS, REQUIRED),
    ("sampling_params", POS, None),
    ("lora_request", POS, None),
    ("prompt_adapter_request", POS, None),
    ("streaming", POS, False),
    ("kv_cache_retention_config", POS, None),
    ("disaggregated_params", POS, None),
    ("_postproc_params", POS, None),
    ("scheduling_params", POS, None),
    ("cache_salt", POS, None),
]
GET_STATS_ASYNC = [("timeout", POS, 2)]  # `timeout: Optional[float] = 2`

# The `**kwargs` production passes to `LLM(...)`: BaseLlmArgs fields, with their defaults.
LLM_KWARGS = [
    ("pipeline_parallel_size", 1),
    ("enable_chunked_prefill", False),
    ("guided_decoding_backend", None),  # Optional[Literal["xgrammar", "llguidance"]]
    ("max_batch_size", None),
    ("max_seq_len", None),
    ("max_num_tokens", 8192),
    ("backend", None),
]
KV_CACHE_CONFIG = [
    ("enable_block_reuse", True),
    ("max_tokens", None),
    # None: "Default is 90%" is applied by the C++ KvCacheConfig `_to_pybind` hands it to.
    ("free_gpu_memory_fraction", None),
    ("host_cache_size", None),
    ("event_buffer_max_size", 0),
    ("enable_partial_reuse", True),
    ("tokens_per_block", 32),
]
SAMPLING_PARAMS = [
    ("end_id", None),
    ("pad_id", None),
    ("max_tokens", 32),
    ("stop_token_ids", None),
    ("n", 1),
    ("top_k", None),
    ("top_p", None),
    ("seed", None),
    ("temperature", None),
    ("min_tokens", None),
    ("repetition_penalty", None),
    ("presence_penalty", None),
    ("frequency_penalty", None),
    ("logprobs", None),
    ("guided_decoding", None),
    ("ignore_eos", False),
    ("detokenize", True),
]
GUIDED_DECODING_PARAMS = [
    ("json", None),
    ("regex", None),
    ("grammar", None),
    ("json_object", False),
    ("structural_tag", None),
]
COMPLETION_OUTPUT = [
    ("index", REQUIRED),
    ("text", ""),
    ("token_ids", FACTORY),
    ("cumulative_logprob", None),
    ("logprobs", FACTORY),
    ("prompt_logprobs", FACTORY),
    ("finish_reason", None),
    ("stop_reason", None),
]
LOGPROB = [("logprob", REQUIRED), ("rank", None)]


def _params(func: Any) -> list[tuple[str, Any, Any]]:
    params = list(inspect.signature(func).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    return [(p.name, p.kind, p.default) for p in params]


@pytest.mark.parametrize(
    ("func", "expected", "source"),
    [
        (lambda: llmapi.LLM.__init__, LLM_INIT, LLM_PY),
        (lambda: llmapi.LLM.generate_async, GENERATE_ASYNC, LLM_PY),
        (lambda: llmapi.LLM.get_stats_async, GET_STATS_ASYNC, LLM_PY),
        (lambda: llmapi.LLM.get_kv_cache_events_async, GET_STATS_ASYNC, LLM_PY),
        (lambda: llmapi.LLM.shutdown, [], LLM_PY),
    ],
    ids=["LLM", "generate_async", "get_stats_async", "get_kv_cache_events_async", "shutdown"],
)
def test_llm_signatures(func: Any, expected: list[tuple[str, Any, Any]], source: str) -> None:
    assert _params(func()) == expected, source


def test_llm_is_exported_at_the_top_level() -> None:
    # tensorrt_llm/__init__.py exports LLM and SamplingParams from llmapi.
    assert tensorrt_llm.LLM is llmapi.LLM
    assert tensorrt_llm.SamplingParams is llmapi.SamplingParams


def test_llm_kwargs_are_llm_args_fields() -> None:
    """The double's LLM accepts exactly BaseLlmArgs/TorchLlmArgs names; pin the ones production
    passes and the defaults the double assumes when they are left out."""
    from tensorrt_llm.llmapi.llm_args import TORCH_LLM_ARGS

    for name, _ in LLM_KWARGS:
        assert name in TORCH_LLM_ARGS, (name, LLM_ARGS)
    assert "kv_cache_config" in TORCH_LLM_ARGS
    assert "tokenizer" in TORCH_LLM_ARGS
    with pytest.raises(ValueError, match="LLM got invalid argument: max_tokens_in_flight"):
        llmapi.LLM("/nonexistent", max_tokens_in_flight=1)


def _model_defaults(model: Any) -> dict[str, Any]:
    return {name: info.default for name, info in model.model_fields.items()}


def test_kv_cache_config_fields() -> None:
    defaults = _model_defaults(llmapi.KvCacheConfig)
    assert [(name, defaults.get(name, REQUIRED)) for name, _ in KV_CACHE_CONFIG] == (
        KV_CACHE_CONFIG
    ), LLM_ARGS
    # StrictBaseModel: `class Config: extra = "forbid"`.
    with pytest.raises(ValueError, match="extra"):
        llmapi.KvCacheConfig(enable_block_reuse=True, tokens_per_blok=16)


def _dataclass_defaults(cls: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = FACTORY
        else:
            out[f.name] = REQUIRED
    return out


@pytest.mark.parametrize(
    ("cls", "expected", "kw_only", "source"),
    [
        (lambda: llmapi.SamplingParams, SAMPLING_PARAMS, True, SAMPLING),
        (lambda: llmapi.GuidedDecodingParams, GUIDED_DECODING_PARAMS, True, SAMPLING),
        (lambda: result_mod.CompletionOutput, COMPLETION_OUTPUT, False, RESULT),
        (lambda: result_mod.Logprob, LOGPROB, False, RESULT),
    ],
    ids=["SamplingParams", "GuidedDecodingParams", "CompletionOutput", "Logprob"],
)
def test_dataclass_fields(
    cls: Any, expected: list[tuple[str, Any]], kw_only: bool, source: str
) -> None:
    klass = cls()
    defaults = _dataclass_defaults(klass)
    assert [(name, defaults.get(name, "<missing>")) for name, _ in expected] == expected, source
    # `@dataclass(slots=True, kw_only=True)` (SAMPLING); `@dataclass(slots=True)` (RESULT).
    assert hasattr(klass, "__slots__"), source
    assert all(f.kw_only == kw_only for f in dataclasses.fields(klass) if f.init), source


def test_completion_output_diff_properties() -> None:
    """RESULT: `token_ids_diff` / `logprobs_diff` slice from the `_last_*_len` cursors."""
    out = result_mod.CompletionOutput(0, token_ids=[1, 2, 3], logprobs=[-0.1, -0.2, -0.3])
    out._last_token_ids_len = 1
    out._last_logprobs_len = 2
    assert out.token_ids_diff == [2, 3]
    assert out.logprobs_diff == [-0.3]
    assert out.length == 3


def test_request_output_members() -> None:
    """RESULT `GenerationResultBase.__init__` sets `cached_tokens = 0`; `outputs`, `finished`,
    `abort` are what production reads."""
    for name in ("outputs", "finished", "abort", "aresult"):
        assert hasattr(llmapi.RequestOutput, name), (name, RESULT)


def test_production_reads_the_sampled_tokens_logprob_from_token_logprobs() -> None:
    """`trtllm_llmapi._logprobs` on the PyTorch backend's `{token_id: Logprob}` form (RESULT
    `TokenLogprobs`): the sampled token's `.logprob`, 0.0 where it is missing, floats unchanged."""
    from deployments.executors import trtllm_llmapi

    logprob = result_mod.Logprob
    entries = [{5: logprob(-0.5, rank=1), 9: logprob(-1.5, rank=2)}, {7: logprob(-2.25, rank=1)}]
    assert trtllm_llmapi._logprobs([9, 7], entries) == [-1.5, -2.25]
    assert trtllm_llmapi._logprobs([3], [{4: logprob(-0.1)}]) == [0.0]
    assert trtllm_llmapi._logprobs([1, 2], [-0.25, -0.75]) == [-0.25, -0.75]


def test_the_pytorch_backend_streams_token_logprobs_dicts(tmp_path: Any) -> None:
    """A `logprobs=1` request through the double's LLM gives one `{token_id: Logprob}` per new
    token in `logprobs_diff`, as the real PyTorch backend's TokenLogprobs do, with the model's
    log probability for the sampled token."""
    _support.require_double("the expected log probabilities come from the double's model")
    from tensorrt_llm.bindings.executor._engine import next_token

    prompt = [11, 12, 13, 14]
    checkpoint = _support.write_double_checkpoint(tmp_path / "checkpoint")
    llm = llmapi.LLM(str(checkpoint), skip_tokenizer_init=True, backend="pytorch")
    params = llmapi.SamplingParams(max_tokens=4, end_id=-1, logprobs=1)

    async def scenario() -> list[tuple[list[int], list[Any]]]:
        steps = []
        async for out in llm.generate_async(prompt, sampling_params=params, streaming=True):
            steps.append((list(out.outputs[0].token_ids_diff), list(out.outputs[0].logprobs_diff)))
        return steps

    try:
        steps = _support.run(scenario())
    finally:
        llm.shutdown()
    tokens = [t for ids, _ in steps for t in ids]
    entries = [e for _, diff in steps for e in diff]
    assert len(entries) == len(tokens) == 4
    for i, (token, entry) in enumerate(zip(tokens, entries, strict=True)):
        assert isinstance(entry, dict) and list(entry) == [token]
        assert isinstance(entry[token], result_mod.Logprob) and entry[token].rank == 1
        expected = next_token(prompt + tokens[:i], vocab_size=1000)[1]
        assert entry[token].logprob == pytest.approx(expected)


# cpp/tensorrt_llm/executor/jsonSerialization.cpp@092229bb, NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE lists.
ITERATION_STATS_JSON = (
    "timestamp iter iterLatencyMS newActiveRequestsQueueLatencyMS numNewActiveRequests "
    "numActiveRequests numQueuedRequests numCompletedRequests maxNumActiveRequests "
    "maxBatchSizeStatic maxBatchSizeTunerRecommended maxBatchSizeRuntime maxNumTokensStatic "
    "maxNumTokensTunerRecommended maxNumTokensRuntime gpuMemUsage cpuMemUsage pinnedMemUsage "
    "kvCacheStats staticBatchingStats inflightBatchingStats specDecodingStats"
).split()
KV_CACHE_STATS_JSON = (
    "maxNumBlocks freeNumBlocks usedNumBlocks tokensPerBlock allocTotalBlocks allocNewBlocks "
    "reusedBlocks missedBlocks cacheHitRate"
).split()
INFLIGHT_BATCHING_STATS_JSON = (
    "numScheduledRequests numContextRequests numGenRequests numPausedRequests numCtxTokens "
    "microBatchId avgNumDecodedTokensPerIter"
).split()


def test_stats_json_keys_are_the_cpp_serializations() -> None:
    """Every key the double writes is a real one, in the real order; the keys production reads
    (`numQueuedRequests`, `kvCacheStats.{maxNumBlocks,usedNumBlocks,cacheHitRate}`) are there."""
    import json

    from tensorrt_llm.bindings.executor._stats import (
        InflightBatchingStats,
        IterationStats,
        KvCacheStats,
    )

    stats = IterationStats(
        "t", 1, 1.0, 0.0, 1, 1, 2, 0, 8, 0, 0, 0,
        KvCacheStats(10, 6, 4, 4, 4, 4, 0, 4, 0.0),
        InflightBatchingStats(1, 1, 0, 0, 3, 0, 1.0),
    )  # fmt: skip
    body = json.loads(stats.to_json_str())
    keys = list(body)
    assert keys == [k for k in ITERATION_STATS_JSON if k in body]
    assert {"numQueuedRequests", "kvCacheStats"} <= set(keys)
    assert list(body["kvCacheStats"]) == KV_CACHE_STATS_JSON
    assert list(body["inflightBatchingStats"]) == INFLIGHT_BATCHING_STATS_JSON
    assert body["numQueuedRequests"] == 2
    assert body["kvCacheStats"]["usedNumBlocks"] == 4
