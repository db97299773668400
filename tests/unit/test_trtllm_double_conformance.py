"""The bindings double against the real TensorRT-LLM 1.2.x API (shared/reference/, executor API).

Signature tables are transcribed from the reference (nanobind request.cpp@ac456dca,
executorConfig.cpp@c40f1157, executor.cpp@f0c873f5, bindings.cpp@a35c38f3) and compared with
`inspect.signature`, which nanobind callables do not support, so those run on the double only. The
behaviour tests run on a real engine too (SHEPHERD_TRTLLM_ENGINE_DIR), keeping the double honest
from both sides.
"""

from __future__ import annotations

import datetime
import importlib
import inspect
import os
from pathlib import Path
from typing import Any

import pytest

from tests import trtllm_support as support

tle: Any = importlib.import_module("tensorrt_llm.bindings.executor")
POS = inspect.Parameter.POSITIONAL_OR_KEYWORD
KW = inspect.Parameter.KEYWORD_ONLY
REQUIRED = inspect.Parameter.empty
DEFAULT_OBJECT = object()  # a default-constructed config object in the binding

# (name, kind, default) in binding order; DEFAULT_OBJECT: an instance of the parameter's class.
REQUEST = [("input_token_ids", POS, REQUIRED), ("max_tokens", POS, REQUIRED)] + [
    (name, KW, default)
    for name, default in [
        ("streaming", False),
        ("sampling_config", DEFAULT_OBJECT),
        ("output_config", DEFAULT_OBJECT),
        ("end_id", None),
        ("pad_id", None),
        ("position_ids", None),
        ("bad_words", None),
        ("stop_words", None),
        ("embedding_bias", None),
        ("external_draft_tokens_config", None),
        ("prompt_tuning_config", None),
        ("multimodal_input", None),
        ("multimodal_embedding", None),
        ("mrope_config", None),
        ("lora_config", None),
        ("lookahead_config", None),
        ("kv_cache_retention_config", None),
        ("logits_post_processor_name", None),
        ("logits_post_processor", None),
        ("encoder_input_token_ids", None),
        ("client_id", None),
        ("return_all_generated_tokens", False),
        ("priority", 0.5),
        ("type", tle.RequestType.REQUEST_TYPE_CONTEXT_AND_GENERATION),
        ("context_phase_params", None),
        ("encoder_input_features", None),
        ("encoder_output_length", None),
        ("cross_attention_mask", None),
        ("num_return_sequences", 1),
        ("eagle_config", None),
        ("skip_cross_attn_blocks", None),
        ("guided_decoding_params", None),
        ("language_adapter_uid", None),
        ("allotted_time_ms", None),
        ("cache_salt_id", None),
    ]
]
SAMPLING_CONFIG = [("beam_width", POS, 1)] + [
    (name, KW, None)
    for name in (
        "top_k top_p top_p_min top_p_reset_ids top_p_decay seed temperature min_tokens "
        "beam_search_diversity_rate repetition_penalty presence_penalty frequency_penalty "
        "length_penalty early_stopping no_repeat_ngram_size num_return_sequences min_p "
        "beam_width_array"
    ).split()
]
OUTPUT_CONFIG = [
    (name, POS, None)
    for name in (
        "return_log_probs return_context_logits return_generation_logits exclude_input_from_output "
        "return_encoder_output return_perf_metrics additional_model_outputs"
    ).split()
]
KV_CACHE_CONFIG = [
    ("enable_block_reuse", POS, True),
    ("max_tokens", POS, None),
    ("max_attention_window", POS, None),
    ("sink_token_length", POS, None),
    ("free_gpu_memory_fraction", POS, None),
    ("host_cache_size", POS, None),
    ("onboard_blocks", POS, True),
    ("cross_kv_cache_fraction", POS, None),
    ("secondary_offload_min_priority", POS, None),
    ("event_buffer_max_size", POS, 0),
    ("enable_partial_reuse", KW, True),
    ("copy_on_partial_reuse", KW, True),
    ("use_uvm", KW, False),
    ("attention_dp_events_gather_period_ms", KW, 5),
    ("runtime_defaults", KW, None),
    ("max_gpu_total_bytes", KW, 0),
]
EXECUTOR_CONFIG = [
    (name, POS, default)
    for name, default in [
        ("max_beam_width", 1),
        ("scheduler_config", DEFAULT_OBJECT),
        ("kv_cache_config", DEFAULT_OBJECT),
        ("enable_chunked_context", False),
        ("normalize_log_probs", True),
        ("iter_stats_max_iterations", 1000),
        ("request_stats_max_iterations", 0),
        ("batching_type", tle.BatchingType.INFLIGHT),
        ("max_batch_size", None),
        ("max_num_tokens", None),
        ("parallel_config", None),
        ("peft_cache_config", DEFAULT_OBJECT),
        ("logits_post_processor_config", None),
        ("decoding_config", None),
        ("use_gpu_direct_storage", False),
        ("gpu_weights_percent", 1.0),
        ("max_queue_size", None),
        ("extended_runtime_perf_knob_config", DEFAULT_OBJECT),
        ("debug_config", None),
        ("recv_poll_period_ms", 0),
        ("max_seq_idle_microseconds", 180_000_000),
        ("spec_dec_config", None),
        ("guided_decoding_config", None),
        ("additional_model_outputs", None),
        ("cache_transceiver_config", None),
        ("gather_generation_logits", False),
        ("mm_embedding_offloading", False),
        ("enable_trt_overlap", False),
        ("fail_fast_on_attention_window_too_large", False),
    ]
]
SCHEDULER_CONFIG = [
    ("capacity_scheduler_policy", POS, tle.CapacitySchedulerPolicy.GUARANTEED_NO_EVICT),
    ("context_chunking_policy", POS, None),
    ("dynamic_batch_config", POS, None),
]
PARALLEL_CONFIG = [
    ("communication_type", POS, tle.CommunicationType.MPI),
    ("communication_mode", POS, tle.CommunicationMode.LEADER),
    ("device_ids", POS, None),
    ("participant_ids", POS, None),
    ("orchestrator_config", POS, None),
    ("num_nodes", POS, None),
]
ORCHESTRATOR_CONFIG = [
    ("is_orchestrator", POS, True),
    ("worker_executable_path", POS, ""),
    ("orch_leader_comm", POS, None),
    ("spawn_processes", POS, True),
]
RETENTION_CONFIG = [
    ("token_range_retention_configs", POS, REQUIRED),
    ("decode_retention_priority", POS, 35),
    ("decode_duration_ms", POS, None),
    ("transfer_mode", POS, tle.KvCacheTransferMode.DRAM),
    ("directory", POS, None),
]
TOKEN_RANGE = [
    ("token_start", POS, REQUIRED),
    ("token_end", POS, REQUIRED),
    ("priority", POS, REQUIRED),
    ("duration_ms", POS, None),
]
EXECUTOR = [
    ("model_path", POS, REQUIRED),
    ("model_type", POS, REQUIRED),
    ("executor_config", POS, REQUIRED),
]
# nanobind/executor/executorConfig.cpp@c40f1157: `nb::arg("backend"), nb::arg("encoded_vocab") =
# nb::none(), nb::arg("tokenizer_str") = nb::none(), nb::arg("stop_token_ids") = nb::none()`.
GUIDED_DECODING_CONFIG = [
    ("backend", POS, REQUIRED),
    ("encoded_vocab", POS, None),
    ("tokenizer_str", POS, None),
    ("stop_token_ids", POS, None),
]
# nanobind/executor/request.cpp@ac456dca: `nb::arg("guide_type"), nb::arg("guide") = nb::none()`.
GUIDED_DECODING_PARAMS = [("guide_type", POS, REQUIRED), ("guide", POS, None)]

TABLE = {
    "Request": (tle.Request, REQUEST),
    "SamplingConfig": (tle.SamplingConfig, SAMPLING_CONFIG),
    "OutputConfig": (tle.OutputConfig, OUTPUT_CONFIG),
    "KvCacheConfig": (tle.KvCacheConfig, KV_CACHE_CONFIG),
    "ExecutorConfig": (tle.ExecutorConfig, EXECUTOR_CONFIG),
    "SchedulerConfig": (tle.SchedulerConfig, SCHEDULER_CONFIG),
    "ParallelConfig": (tle.ParallelConfig, PARALLEL_CONFIG),
    "OrchestratorConfig": (tle.OrchestratorConfig, ORCHESTRATOR_CONFIG),
    "KvCacheRetentionConfig": (tle.KvCacheRetentionConfig, RETENTION_CONFIG),
    "TokenRangeRetentionConfig": (
        tle.KvCacheRetentionConfig.TokenRangeRetentionConfig,
        TOKEN_RANGE,
    ),
    "Executor": (tle.Executor, EXECUTOR),
    "GuidedDecodingConfig": (tle.GuidedDecodingConfig, GUIDED_DECODING_CONFIG),
    "GuidedDecodingParams": (tle.GuidedDecodingParams, GUIDED_DECODING_PARAMS),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_double_signature_matches_the_binding(name: str) -> None:
    support.require_double("inspect.signature does not work on nanobind callables")
    cls, expected = TABLE[name]
    params = list(inspect.signature(cls).parameters.values())
    assert [p.name for p in params] == [e[0] for e in expected]
    for param, (pname, kind, default) in zip(params, expected, strict=True):
        assert param.kind == kind, f"{name}.{pname}: {param.kind} != {kind}"
        if default is DEFAULT_OBJECT:
            assert param.default is not REQUIRED and param.default is not None, pname
        else:
            assert param.default == default, f"{name}.{pname}: {param.default!r} != {default!r}"


def test_double_method_signatures() -> None:
    support.require_double("inspect.signature does not work on nanobind callables")
    methods = {
        "enqueue_request": ["request"],
        "enqueue_requests": ["requests"],
        "cancel_request": ["id"],
        "get_num_responses_ready": ["id"],
        "get_latest_iteration_stats": [],
        "get_latest_request_stats": [],
        "can_enqueue_requests": [],
        "get_kv_cache_event_manager": [],
        "shutdown": [],
    }
    for method, names in methods.items():
        params = list(inspect.signature(getattr(tle.Executor, method)).parameters)[1:]
        assert params == names, method
    manager = inspect.signature(tle.kv_cache.KVCacheEventManager.get_latest_events)
    assert manager.parameters["timeout_ms"].default is None


def test_enum_members_match_the_binding() -> None:
    def names(enum: Any) -> set[str]:
        return {n for n in dir(enum) if n.isupper() and not n.startswith("_")}

    assert {"NOT_FINISHED", "END_ID", "STOP_WORDS", "LENGTH", "TIMED_OUT", "CANCELLED"} <= names(
        tle.FinishReason
    )
    assert {"MAX_UTILIZATION", "GUARANTEED_NO_EVICT", "STATIC_BATCH"} <= names(
        tle.CapacitySchedulerPolicy
    )
    assert {"LEADER", "ORCHESTRATOR"} <= names(tle.CommunicationMode)
    assert {"DECODER_ONLY", "ENCODER_ONLY", "ENCODER_DECODER"} <= names(tle.ModelType)
    # executorConfig.cpp@c40f1157 / request.cpp@ac456dca `nb::enum_` values, exactly these.
    assert names(tle.GuidedDecodingConfig.GuidedDecodingBackend) == {"XGRAMMAR", "LLGUIDANCE"}
    assert names(tle.GuidedDecodingParams.GuideType) == {
        "JSON",
        "JSON_SCHEMA",
        "REGEX",
        "EBNF_GRAMMAR",
        "STRUCTURAL_TAG",
    }
    for event_class in (
        "KVCacheEvent KVCacheStoredData KVCacheStoredBlockData KVCacheRemovedData "
        "KVCacheCreatedData KVCacheUpdatedData UniqueToken KVCacheEventManager"
    ).split():
        assert hasattr(tle.kv_cache, event_class)


def test_keyword_only_markers_reject_positional_calls() -> None:
    with pytest.raises(TypeError):
        tle.Request([1, 2], 4, True)
    with pytest.raises(TypeError):
        tle.SamplingConfig(1, 5)
    with pytest.raises(TypeError):
        tle.KvCacheConfig(True, None, None, None, None, None, True, None, None, 0, True)
    assert tle.KvCacheConfig(True, enable_partial_reuse=False).enable_partial_reuse is False


def test_orchestrator_config_needs_an_existing_worker_path(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        tle.OrchestratorConfig()
    with pytest.raises(RuntimeError):
        tle.OrchestratorConfig(True, str(tmp_path / "missing"))
    worker = tmp_path / "executorWorker"
    worker.write_text("")
    assert tle.OrchestratorConfig(True, str(worker)).worker_executable_path == str(worker)
    import tensorrt_llm

    shipped = Path(tensorrt_llm.__file__).parent / "bin" / "executorWorker"
    assert shipped.exists() and os.access(shipped, os.R_OK)


def test_sub_configs_are_mutable_references() -> None:
    config = tle.ExecutorConfig()
    config.kv_cache_config.enable_block_reuse = False
    assert config.kv_cache_config.enable_block_reuse is False
    assert tle.ExecutorConfig().kv_cache_config.enable_block_reuse is True
    with pytest.raises(Exception):  # noqa: B017 - TLLM_CHECK surfaces as RuntimeError
        tle.KvCacheConfig(free_gpu_memory_fraction=1.5)


# ---- behaviour on an engine ----------------------------------------------------------------------
@pytest.fixture
def engine(tmp_path: Path) -> Any:
    engine_dir = support.engine_dir_or_skip(tmp_path)
    kv = tle.KvCacheConfig(enable_block_reuse=True, event_buffer_max_size=1024, max_tokens=4096)
    config = tle.ExecutorConfig(1, kv_cache_config=kv, max_batch_size=4, max_queue_size=2)
    executor = tle.Executor(str(engine_dir), tle.ModelType.DECODER_ONLY, config)
    yield executor
    executor.shutdown()


def greedy(prompt: list[int], max_tokens: int, **kwargs: Any) -> Any:
    return tle.Request(
        prompt,
        max_tokens,
        streaming=True,
        sampling_config=tle.SamplingConfig(1, top_k=1),
        end_id=-1,
        **kwargs,
    )


def drain(executor: Any, request_id: int) -> list[Any]:
    responses: list[Any] = []
    while not responses or not (responses[-1].has_error() or responses[-1].result.is_final):
        responses += executor.await_responses(request_id, datetime.timedelta(seconds=5))
    return responses


def test_timeouts_take_timedelta_or_float_seconds_never_int(engine: Any) -> None:
    assert engine.await_responses(timeout=datetime.timedelta(milliseconds=1)) == []
    assert engine.await_responses(timeout=0.001) == []
    with pytest.raises(TypeError):
        engine.await_responses(timeout=5)


def test_int_positional_selects_the_request_id_overload(engine: Any) -> None:
    request_id = engine.enqueue_request(greedy([1, 2, 3], 2))
    drain(engine, request_id)
    [late] = engine.await_responses(request_id)  # an int is an id here, not a timeout
    assert late.has_error() and "already been processed" in late.error_msg
    per_id = engine.await_responses([request_id], timeout=datetime.timedelta(milliseconds=1))
    assert isinstance(per_id, list) and len(per_id) == 1


def test_streaming_results_carry_only_new_tokens(engine: Any) -> None:
    responses = drain(engine, engine.enqueue_request(greedy([5, 6, 7, 8, 9], 6)))
    assert all(not r.has_error() for r in responses)
    assert sum(len(r.result.output_token_ids[0]) for r in responses) == 6
    final = responses[-1].result
    assert final.is_final and final.finish_reasons[0] == tle.FinishReason.LENGTH
    with pytest.raises(RuntimeError):
        responses[-1].error_msg  # noqa: B018 - the property throws when there is no error


def test_error_response_has_error_and_no_result(engine: Any) -> None:
    request_id = engine.enqueue_request(greedy([3] * 100_000, 2))
    [response] = drain(engine, request_id)
    assert response.has_error() and response.error_msg
    with pytest.raises(RuntimeError):
        response.result  # noqa: B018 - the property throws on an error response


def test_cancel_request_ends_with_cancelled(engine: Any) -> None:
    request_id = engine.enqueue_request(greedy([1, 2, 3], 400))
    engine.await_responses(request_id, datetime.timedelta(seconds=5))
    engine.cancel_request(request_id)
    final = drain(engine, request_id)[-1].result
    assert final.finish_reasons[0] == tle.FinishReason.CANCELLED


def test_max_queue_size_rejects_enqueue(tmp_path: Path) -> None:
    support.require_double("the real engine may admit requests before the queue fills")
    engine_dir = support.write_double_engine(tmp_path / "engine", iter_latency_ms=50)
    config = tle.ExecutorConfig(1, max_batch_size=1, max_queue_size=1)
    with tle.Executor(str(engine_dir), tle.ModelType.DECODER_ONLY, config) as executor:
        executor.enqueue_request(greedy([1, 2], 4))
        with pytest.raises(RuntimeError, match="Maximum queue size of 1 has been reached"):
            executor.enqueue_request(greedy([1, 2], 4))


def test_iteration_stats_and_kv_events_with_block_reuse(engine: Any) -> None:
    prompt = list(range(1, 200))
    for _ in range(2):
        drain(engine, engine.enqueue_request(greedy(prompt, 2)))
    stats = engine.get_latest_iteration_stats()
    assert stats and stats[-1].kv_cache_stats.reused_blocks > 0
    kv = stats[-1].kv_cache_stats
    assert kv.max_num_blocks == kv.free_num_blocks + kv.used_num_blocks
    assert engine.get_latest_iteration_stats() == []  # drained
    events = engine.get_kv_cache_event_manager().get_latest_events(100.0)
    stored = [e for e in events if isinstance(e.data, tle.kv_cache.KVCacheStoredData)]
    assert stored and [e.event_id for e in events] == sorted(e.event_id for e in events)
    block = stored[0].data.blocks[0]
    assert isinstance(block.block_hash, int) and block.tokens[0].token_id == 1


def test_no_kv_events_without_event_buffer(tmp_path: Path) -> None:
    engine_dir = support.engine_dir_or_skip(tmp_path)
    config = tle.ExecutorConfig(1, kv_cache_config=tle.KvCacheConfig(enable_block_reuse=True))
    with tle.Executor(str(engine_dir), tle.ModelType.DECODER_ONLY, config) as executor:
        drain(executor, executor.enqueue_request(greedy(list(range(1, 100)), 2)))
        manager = executor.get_kv_cache_event_manager()
        assert manager is None or manager.get_latest_events(0.0) == []


def test_every_call_fails_after_shutdown(tmp_path: Path) -> None:
    engine_dir = support.engine_dir_or_skip(tmp_path)
    executor = tle.Executor(str(engine_dir), tle.ModelType.DECODER_ONLY, tle.ExecutorConfig(1))
    executor.shutdown()
    assert executor.can_enqueue_requests() is False
    for call in (
        lambda: executor.await_responses(timeout=0.01),
        lambda: executor.enqueue_request(greedy([1], 1)),
        lambda: executor.get_latest_iteration_stats(),
    ):
        with pytest.raises(RuntimeError, match="Shutdown called"):
            call()


def test_leader_mode_needs_a_world_of_tp_ranks(tmp_path: Path) -> None:
    support.require_double("the check runs when the engine loads")
    engine_dir = support.write_double_engine(tmp_path / "engine", tp_size=2)
    with pytest.raises(RuntimeError, match="MPI worldSize is expected to be equal to tp"):
        tle.Executor(str(engine_dir), tle.ModelType.DECODER_ONLY, tle.ExecutorConfig(1))


def test_retention_config_needs_an_explicit_directory() -> None:
    """nanobind/executor/request.cpp (1.2.x) binds `KvCacheRetentionConfig` with
    `nb::init<..., tle::KvCacheTransferMode, std::string>()` and `nb::arg("directory") = nb::none()`:
    the None default cannot convert to `std::string`, so leaving `directory` out is a TypeError.
    (Found in review against the real binding; the double used to accept it.)"""
    support.require_double("pins the double's reading of the binding; the real one raises itself")
    token_range = tle.KvCacheRetentionConfig.TokenRangeRetentionConfig(0, 4, 90)
    with pytest.raises(TypeError):
        tle.KvCacheRetentionConfig([token_range], decode_retention_priority=35)
    config = tle.KvCacheRetentionConfig([token_range], decode_retention_priority=35, directory="")
    assert config.directory == ""
