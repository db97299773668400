"""Configuration of the TensorRT-LLM backend, and the layout read from a trtllm-build engine."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class TrtllmConfig(BaseModel):
    """Knobs for `TrtllmExecutor`; what the engine fixed at build time comes from its config.json.

    Defaults follow the reference skeleton (block reuse, chunked context and KV events on) rather
    than the bindings' own defaults, which disable chunked context and KV events.
    """

    model_config = ConfigDict(extra="forbid")

    engine_dir: str | None = Field(
        default=None,
        description="trtllm-build output dir (config.json + rank*.engine); the app fills it "
        "from model.path when unset.",
    )
    tokenizer_dir: str | None = Field(
        default=None,
        description="HF tokenizer dir; only the router reads it, the engine sees token ids.",
    )
    communication_mode: Literal["auto", "orchestrator", "leader"] = Field(
        default="auto",
        description="auto: orchestrator (MPI_Comm_spawn of tp*pp workers) when the engine has more "
        "than one rank, else in-process. leader: the process was started by `mpirun -n N`.",
    )
    executor_worker_path: str | None = Field(
        default=None,
        description="Orchestrator mode worker binary; default <tensorrt_llm>/bin/executorWorker.",
    )
    recv_poll_period_ms: int = Field(
        default=0,
        ge=0,
        description="Orchestrator receive poll period; 0 busy-polls (lowest latency).",
    )
    scheduler_policy: Literal["max_utilization", "guaranteed_no_evict"] = Field(
        default="guaranteed_no_evict",
        description="Capacity scheduler: guaranteed_no_evict reserves KV for the whole request.",
    )
    max_batch_size: int | None = Field(
        default=None, ge=1, description="Runtime cap below the engine's build-time max_batch_size."
    )
    max_num_tokens: int | None = Field(
        default=None, ge=1, description="Runtime cap below the engine's build-time max_num_tokens."
    )
    max_queue_size: int | None = Field(
        default=None,
        ge=1,
        description="Engine queue bound; a full queue rejects requests with 503 (OverloadedError).",
    )
    enable_chunked_context: bool = Field(
        default=True, description="Chunked prefill; the bindings default it to False."
    )
    normalize_log_probs: bool = Field(
        default=True, description="ExecutorConfig.normalize_log_probs."
    )
    iter_stats_max_iterations: int = Field(
        default=1000, ge=0, description="Iteration stats the engine keeps between two stats polls."
    )
    # KV cache
    enable_block_reuse: bool = Field(
        default=True, description="Prefix (block) reuse across requests."
    )
    enable_partial_reuse: bool = Field(default=True, description="Reuse partially matched blocks.")
    free_gpu_memory_fraction: float | None = Field(
        default=0.9,
        gt=0.0,
        lt=1.0,
        description="Share of free GPU memory for KV blocks (engine default 0.9).",
    )
    max_kv_cache_tokens: int | None = Field(
        default=None,
        ge=1,
        description="KvCacheConfig.max_tokens; with free_gpu_memory_fraction the minimum wins.",
    )
    host_cache_size: int | None = Field(
        default=None, ge=0, description="Bytes of host (secondary) KV cache for offloaded blocks."
    )
    decode_retention_priority: int = Field(
        default=35,
        ge=0,
        le=100,
        description="Retention priority of generated blocks when a request pins a prompt range.",
    )
    event_buffer_max_size: int = Field(
        default=16384,
        ge=0,
        description="KV event queue length; 0 disables KV events (the router then predicts).",
    )
    # Threads
    await_timeout_ms: float = Field(
        default=10.0,
        gt=0.0,
        description="await_responses timeout; bounds how long shutdown waits for the awaiter.",
    )
    stats_period_s: float = Field(
        default=1.0, gt=0.0, description="How often iteration stats (KV usage, queue) are polled."
    )
    kv_events_timeout_ms: float = Field(
        default=0.0,
        ge=0.0,
        description="get_latest_events timeout. It holds the GIL while waiting, so keep it 0 "
        "and let kv_events_poll_period_ms pace the thread.",
    )
    kv_events_poll_period_ms: float = Field(
        default=20.0, gt=0.0, description="Sleep between KV event polls that found nothing."
    )
    max_tracked_block_hashes: int = Field(
        default=65536, ge=1, description="Bound on the stored-block hashes kept for routing."
    )
    routing_block_hashes: int = Field(
        default=4096,
        ge=0,
        description="How many of the most recent block hashes routing_stats() reports.",
    )


@dataclass(frozen=True, slots=True)
class EngineLayout:
    """What `trtllm-build` fixed in the engine: parallelism, limits and KV block size."""

    tp_size: int
    pp_size: int
    cp_size: int
    max_input_len: int
    max_seq_len: int
    max_batch_size: int | None
    max_num_tokens: int | None
    tokens_per_block: int
    vocab_size: int | None
    architecture: str | None

    @property
    def world_size(self) -> int:
        """MPI ranks (= GPUs) one engine needs: tp * pp * cp."""
        return self.tp_size * self.pp_size * self.cp_size


_DEFAULT_TOKENS_PER_BLOCK = 32  # PluginConfig.tokens_per_block default in TRT-LLM 1.x


def parse_engine_layout(raw: Mapping[str, Any]) -> EngineLayout:
    """Layout from a parsed engine config.json (the `version`/`pretrained_config`/`build_config`
    form that `GptJsonConfig::parse` reads for trtllm-build engines).

    Raises:
        ValueError: the file is not a trtllm-build engine config (e.g. a HF checkpoint config).
    """
    pretrained = raw.get("pretrained_config")
    build = raw.get("build_config")
    if not isinstance(pretrained, Mapping) or not isinstance(build, Mapping):
        raise ValueError(
            "not a trtllm-build engine config.json: expected 'pretrained_config' and "
            "'build_config' (is this a HF checkpoint dir instead of an engine dir?)"
        )
    mapping = pretrained.get("mapping") or {}
    tp_size = int(mapping.get("tp_size", 1))
    pp_size = int(mapping.get("pp_size", 1))
    cp_size = int(mapping.get("cp_size", 1))
    max_input_len = int(build.get("max_input_len", 0))
    max_seq_len = build.get("max_seq_len")
    if max_seq_len is None:  # pre-0.9 engines stored max_output_len instead
        max_seq_len = max_input_len + int(build.get("max_output_len", 0))
    plugin = build.get("plugin_config") or {}
    tokens_per_block = plugin.get("tokens_per_block", build.get("tokens_per_block"))
    max_batch_size = build.get("max_batch_size")
    max_num_tokens = build.get("max_num_tokens")
    vocab_size = pretrained.get("vocab_size")
    return EngineLayout(
        tp_size=tp_size,
        pp_size=pp_size,
        cp_size=cp_size,
        max_input_len=max_input_len,
        max_seq_len=int(max_seq_len),
        max_batch_size=None if max_batch_size is None else int(max_batch_size),
        max_num_tokens=None if max_num_tokens is None else int(max_num_tokens),
        tokens_per_block=int(tokens_per_block or _DEFAULT_TOKENS_PER_BLOCK),
        vocab_size=None if vocab_size is None else int(vocab_size),
        architecture=pretrained.get("architecture"),
    )


def read_engine_layout(engine_dir: str | Path) -> EngineLayout:
    """Reads `<engine_dir>/config.json`; cheap, so callers may use it at build time (placement).

    Raises:
        FileNotFoundError: no config.json; ValueError: not a trtllm-build engine config.
    """
    path = Path(engine_dir) / "config.json"
    with path.open() as f:
        raw = json.load(f)
    return parse_engine_layout(raw)
