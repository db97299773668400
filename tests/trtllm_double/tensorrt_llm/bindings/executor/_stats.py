"""IterationStats, KvCacheStats and InflightBatchingStats (fields per bindings.cpp@a35c38f3, §4).

`to_json_str` is `JsonSerialization::toJsonStr` (cpp/tensorrt_llm/executor/jsonSerialization.cpp@092229bb):
nlohmann `NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE` names each JSON key after the C++ member, so the keys are
camelCase (`numQueuedRequests`, `kvCacheStats`, `maxNumBlocks`, `usedNumBlocks`, `cacheHitRate`,
`iterLatencyMS`), and an empty optional is null. The LLM API's `get_stats_async` yields these dicts
(llmapi/llm.py `get_stats_async` -> the executor's `aget_stats`). The double leaves out the six
`maxBatchSize*`/`maxNumTokens*` members it does not model; every key it writes is a real one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass
class KvCacheStats:
    max_num_blocks: int
    free_num_blocks: int
    used_num_blocks: int
    tokens_per_block: int
    alloc_total_blocks: int
    alloc_new_blocks: int
    reused_blocks: int
    missed_blocks: int
    cache_hit_rate: float


@dataclass
class InflightBatchingStats:
    num_scheduled_requests: int
    num_context_requests: int
    num_gen_requests: int
    num_paused_requests: int
    num_ctx_tokens: int
    micro_batch_id: int
    avg_num_decoded_tokens_per_iter: float


@dataclass
class IterationStats:
    timestamp: str
    iter: int
    iter_latency_ms: float
    new_active_requests_queue_latency_ms: float
    num_new_active_requests: int
    num_active_requests: int
    num_queued_requests: int
    num_completed_requests: int
    max_num_active_requests: int
    gpu_mem_usage: int
    cpu_mem_usage: int
    pinned_mem_usage: int
    kv_cache_stats: KvCacheStats | None
    inflight_batching_stats: InflightBatchingStats | None
    cross_kv_cache_stats: KvCacheStats | None = None
    static_batching_stats: None = None
    specdec_stats: None = None

    def to_json_str(self) -> str:
        fields = asdict(self)
        return json.dumps({key: _camel(fields[name]) for key, name in _ITERATION_STATS_JSON})


# (JSON key, field) in jsonSerialization.cpp@092229bb's IterationStats member order (not
# `crossKvCacheStats`: that member is not serialized there).
_ITERATION_STATS_JSON = [
    ("timestamp", "timestamp"),
    ("iter", "iter"),
    ("iterLatencyMS", "iter_latency_ms"),
    ("newActiveRequestsQueueLatencyMS", "new_active_requests_queue_latency_ms"),
    ("numNewActiveRequests", "num_new_active_requests"),
    ("numActiveRequests", "num_active_requests"),
    ("numQueuedRequests", "num_queued_requests"),
    ("numCompletedRequests", "num_completed_requests"),
    ("maxNumActiveRequests", "max_num_active_requests"),
    ("gpuMemUsage", "gpu_mem_usage"),
    ("cpuMemUsage", "cpu_mem_usage"),
    ("pinnedMemUsage", "pinned_mem_usage"),
    ("kvCacheStats", "kv_cache_stats"),
    ("staticBatchingStats", "static_batching_stats"),
    ("inflightBatchingStats", "inflight_batching_stats"),
    ("specDecodingStats", "specdec_stats"),
]


def _camel(value: object) -> object:
    if isinstance(value, dict):
        return {_camel_key(k): _camel(v) for k, v in value.items()}
    return value


def _camel_key(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)
