"""IterationStats, KvCacheStats and InflightBatchingStats (fields per bindings.cpp@a35c38f3, §4)."""

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
        """camelCase keys, as the C++ JSON serialization names them (e.g. "kvCacheStats")."""
        return json.dumps(_camel(asdict(self)))


def _camel(value: object) -> object:
    if isinstance(value, dict):
        return {_camel_key(k): _camel(v) for k, v in value.items()}
    return value


def _camel_key(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)
