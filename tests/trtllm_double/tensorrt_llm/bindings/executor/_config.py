"""ExecutorConfig and its sub-configs, with the bindings' kwarg order, defaults and checks.

Source: nanobind/executor/executorConfig.cpp@c40f1157 (see shared/reference/trtllm-executor-api.md
§1.4, §2.1, §6.1). Errors from TLLM_CHECK surface in Python as RuntimeError, so the double raises
that.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from ._enums import (
    BatchingType,
    CapacitySchedulerPolicy,
    CommunicationMode,
    CommunicationType,
)


class DynamicBatchConfig:
    def __init__(
        self,
        enable_batch_size_tuning: bool,
        enable_max_num_tokens_tuning: bool,
        dynamic_batch_moving_average_window: int,
    ) -> None:
        self.enable_batch_size_tuning = enable_batch_size_tuning
        self.enable_max_num_tokens_tuning = enable_max_num_tokens_tuning
        self.dynamic_batch_moving_average_window = dynamic_batch_moving_average_window


class SchedulerConfig:
    """Read-only properties, like the binding."""

    def __init__(
        self,
        capacity_scheduler_policy: CapacitySchedulerPolicy = (
            CapacitySchedulerPolicy.GUARANTEED_NO_EVICT
        ),
        context_chunking_policy: Any = None,
        dynamic_batch_config: DynamicBatchConfig | None = None,
    ) -> None:
        if not isinstance(capacity_scheduler_policy, CapacitySchedulerPolicy):
            raise TypeError("SchedulerConfig(): incompatible function arguments")
        self._capacity_scheduler_policy = capacity_scheduler_policy
        self._context_chunking_policy = context_chunking_policy
        self._dynamic_batch_config = dynamic_batch_config

    @property
    def capacity_scheduler_policy(self) -> CapacitySchedulerPolicy:
        return self._capacity_scheduler_policy

    @property
    def context_chunking_policy(self) -> Any:
        return self._context_chunking_policy

    @property
    def dynamic_batch_config(self) -> DynamicBatchConfig | None:
        return self._dynamic_batch_config


class KvCacheConfig:
    """Keyword-only from `enable_partial_reuse` (nb::kw_only()); fraction must be in (0, 1)."""

    def __init__(
        self,
        enable_block_reuse: bool = True,
        max_tokens: int | None = None,
        max_attention_window: list[int] | None = None,
        sink_token_length: int | None = None,
        free_gpu_memory_fraction: float | None = None,
        host_cache_size: int | None = None,
        onboard_blocks: bool = True,
        cross_kv_cache_fraction: float | None = None,
        secondary_offload_min_priority: int | None = None,
        event_buffer_max_size: int = 0,
        *,
        enable_partial_reuse: bool = True,
        copy_on_partial_reuse: bool = True,
        use_uvm: bool = False,
        attention_dp_events_gather_period_ms: int = 5,
        runtime_defaults: Any = None,
        max_gpu_total_bytes: int = 0,
    ) -> None:
        self.enable_block_reuse = enable_block_reuse
        self.max_tokens = max_tokens
        self.max_attention_window = max_attention_window
        self.sink_token_length = sink_token_length
        self.free_gpu_memory_fraction = free_gpu_memory_fraction
        self.host_cache_size = host_cache_size
        self.onboard_blocks = onboard_blocks
        self.cross_kv_cache_fraction = cross_kv_cache_fraction
        self.secondary_offload_min_priority = secondary_offload_min_priority
        self.event_buffer_max_size = event_buffer_max_size
        self.enable_partial_reuse = enable_partial_reuse
        self.copy_on_partial_reuse = copy_on_partial_reuse
        self.use_uvm = use_uvm
        self.attention_dp_events_gather_period_ms = attention_dp_events_gather_period_ms
        self.runtime_defaults = runtime_defaults
        self.max_gpu_total_bytes = max_gpu_total_bytes

    @property
    def free_gpu_memory_fraction(self) -> float | None:
        return self._free_gpu_memory_fraction

    @free_gpu_memory_fraction.setter
    def free_gpu_memory_fraction(self, value: float | None) -> None:
        if value is not None and not 0.0 < value < 1.0:
            raise RuntimeError(
                "[TensorRT-LLM][ERROR] Assertion failed: freeGpuMemoryFraction must be in (0, 1)"
            )
        self._free_gpu_memory_fraction = value

    @property
    def max_tokens(self) -> int | None:
        return self._max_tokens

    @max_tokens.setter
    def max_tokens(self, value: int | None) -> None:
        if value is not None and value <= 0:
            raise RuntimeError("[TensorRT-LLM][ERROR] Assertion failed: maxTokens must be > 0")
        self._max_tokens = value


class OrchestratorConfig:
    """With spawn_processes=True the worker executable must exist (orchestratorConfig.cpp)."""

    def __init__(
        self,
        is_orchestrator: bool = True,
        worker_executable_path: str = "",
        orch_leader_comm: Any = None,
        spawn_processes: bool = True,
    ) -> None:
        if spawn_processes and not os.path.exists(worker_executable_path):
            raise RuntimeError(
                "[TensorRT-LLM][ERROR] Assertion failed: "
                f"std::filesystem::exists(workerExecutablePath) ({worker_executable_path!r})"
            )
        self.is_orchestrator = is_orchestrator
        self.worker_executable_path = worker_executable_path
        self.orch_leader_comm = orch_leader_comm
        self.spawn_processes = spawn_processes


class ParallelConfig:
    def __init__(
        self,
        communication_type: CommunicationType = CommunicationType.MPI,
        communication_mode: CommunicationMode = CommunicationMode.LEADER,
        device_ids: list[int] | None = None,
        participant_ids: list[int] | None = None,
        orchestrator_config: OrchestratorConfig | None = None,
        num_nodes: int | None = None,
    ) -> None:
        self.communication_type = communication_type
        self.communication_mode = communication_mode
        self.device_ids = device_ids
        self.participant_ids = participant_ids
        self.orchestrator_config = orchestrator_config
        self.num_nodes = num_nodes


class PeftCacheConfig:
    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


class ExtendedRuntimePerfKnobConfig:
    def __init__(self, multi_block_mode: bool = True, enable_context_fmha_fp32_acc: bool = False):
        self.multi_block_mode = multi_block_mode
        self.enable_context_fmha_fp32_acc = enable_context_fmha_fp32_acc
        self.cuda_graph_mode = False
        self.cuda_graph_cache_size = 0


_DEFAULT_MAX_SEQ_IDLE_MICROSECONDS = 180_000_000  # kDefaultMaxSeqIdleMicroseconds: 3 minutes
_DEFAULT_SCHEDULER_CONFIG = SchedulerConfig()
_DEFAULT_KV_CACHE_CONFIG = KvCacheConfig()
_DEFAULT_PEFT_CACHE_CONFIG = PeftCacheConfig()
_DEFAULT_PERF_KNOBS = ExtendedRuntimePerfKnobConfig()


class ExecutorConfig:
    """Every argument is also a read-write property; enable_chunked_context defaults to False."""

    def __init__(
        self,
        max_beam_width: int = 1,
        scheduler_config: SchedulerConfig = _DEFAULT_SCHEDULER_CONFIG,
        kv_cache_config: KvCacheConfig = _DEFAULT_KV_CACHE_CONFIG,
        enable_chunked_context: bool = False,
        normalize_log_probs: bool = True,
        iter_stats_max_iterations: int = 1000,
        request_stats_max_iterations: int = 0,
        batching_type: BatchingType = BatchingType.INFLIGHT,
        max_batch_size: int | None = None,
        max_num_tokens: int | None = None,
        parallel_config: ParallelConfig | None = None,
        peft_cache_config: PeftCacheConfig = _DEFAULT_PEFT_CACHE_CONFIG,
        logits_post_processor_config: Any = None,
        decoding_config: Any = None,
        use_gpu_direct_storage: bool = False,
        gpu_weights_percent: float = 1.0,
        max_queue_size: int | None = None,
        extended_runtime_perf_knob_config: ExtendedRuntimePerfKnobConfig = _DEFAULT_PERF_KNOBS,
        debug_config: Any = None,
        recv_poll_period_ms: int = 0,
        max_seq_idle_microseconds: int = _DEFAULT_MAX_SEQ_IDLE_MICROSECONDS,
        spec_dec_config: Any = None,
        guided_decoding_config: Any = None,
        additional_model_outputs: Any = None,
        cache_transceiver_config: Any = None,
        gather_generation_logits: bool = False,
        mm_embedding_offloading: bool = False,
        enable_trt_overlap: bool = False,
        fail_fast_on_attention_window_too_large: bool = False,
    ) -> None:
        # C++ stores sub-configs by value: copy, so mutating one config never leaks into another.
        self.max_beam_width = max_beam_width
        self.scheduler_config = copy.deepcopy(scheduler_config)
        self.kv_cache_config = copy.deepcopy(kv_cache_config)
        self.enable_chunked_context = enable_chunked_context
        self.normalize_log_probs = normalize_log_probs
        self.iter_stats_max_iterations = iter_stats_max_iterations
        self.request_stats_max_iterations = request_stats_max_iterations
        self.batching_type = batching_type
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.parallel_config = parallel_config
        self.peft_cache_config = copy.deepcopy(peft_cache_config)
        self.logits_post_processor_config = logits_post_processor_config
        self.decoding_config = decoding_config
        self.use_gpu_direct_storage = use_gpu_direct_storage
        self.gpu_weights_percent = gpu_weights_percent
        self.max_queue_size = max_queue_size
        self.extended_runtime_perf_knob_config = copy.deepcopy(extended_runtime_perf_knob_config)
        self.debug_config = debug_config
        self.recv_poll_period_ms = recv_poll_period_ms
        self.max_seq_idle_microseconds = max_seq_idle_microseconds
        self.spec_dec_config = spec_dec_config
        self.guided_decoding_config = guided_decoding_config
        self.additional_model_outputs = additional_model_outputs
        self.cache_transceiver_config = cache_transceiver_config
        self.gather_generation_logits = gather_generation_logits
        self.mm_embedding_offloading = mm_embedding_offloading
        self.enable_trt_overlap = enable_trt_overlap
        self.fail_fast_on_attention_window_too_large = fail_fast_on_attention_window_too_large
