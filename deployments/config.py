"""Application configuration: the validated `args` of `serve_config.yaml` (one place for every knob)."""

from __future__ import annotations

from typing import ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    path: str | None = Field(
        default=None,
        description="A Hugging Face checkpoint directory (transformers engine, TensorRT-LLM's PyTorch "
        "backend), a trtllm-build engine directory (TensorRT-LLM's legacy engine path), a `.gguf` file "
        "(transformers engine; converted once into a cached directory), or `package:NAME/FILE`, a file "
        "inside the installed Python package NAME. None serves the embedded default model, built locally "
        "on first start.",
    )
    fallback_to_embedded: bool = Field(
        default=False,
        description="When `path` is `package:NAME/FILE` and NAME is not installed, serve the embedded model "
        "(with a warning in the log) instead of failing at start.",
    )
    tokenizer_path: str | None = Field(
        default=None,
        description="Tokenizer directory when it is not inside `path` (TensorRT-LLM engines).",
    )
    served_model_name: str | None = Field(
        default=None,
        description="The `model` id clients send; defaults to the directory name, the GGUF file name "
        "without `.gguf`, or `shepherd-tiny` for the embedded model.",
    )
    max_model_len: int | None = Field(
        default=None, gt=0, description="Context window in tokens; defaults to the model's own."
    )
    embedded_seed: int = Field(default=0, description="Seed of the embedded default model.")
    cache_dir: str | None = Field(
        default=None,
        description="Where the embedded model and converted GGUF files are cached (default "
        "~/.cache/shepherd-serve).",
    )


class TransformersEngineConfig(_Strict):
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="`auto` picks CUDA when visible."
    )
    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        description="Ranks one engine is split over. The replica is rank 0 and spawns the others through MPI "
        "(Open MPI and mpi4py). On GPUs one rank per GPU: `num_gpus_per_replica` must equal it. On the CPU "
        "(`num_gpus_per_replica: 0`) the ranks share the replica's `num_cpus_per_replica`. The model's heads "
        "and key-value heads must divide by it; `num_blocks` pages are allocated on every rank, each holding "
        "its share of the key-value heads.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weights dtype."
    )
    attn_implementation: str = Field(
        default="sdpa",
        description="`sdpa`, `eager` (paged), or `varlen`: torch's variable-length flash kernel on CUDA "
        "(torch >= 2.9), which attends each sequence of a step to its own keys, where `sdpa` masks one "
        "dense block over the whole batch's keys (executors/hf_attention.py); on the CPU a per-sequence "
        "SDPA loop computes the same.",
    )
    num_blocks: int | Literal["auto"] = Field(
        default=128,
        description="KV-cache pages of `page_size` tokens, allocated at start. `auto` (GPUs only) sizes the "
        "cache from the replica's GPU share: `gpu_memory_utilization` of `num_gpus_per_replica` of the "
        "device, less the weights and one step's activations; a share too small for that is an error at "
        "start. A count is allocated as given (the default fits the embedded model).",
    )
    gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="With `num_blocks: auto`: the fraction of the replica's GPU share (its "
        "`num_gpus_per_replica` of the device's memory) that weights, activations and the KV cache may use.",
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
        "processors, which cost about 20 % of decode speed), and seeds, penalties, min_tokens, logit_bias, top "
        "logprobs and guided decoding (JSON schemas, forced tool calls; executors/hf_processors.py) for the "
        "requests that ask; greedy: argmax for every request, no processors; an unset temperature means 0, and "
        "a request that would sample (temperature > 0 and top_k != 1) or needs a processor gets a 400.",
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
        description="Prefill speed over the prompt tokens the prefix cache does not hold, added to `ttft_ms` "
        "(0: TTFT is independent of length). 66200 is a published TensorRT-LLM H100 FP8 7B figure "
        "(`executors.emulator.PUBLISHED_PREFILL_TOKENS_PER_S`).",
    )
    num_kv_blocks: int = Field(
        default=16384,
        ge=0,
        description="Capacity of the prefix cache model in KV blocks, LRU over unpinned blocks (0: no cache). "
        "16384 blocks of 32 tokens hold an 8B model's bf16 KV in about 64 GB.",
    )
    tokens_per_block: int = Field(
        default=32,
        gt=0,
        description="Tokens per KV block (TensorRT-LLM's default); the router hashes prompts in blocks of "
        "this size for the emulator.",
    )


class TrtllmConfig(_Strict):
    """Knobs for `TrtllmExecutor`; what the engine fixed at build time comes from its config.json.

    Defaults follow the reference skeleton (block reuse, chunked context and KV events on) rather
    than the bindings' own defaults, which disable chunked context and KV events.
    """

    backend: Literal["auto", "pytorch", "tensorrt"] = Field(
        default="auto",
        description="pytorch: the LLM API's PyTorch backend over a Hugging Face checkpoint "
        "(TensorRT-LLM's recommended path since 1.0). tensorrt: the 1.2 C++ Executor over a "
        "trtllm-build engine (legacy; removed upstream after 1.3.0rc20). auto: tensorrt when "
        "model.path holds a trtllm-build config.json, else pytorch.",
    )
    guided_decoding_backend: Literal["auto", "llguidance", "xgrammar", "none"] = Field(
        default="auto",
        description="Grammar backend for response_format, forced tool calls and structured_outputs. "
        "auto: llguidance on the PyTorch backend (it also enforces Lark grammars, which forced tool "
        "calls use), xgrammar on a trtllm-build engine (the 1.2 C++ runtime supports only xgrammar; "
        "JSON, JSON Schema and regex). Both need the tokenizer (tokenizer_dir, else model.path). "
        "none: such requests get a 400.",
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="PyTorch backend: TP ranks over the replica's GPUs."
    )
    pipeline_parallel_size: int = Field(
        default=1, ge=1, description="PyTorch backend: PP stages over the replica's GPUs."
    )
    tokens_per_block: int = Field(
        default=32,
        ge=1,
        description="PyTorch backend: KV block size (KvCacheConfig.tokens_per_block); the router "
        "hashes prompts in blocks of this size. trtllm-build engines carry their own.",
    )
    max_seq_len: int | None = Field(
        default=None,
        ge=1,
        description="PyTorch backend: prompt + completion cap (LLM max_seq_len).",
    )
    engine_dir: str | None = Field(
        default=None,
        description="trtllm-build output dir (config.json + rank*.engine); the app fills it "
        "from model.path when unset.",
    )
    tokenizer_dir: str | None = Field(
        default=None,
        description="HF tokenizer dir (default: model.path); the engine sees token ids and reads it "
        "only for its grammar backend (guided decoding).",
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
        default=None,
        ge=1,
        description="Tokens per forward step: a runtime cap below a trtllm-build engine's; the "
        "PyTorch backend's own default is 8192.",
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
    # Failure model
    engine_start_timeout_s: float = Field(
        default=900.0,
        gt=0.0,
        description="How long start() waits for the engine (and its MPI workers) to load. A "
        "worker that fails to load never reaches the orchestrator's MPI barrier, which would "
        "otherwise block start() forever.",
    )
    fatal_error_patterns: list[str] = Field(
        default_factory=lambda: ["CUDA", "cuda", "NCCL", "illegal memory access"],
        description="An engine error naming one of these ends the replica (health check fails): "
        "a failed forward step only fails the active requests and the engine loop goes on, but a "
        "CUDA or NCCL error is sticky, so every later request would fail too.",
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


class ScriptedReply(_Strict):
    when: str = Field(
        default="",
        description="A regular expression searched in the decoded prompt; empty matches every prompt.",
    )
    text: str = Field(description="The reply, encoded with the model's tokenizer.")


class ScriptedConfig(_Strict):
    """An engine that answers from a script: deterministic replies (tool calls included) for tests of the
    layers above the engine, with a random model that never writes them (tests only, never the default)."""

    replies: list[ScriptedReply] = Field(
        default_factory=list,
        description="Each prompt gets the first reply whose `when` matches, streamed a token at a time; "
        "no match is an engine error.",
    )


class AutoscalingConfig(_Strict):
    """Ray Serve autoscaling of one deployment (its `autoscaling_config`): between `min_replicas` and
    `max_replicas`, aiming at `target_ongoing_requests` per replica. Mutually exclusive with `num_replicas`.

    The Engine counts the requests its executor holds (running and queued, whichever way they came: the direct
    channel or Serve's handle path; `deployments/autoscaling.py`); the Router counts the HTTP requests Serve's
    proxy has in flight on it. Serve adds replicas when a node has room and removes the ones it picks; the
    Router's session affinity then moves only the sessions of a replica that left.
    """

    min_replicas: int = Field(
        default=1,
        ge=1,
        description="Replicas kept at all times (at least 1: a turn never waits for a replica to start).",
    )
    max_replicas: int = Field(
        ge=1,
        description="The most replicas Serve starts; nodes must have room for them (or a cluster autoscaler "
        "adds nodes).",
    )
    initial_replicas: int | None = Field(
        default=None,
        ge=1,
        description="Replicas started at deploy time; defaults to `min_replicas`.",
    )
    target_ongoing_requests: float = Field(
        default=2.0,
        gt=0,
        description="Requests per replica Serve aims at (Serve's default is 2). For the Engine, a share of "
        "its batch: scaling out starts once replicas hold more than this on average.",
    )
    upscale_delay_s: float = Field(
        default=30.0,
        ge=0,
        description="How long the load must call for more replicas before Serve adds them.",
    )
    downscale_delay_s: float = Field(
        default=600.0,
        ge=0,
        description="How long the load must call for fewer replicas before Serve removes some.",
    )
    look_back_period_s: float = Field(
        default=30.0, gt=0, description="Window over which the load is averaged."
    )
    metrics_interval_s: float | None = Field(
        default=None,
        gt=0,
        description="How often each replica sends its load to Serve's controller (Serve's "
        "`metrics_interval_s`, which Ray 2.60 still reads although it calls it deprecated); None: Serve's "
        "default, 10 s. Scaling reacts no faster than this; keep it below `look_back_period_s`.",
    )
    upscaling_factor: float | None = Field(
        default=None,
        gt=0,
        description="Multiplies each scale-up step (Serve's `upscaling_factor`); None: Serve's default, 1.",
    )
    downscaling_factor: float | None = Field(
        default=None,
        gt=0,
        description="Multiplies each scale-down step (Serve's `downscaling_factor`); None: Serve's default, 1.",
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be at least min_replicas ({self.min_replicas})"
            )
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(
                f"initial_replicas ({initial}) must be between min_replicas ({self.min_replicas}) and "
                f"max_replicas ({self.max_replicas})"
            )
        return self


class _Replicated(_Strict):
    """What Serve needs to know about a deployment's replicas, the same for the Engine and the Router."""

    _section: ClassVar[str]

    num_replicas: int = Field(
        default=1, ge=1, description="Replicas (fixed; or set `autoscaling`)."
    )
    autoscaling: AutoscalingConfig | None = Field(
        default=None,
        description="Let Serve scale the replicas with the load (the Engine: the requests its executors "
        "hold; the Router: HTTP requests); None: `num_replicas` replicas.",
    )
    max_surge_percent: int = Field(
        default=0,
        ge=0,
        le=100,
        description="Rolling updates (`serve deploy` of a new version): extra replicas, as a percentage of "
        "the target count, that Serve starts before it stops old ones, which then drain. 0 (Serve's "
        "default) stops an old replica first; more needs room for the extra replicas (GPUs).",
    )
    custom_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each replica needs, on top of CPUs and GPUs: pins replicas to the "
        'nodes that advertise them (`ray start --resources`), e.g. `{"gpu_node": 1}`.',
    )

    @model_validator(mode="after")
    def _check_replica_count(self) -> Self:
        """Serve takes a fixed `num_replicas` or an `autoscaling_config`, never both."""
        if self.autoscaling is not None and "num_replicas" in self.model_fields_set:
            section = self._section
            raise ValueError(
                f"{section}.num_replicas and {section}.autoscaling are mutually exclusive: with "
                f"autoscaling, Serve picks the count (set {section}.autoscaling.initial_replicas to "
                f"start with more than min_replicas)"
            )
        return self


class EngineConfig(_Replicated):
    _section = "engine"

    kind: Literal["transformers", "trtllm", "emulator", "scripted"] = Field(
        default="transformers", description="Which executor each engine replica owns."
    )
    num_cpus_per_replica: float = Field(default=1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus_per_replica: float = Field(
        default=0,
        ge=0,
        description="GPUs per replica (TensorRT-LLM: tp_size * pp_size of the engine, whole GPUs). The "
        "transformers engine takes a fraction below 1 (Ray's fractional GPUs), so that several replicas "
        "share one GPU; size each one's KV cache to its share with `transformers.num_blocks: auto`.",
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
        "their KV cache (deployments/transport/policy.py), or power-of-two choices on load alone.",
    )
    transport: Literal["direct", "serve_handle"] = Field(
        default="direct",
        description="How token streams travel from engine to router: over each engine replica's own "
        "channel (deployments/transport/channel.py; Serve still places, checks and replaces replicas), or "
        "through Ray Serve's handle path, which adds its routing and Ray calls to TTFT and CPU to every "
        "streamed item.",
    )
    health_check_period_s: float = Field(
        default=10.0, gt=0, description="Serve health-check period."
    )
    routing_stats_period_s: float = Field(
        default=1.0,
        gt=0,
        description="How often Serve pulls each engine replica's load (and cached blocks) for the routers; "
        "shorter: fresher routing, more controller calls.",
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
    scripted: ScriptedConfig = Field(default_factory=ScriptedConfig)
    trtllm: TrtllmConfig = Field(
        default_factory=TrtllmConfig, description="TensorRT-LLM executor settings."
    )


class RouterConfig(_Replicated):
    _section = "router"

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
    graceful_shutdown_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="How long a stopping router replica lets the requests it runs finish before Serve stops "
        "it. A turn cut then is not committed. Streams whose proxy or client is gone end at once.",
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


class SessionStoreConfig(_Strict):
    kind: Literal["sqlite", "redis"] = Field(
        default="sqlite",
        description="`sqlite`: one file shared by the replicas of one host. `redis`: shared across hosts.",
    )
    sqlite_path: str | None = Field(
        default=None, description="The SQLite file; defaults to <cache dir>/sessions.sqlite3."
    )
    redis_url: str | None = Field(
        default=None, description="A redis:// or rediss:// URL; required when kind is `redis`."
    )
    idle_ttl_s: float | None = Field(
        default=86400.0,
        gt=0,
        description="Seconds without a save before a session expires; None: never.",
    )
    cache_entries: int = Field(
        default=1024,
        ge=0,
        description="Sessions kept in each router replica's LRU cache; 0 disables it.",
    )

    @model_validator(mode="after")
    def _check_backend(self) -> SessionStoreConfig:
        if self.kind == "redis" and not self.redis_url:
            raise ValueError("redis_url is required when kind is 'redis'")
        return self


class SessionsConfig(_Strict):
    store: SessionStoreConfig = Field(default_factory=SessionStoreConfig)
    max_sessions_per_owner: int | None = Field(
        default=1000, gt=0, description="Live sessions one API key may hold; None: unlimited."
    )
    turn_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="How long one turn may hold its session before another may start (the upper bound for "
        "one turn; its lease is renewed until then).",
    )
    lease_ttl_s: float = Field(
        default=10.0,
        gt=0,
        description="A turn's lease on its session lives this long unless its router replica renews it "
        "(every lease_ttl_s / 3 while the turn runs): a session whose router died is free again at most "
        "this long after, also across a full restart.",
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
                "engine.kind=trtllm needs model.path (a Hugging Face checkpoint or a trtllm-build "
                "engine directory)"
            )
        check_gpu_share(self.engine)
        if self.engine.kind == "transformers":
            check_tensor_parallel(self.engine)
            check_kv_cache_sizing(self.engine)
        if self.engine.kind == "trtllm" and str(self.model.path).endswith(".gguf"):
            raise ValueError("a .gguf model.path is served by engine.kind=transformers, not trtllm")
        return self


def check_gpu_share(engine: EngineConfig) -> None:
    """Only a single-GPU transformers engine shares a GPU; everything else holds whole GPUs.

    Raises:
        ValueError: naming `engine.num_gpus_per_replica` and what it must be.
    """
    num_gpus = engine.num_gpus_per_replica
    if float(num_gpus).is_integer():
        return
    if engine.kind == "trtllm":
        raise ValueError(
            f"engine.num_gpus_per_replica is {num_gpus:g}, but a TensorRT-LLM engine holds whole GPUs "
            f"(tp_size * pp_size of them): set a whole number"
        )
    if num_gpus > 1:
        raise ValueError(
            f"engine.num_gpus_per_replica is {num_gpus:g}: a share of one GPU is below 1, and more than "
            f"one GPU is a whole number"
        )


def check_kv_cache_sizing(engine: EngineConfig) -> None:
    """`num_blocks: auto` sizes the transformers engine's KV cache from a GPU share, so it needs one.

    Raises:
        ValueError: naming `engine.transformers.num_blocks`.
    """
    settings = engine.transformers
    if settings.num_blocks != "auto":
        return
    if engine.num_gpus_per_replica == 0 or settings.device == "cpu":
        raise ValueError(
            "engine.transformers.num_blocks: auto sizes the KV cache from the replica's GPU share, but "
            "this replica runs on the CPU (num_gpus_per_replica: 0 or device: cpu): set a number of blocks"
        )


def check_tensor_parallel(engine: EngineConfig) -> None:
    """A tensor-parallel transformers replica runs one rank per GPU, or all its ranks on the CPU.

    Raises:
        ValueError: naming the fields that disagree.
    """
    settings = engine.transformers
    tp_size, num_gpus = settings.tensor_parallel_size, engine.num_gpus_per_replica
    if tp_size == 1:
        return
    if num_gpus not in (0, tp_size):
        raise ValueError(
            f"engine.num_gpus_per_replica ({num_gpus:g}) must equal "
            f"engine.transformers.tensor_parallel_size ({tp_size}): one rank per GPU (or 0 to run the "
            f"ranks on the CPU)"
        )
    expected = "cuda" if num_gpus else "cpu"
    if settings.device not in ("auto", expected):
        raise ValueError(
            f"engine.transformers.device is {settings.device!r} but a tensor-parallel replica with "
            f"num_gpus_per_replica {num_gpus:g} runs its ranks on {expected!r}"
        )
