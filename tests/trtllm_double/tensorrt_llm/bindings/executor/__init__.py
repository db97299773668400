"""Double of `tensorrt_llm.bindings.executor` (TensorRT-LLM 1.2.x nanobind bindings).

Names, keyword-only markers, defaults and failure modes follow the reference
(shared/reference/trtllm-executor-api.md); tests/unit/test_trtllm_double_conformance.py pins them.
"""

from . import kv_cache
from ._config import (
    DynamicBatchConfig,
    ExecutorConfig,
    ExtendedRuntimePerfKnobConfig,
    KvCacheConfig,
    OrchestratorConfig,
    ParallelConfig,
    PeftCacheConfig,
    SchedulerConfig,
)
from ._enums import (
    BatchingType,
    CapacitySchedulerPolicy,
    CommunicationMode,
    CommunicationType,
    ContextChunkingPolicy,
    FinishReason,
    KvCacheTransferMode,
    ModelType,
    RequestStage,
    RequestType,
)
from ._executor import Executor
from ._guided import GuidedDecodingConfig, GuidedDecodingParams
from ._request import (
    KvCacheMetrics,
    KvCacheRetentionConfig,
    OutputConfig,
    Request,
    RequestPerfMetrics,
    Response,
    Result,
    SamplingConfig,
    SpeculativeDecodingMetrics,
    TimingMetrics,
)
from ._stats import InflightBatchingStats, IterationStats, KvCacheStats

__all__ = [
    "BatchingType",
    "CapacitySchedulerPolicy",
    "CommunicationMode",
    "CommunicationType",
    "ContextChunkingPolicy",
    "DynamicBatchConfig",
    "Executor",
    "ExecutorConfig",
    "ExtendedRuntimePerfKnobConfig",
    "FinishReason",
    "GuidedDecodingConfig",
    "GuidedDecodingParams",
    "InflightBatchingStats",
    "IterationStats",
    "KvCacheConfig",
    "KvCacheMetrics",
    "KvCacheRetentionConfig",
    "KvCacheStats",
    "KvCacheTransferMode",
    "ModelType",
    "OrchestratorConfig",
    "OutputConfig",
    "ParallelConfig",
    "PeftCacheConfig",
    "Request",
    "RequestPerfMetrics",
    "RequestStage",
    "RequestType",
    "Response",
    "Result",
    "SamplingConfig",
    "SchedulerConfig",
    "SpeculativeDecodingMetrics",
    "TimingMetrics",
    "kv_cache",
]
