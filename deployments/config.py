"""Application configuration: the validated `args` of `serve_config.yaml` (one place for every knob)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.executors.trtllm_config import TrtllmConfig
from deployments.sessions.store import SessionStoreConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    path: str | None = Field(
        default=None,
        description="A Hugging Face model directory (transformers engine) or a trtllm-build engine directory. "
        "None serves the embedded default model, built locally on first start.",
    )
    tokenizer_path: str | None = Field(
        default=None,
        description="Tokenizer directory when it is not inside `path` (TensorRT-LLM engines).",
    )
    served_model_name: str | None = Field(
        default=None, description="The `model` id clients send; defaults to the directory name."
    )
    max_model_len: int | None = Field(
        default=None, gt=0, description="Context window in tokens; defaults to the model's own."
    )
    embedded_seed: int = Field(default=0, description="Seed of the embedded default model.")
    cache_dir: str | None = Field(
        default=None,
        description="Where the embedded model is cached (default ~/.cache/shepherd-serve).",
    )


class TransformersEngineConfig(_Strict):
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="`auto` picks CUDA when visible."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weights dtype."
    )
    attn_implementation: str = Field(
        default="sdpa", description="`sdpa` or `eager` (paged on CPU and GPU)."
    )
    num_blocks: int = Field(
        default=128, gt=0, description="KV-cache pages; set explicitly (auto-sizing grabs GiBs)."
    )
    page_size: int = Field(default=64, gt=0, description="Tokens per KV-cache page.")
    max_batch_tokens: int = Field(
        default=512, gt=0, description="Tokens per forward step (prefill chunking)."
    )
    max_requests_per_batch: int = Field(
        default=64, gt=0, description="Concurrent sequences per step."
    )
    enable_prefix_sharing: bool = Field(
        default=True, description="Reuse KV blocks of shared prefixes."
    )
    use_cuda_graph: bool = Field(default=False, description="CUDA graphs on GPU (ignored on CPU).")
    scheduler: Literal["fifo", "prefill_first"] = Field(default="fifo", description="CB scheduler.")
    sampling: Literal["per_request", "greedy"] = Field(
        default="per_request",
        description="per_request: each request's temperature, top_k and top_p (transformers' per-request "
        "processors, which cost about 20 % of decode speed); greedy: argmax for every request, no processors; "
        "an unset temperature means 0, and a request that would sample (temperature > 0 and top_k != 1) gets "
        "a 400.",
    )


class EmulatorConfig(_Strict):
    """A load-testing engine that does no compute (benchmarks only, never the default)."""

    ttft_ms: float = Field(default=20.0, ge=0, description="Time to first token of each request.")
    itl_ms: float = Field(
        default=8.0, ge=0, description="Inter-token latency of one decoding step."
    )
    max_batch_size: int = Field(
        default=256, gt=0, description="Requests decoded together; more wait in a queue."
    )
    prefill_tokens_per_s: float = Field(
        default=0.0,
        ge=0,
        description="Extra prefill time per prompt token (0: TTFT is independent of length).",
    )


class EngineConfig(_Strict):
    kind: Literal["transformers", "trtllm", "emulator"] = Field(
        default="transformers", description="Which executor each engine replica owns."
    )
    num_replicas: int = Field(default=1, ge=1, description="Engine replicas.")
    num_cpus_per_replica: float = Field(default=1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus_per_replica: int = Field(
        default=0,
        ge=0,
        description="GPUs per replica (TensorRT-LLM: tp_size * pp_size of the engine).",
    )
    max_ongoing_requests: int = Field(
        default=256, gt=0, description="In-flight requests per replica."
    )
    max_queued_requests: int = Field(
        default=1024,
        gt=0,
        description="Requests each router replica may queue for the engine replicas while all are full; "
        "past it, 503 with Retry-After (never an unbounded queue).",
    )
    check_fits_at_build: bool = Field(
        default=True,
        description="Fail `build_app` when no node of the running cluster can host one replica (Serve would "
        "wait forever); turn off on autoscaling clusters whose GPU nodes do not exist yet.",
    )
    request_router: Literal["session_affinity", "power_of_two"] = Field(
        default="session_affinity",
        description="How the router picks an engine replica: sessions stick to the replica holding "
        "their KV cache (deployments/routing.py), or power-of-two choices on load alone.",
    )
    transport: Literal["direct", "serve_handle"] = Field(
        default="direct",
        description="How token streams travel from engine to router: over each engine replica's own "
        "channel (deployments/engine_channel.py; Serve still places, checks and replaces replicas), or "
        "through Ray Serve's handle path, which adds about 2 ms to TTFT and CPU per streamed item.",
    )
    health_check_period_s: float = Field(
        default=10.0, gt=0, description="Serve health-check period."
    )
    stream_interval_tokens: int = Field(
        default=1,
        ge=1,
        description="Tokens per streamed item after the first (vLLM's and TensorRT-LLM's stream interval): "
        "fewer, larger items cut the per-item cost of every hop. Counted, never timed: the first and the "
        "last tokens go at once.",
    )
    transformers: TransformersEngineConfig = Field(default_factory=TransformersEngineConfig)
    emulator: EmulatorConfig = Field(default_factory=EmulatorConfig)
    trtllm: TrtllmConfig = Field(
        default_factory=TrtllmConfig, description="TensorRT-LLM executor settings."
    )


class RouterConfig(_Strict):
    num_replicas: int = Field(default=1, ge=1, description="Router (HTTP ingress) replicas.")
    num_cpus_per_replica: float = Field(
        default=0.5, ge=0, description="CPUs reserved per router replica."
    )
    max_ongoing_requests: int = Field(
        default=1024,
        gt=0,
        description="HTTP requests one replica works on; past it, 503 with Retry-After.",
    )
    max_queued_requests: int = Field(
        default=256,
        gt=0,
        description="Requests Serve's proxy queues while every router replica is full.",
    )
    max_concurrent_requests_per_key: int | None = Field(
        default=None,
        gt=0,
        description="Requests one API key may have in flight per replica; past it, 429. None: no limit.",
    )
    max_request_body_bytes: int = Field(
        default=8 * 1024 * 1024, gt=0, description="Larger request bodies get 413."
    )
    retry_after_s: float = Field(
        default=1.0, gt=0, description="`Retry-After` of 429 and 503 answers."
    )
    request_body_timeout_s: float | None = Field(
        default=30.0,
        gt=0,
        description="A request body that stops arriving this long gets 408. None: wait forever.",
    )
    default_max_tokens: int = Field(
        default=256,
        gt=0,
        description="`max_tokens` when a request gives none (capped by the context window).",
    )
    tool_parser: Literal["auto", "hermes", "llama3_json", "mistral"] | None = Field(
        default="auto",
        description="How tool calls are read from generated text; `auto` detects it from the chat template.",
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description="Accepted API keys (also `$SHEPHERD_API_KEYS`, comma-separated). None: the server is open.",
    )


class SessionsConfig(_Strict):
    store: SessionStoreConfig = Field(default_factory=SessionStoreConfig)
    max_sessions_per_owner: int | None = Field(
        default=1000, gt=0, description="Live sessions one API key may hold; None: unlimited."
    )
    turn_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="How long one turn may hold its session before another may start.",
    )


class AppConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    sessions: SessionsConfig = Field(default_factory=SessionsConfig)

    @model_validator(mode="after")
    def _check_engine_model(self) -> AppConfig:
        if self.engine.kind == "trtllm" and self.model.path is None:
            raise ValueError(
                "engine.kind=trtllm needs model.path (a trtllm-build engine directory)"
            )
        return self
