"""TensorRT-LLM backend: one `tensorrt_llm.bindings.executor.Executor` over a `trtllm-build` engine.

Threads (started by `start`, all stopped by `shutdown`):
- awaiter: `await_responses(timeout=timedelta)` -> deltas -> `deliver_threadsafe`, one loop wake-up
  per batch;
- stats: `get_latest_iteration_stats()` every `stats_period_s` (KV usage, queue depth, hit rate);
- KV events: polls the event manager and keeps the stored-block index the router reads. Absent in
  orchestrator mode, where the engine lives in spawned workers and the manager is None.

Written against TensorRT-LLM 1.2.x (nanobind/executor/*.cpp, executorImpl.cpp @ b35ac1b6 =
v1.2.0rc2): responses are matched by client id, or by the engine's request id for the error
responses the orchestrator's leader sends without one (a full queue, a request too large to send).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import importlib
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from deployments.config import TrtllmConfig
from deployments.errors import EngineDead, EngineError, RequestError
from deployments.executors.base import Executor
from deployments.executors.ranks import detach_stdin, replica_device_ids
from deployments.executors.trtllm_config import (
    EngineLayout,
    read_engine_layout,
    resolve_guided_backend,
)
from deployments.executors.trtllm_failures import classify_engine_error, load_with_timeout
from deployments.executors.trtllm_kv_events import KvBlockIndex, routing_stats
from deployments.executors.trtllm_requests import (
    DeltaAssembler,
    build_request,
    finish_reason_name,
    kv_cache_kwargs,
    reused_prompt_tokens,
    trtllm_capabilities,
    xgrammar_tokenizer_info,
)
from deployments.messages import ExecutorStats, GenerateRequest, TokenDelta

logger = logging.getLogger(__name__)


def resolve_communication_mode(config: TrtllmConfig, layout: EngineLayout) -> str:
    """ "orchestrator" or "leader". A Ray replica is one process, so a multi-rank engine must spawn
    its ranks (orchestrator) unless the process was itself started by `mpirun` (leader)."""
    if config.communication_mode != "auto":
        return config.communication_mode
    return "orchestrator" if layout.world_size > 1 else "leader"


def default_worker_path() -> str:
    """`executorWorker` as shipped in the wheel (setup.py package_data 'bin/executorWorker')."""
    trtllm = importlib.import_module("tensorrt_llm")
    return str(Path(str(trtllm.__file__)).parent / "bin" / "executorWorker")


def build_executor_config(
    tle: ModuleType,
    config: TrtllmConfig,
    layout: EngineLayout,
    *,
    device_ids: list[int] | None,
    guided_decoding_config: Any = None,
) -> Any:
    """The `ExecutorConfig` for this engine: KV cache, scheduler and parallel settings, and the
    grammar backend's `GuidedDecodingConfig` when guided decoding is on."""
    kv_cache_config = tle.KvCacheConfig(**kv_cache_kwargs(config))
    policy = {
        "max_utilization": tle.CapacitySchedulerPolicy.MAX_UTILIZATION,
        "guaranteed_no_evict": tle.CapacitySchedulerPolicy.GUARANTEED_NO_EVICT,
    }[config.scheduler_policy]
    parallel_config = None
    if resolve_communication_mode(config, layout) == "orchestrator":
        worker_path = config.executor_worker_path or default_worker_path()
        parallel_config = tle.ParallelConfig(
            communication_type=tle.CommunicationType.MPI,
            communication_mode=tle.CommunicationMode.ORCHESTRATOR,
            # By default the GPUs Ray gave the replica, which the spawned workers inherit.
            device_ids=replica_device_ids(layout.world_size) if device_ids is None else device_ids,
            orchestrator_config=tle.OrchestratorConfig(
                is_orchestrator=True, worker_executable_path=worker_path
            ),
        )
    elif device_ids is not None:
        parallel_config = tle.ParallelConfig(device_ids=device_ids)
    return tle.ExecutorConfig(
        max_beam_width=1,
        scheduler_config=tle.SchedulerConfig(capacity_scheduler_policy=policy),
        kv_cache_config=kv_cache_config,
        enable_chunked_context=config.enable_chunked_context,
        normalize_log_probs=config.normalize_log_probs,
        iter_stats_max_iterations=config.iter_stats_max_iterations,
        max_batch_size=config.max_batch_size,
        max_num_tokens=config.max_num_tokens,
        parallel_config=parallel_config,
        max_queue_size=config.max_queue_size,
        recv_poll_period_ms=config.recv_poll_period_ms,
        guided_decoding_config=guided_decoding_config,
    )


def build_guided_decoding_config(tle: ModuleType, tokenizer_dir: str) -> Any:
    """xgrammar over the model's tokenizer, the only grammar backend of the 1.2 C++ runtime.

    Raises:
        OSError, ValueError: no fast tokenizer in `tokenizer_dir`.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, use_fast=True)
    return tle.GuidedDecodingConfig(
        tle.GuidedDecodingConfig.GuidedDecodingBackend.XGRAMMAR,
        **xgrammar_tokenizer_info(tokenizer),
    )


@dataclass(slots=True)
class _Tracked:
    """One in-flight request as the awaiter thread sees it."""

    request_id: str
    client_id: int
    assembler: DeltaAssembler
    num_prompt_tokens: int
    engine_request_id: int | None = None


class TrtllmExecutor(Executor):
    """Serves a `trtllm-build` engine dir; TP/PP come from its config.json.

    Args:
        config: backend settings; `engine_dir` must be set.
        device_ids: GPU ordinals for the engine's ranks (default 0..world_size-1, i.e. the GPUs Ray
            made visible to the replica).
    Raises:
        ValueError: no engine dir, device_ids of the wrong length, or fewer visible GPUs than ranks.
        FileNotFoundError: the engine dir has no config.json.
    """

    capabilities = trtllm_capabilities(None)
    # From each result's perf metrics (`trtllm_requests.reused_prompt_tokens`).
    reports_cached_tokens = True

    def __init__(self, config: TrtllmConfig, *, device_ids: list[int] | None = None) -> None:
        super().__init__()
        if config.engine_dir is None:
            raise ValueError("TrtllmConfig.engine_dir is required (the trtllm-build output dir)")
        self._config = config
        self._tokenizer_dir = config.tokenizer_dir or str(config.engine_dir)
        self._guided_backend = resolve_guided_backend(config, "tensorrt", self._tokenizer_dir)
        self._layout = read_engine_layout(config.engine_dir)
        world_size = self._layout.world_size
        if device_ids is not None and len(device_ids) != world_size:
            raise ValueError(
                f"engine {config.engine_dir} needs {world_size} devices "
                f"(tp={self._layout.tp_size}, pp={self._layout.pp_size}), got {device_ids}"
            )
        if device_ids is None:
            replica_device_ids(world_size)  # raises when Ray gave the replica fewer GPUs than ranks
        self._device_ids = device_ids
        self._tle: ModuleType | None = None
        self._engine: Any = None
        self._lock = threading.Lock()
        self._tracked: dict[int, _Tracked] = {}  # by client_id, which responses carry
        self._client_ids: dict[str, int] = {}  # request_id -> client_id
        self._by_engine_id: dict[int, int] = {}  # engine request id -> client_id
        self._client_id_counter = itertools.count(1)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._kv_index = KvBlockIndex(
            tokens_per_block=self._layout.tokens_per_block,
            max_blocks=config.max_tracked_block_hashes,
        )
        self._has_kv_events = False
        self._is_engine_closed = False
        self._latest_iteration: Any = None

    # ---- properties the deployment reads ---------------------------------------------------------
    @property
    def model_max_len(self) -> int:
        """Prompt + completion tokens the engine was built for (build_config.max_seq_len)."""
        return self._layout.max_seq_len

    @property
    def layout(self) -> EngineLayout:
        return self._layout

    @property
    def communication_mode(self) -> str:
        return resolve_communication_mode(self._config, self._layout)

    # ---- lifetime --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Loads the engine (and spawns its MPI workers) off the loop, then starts the threads.

        Raises:
            EngineError: the engine could not be created.
        """
        await super().start()
        try:
            self._engine = await load_with_timeout(
                self._create_engine,
                timeout_s=self._config.engine_start_timeout_s,
                what=f"the TensorRT-LLM engine {self._config.engine_dir}",
            )
        except EngineError as exc:
            self._mark_dead(str(exc))
            raise
        self._start_thread("trtllm-awaiter", self._await_loop)
        self._start_thread("trtllm-stats", self._stats_loop)
        manager = None
        if self._config.enable_block_reuse and self._config.event_buffer_max_size > 0:
            manager = self._engine.get_kv_cache_event_manager()
        if manager is not None:
            self._has_kv_events = True
            self._start_thread("trtllm-kv-events", lambda: self._kv_event_loop(manager))
        logger.info(
            "TensorRT-LLM engine %s started: tp=%d pp=%d mode=%s kv_events=%s",
            self._config.engine_dir,
            self._layout.tp_size,
            self._layout.pp_size,
            self.communication_mode,
            self._has_kv_events,
        )

    async def shutdown(self) -> None:
        """Stops the threads, then the engine (which joins its spawned workers); idempotent."""
        self._stop.set()
        for thread in self._threads:
            await asyncio.to_thread(thread.join)
        if self._engine is not None and not self._is_engine_closed:
            self._is_engine_closed = True
            await asyncio.to_thread(self._engine.shutdown)
        await super().shutdown()

    def check_health(self) -> None:
        super().check_health()
        stopped = [t.name for t in self._threads if not t.is_alive()]
        if stopped and not self._stop.is_set():
            self._mark_dead(f"engine thread(s) {', '.join(stopped)} stopped")
            super().check_health()

    # ---- contract --------------------------------------------------------------------------------
    def _submit(self, request: GenerateRequest) -> None:
        assert self._engine is not None and self._tle is not None, "start() was not awaited"
        client_id = next(self._client_id_counter)
        try:
            trt_request = build_request(
                self._tle,
                request,
                client_id=client_id,
                decode_retention_priority=self._config.decode_retention_priority,
            )
        except (RuntimeError, TypeError, ValueError) as exc:  # the bindings validate arguments
            raise RequestError(f"invalid request for TensorRT-LLM: {exc}") from exc
        tracked = _Tracked(
            request.request_id,
            client_id,
            DeltaAssembler(request),
            num_prompt_tokens=len(request.prompt_token_ids),
        )
        # Enqueued under the lock: an error response without client id may come back before
        # `enqueue_request` returns, and the awaiter must find it by the engine's id.
        with self._lock:
            self._tracked[client_id] = tracked
            self._client_ids[request.request_id] = client_id
            try:
                tracked.engine_request_id = self._engine.enqueue_request(trt_request)
            except RuntimeError as exc:
                self._tracked.pop(client_id, None)
                self._client_ids.pop(request.request_id, None)
                raise self._error(str(exc)) from exc
            self._by_engine_id[tracked.engine_request_id] = client_id

    def _cancel(self, request_id: str) -> None:
        # The entry stays until the engine's final CANCELLED response, which is then dropped.
        with self._lock:
            client_id = self._client_ids.get(request_id)
            tracked = self._tracked.get(client_id) if client_id is not None else None
        if tracked is None or tracked.engine_request_id is None or self._is_engine_closed:
            return
        try:
            self._engine.cancel_request(tracked.engine_request_id)
        except RuntimeError as exc:
            logger.warning("cancel_request failed for request_id=%s: %s", request_id, exc)

    # ---- stats -----------------------------------------------------------------------------------
    def queue_depth(self) -> int:
        latest = self._latest_iteration
        return int(latest.num_queued_requests) if latest is not None else 0

    def stats(self) -> ExecutorStats:
        stats = super().stats()
        latest = self._latest_iteration
        kv = latest.kv_cache_stats if latest is not None else None
        if kv is None:
            return stats
        usage = kv.used_num_blocks / kv.max_num_blocks if kv.max_num_blocks else None
        return dataclasses.replace(
            stats, kv_cache_usage=usage, prefix_cache_hit_rate=float(kv.cache_hit_rate)
        )

    def routing_stats(self) -> dict[str, Any]:
        """What a KV-aware router needs from this replica (`trtllm_kv_events.routing_stats`)."""
        return routing_stats(
            self.stats(),
            self._kv_index,
            tokens_per_block=self._layout.tokens_per_block,
            has_kv_events=self._has_kv_events,
            num_hashes=self._config.routing_block_hashes,
        )

    # ---- engine threads --------------------------------------------------------------------------
    def _create_engine(self) -> Any:
        tle = importlib.import_module("tensorrt_llm.bindings.executor")
        guided_decoding_config = None
        if self._guided_backend is not None:
            try:
                guided_decoding_config = build_guided_decoding_config(tle, self._tokenizer_dir)
            except (OSError, ValueError) as exc:
                raise EngineError(
                    f"guided decoding needs the tokenizer in {self._tokenizer_dir}: {exc}"
                ) from exc
        executor_config = build_executor_config(
            tle,
            self._config,
            self._layout,
            device_ids=self._device_ids,
            guided_decoding_config=guided_decoding_config,
        )
        if guided_decoding_config is not None:
            self.capabilities = trtllm_capabilities(self._guided_backend)
        if self._layout.world_size > 1:
            detach_stdin()
        try:
            engine = tle.Executor(
                self._config.engine_dir, tle.ModelType.DECODER_ONLY, executor_config
            )
        except RuntimeError as exc:
            raise EngineError(f"cannot load engine {self._config.engine_dir}: {exc}") from exc
        if not engine.can_enqueue_requests():
            engine.shutdown()  # a non-leader rank under mpirun: it blocks until the leader is done
            raise EngineError("this process is not the engine's leader rank")
        self._tle = tle
        return engine

    def _start_thread(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _await_loop(self) -> None:
        timeout = datetime.timedelta(milliseconds=self._config.await_timeout_ms)
        while not self._stop.is_set():
            try:
                responses = self._engine.await_responses(timeout=timeout)
            except Exception as exc:  # the engine is gone: every request fails with EngineDead
                if not self._stop.is_set():
                    self.mark_dead_threadsafe(f"TensorRT-LLM await_responses failed: {exc}")
                return
            batch = self._convert(responses)
            if batch:
                self.deliver_threadsafe(batch)

    def _convert(self, responses: list[Any]) -> list[tuple[str, TokenDelta | BaseException]]:
        batch: list[tuple[str, TokenDelta | BaseException]] = []
        for response in responses:
            with self._lock:
                client_id = response.client_id
                if client_id is None:  # the orchestrator's leader refused it before it ran
                    client_id = self._by_engine_id.get(response.request_id)
                tracked = self._tracked.get(client_id) if client_id is not None else None
            if tracked is None or tracked.assembler.is_done:
                continue  # cancelled, or already finished by a stop sequence
            if response.has_error():
                self._forget(tracked.client_id)
                message = response.error_msg
                logger.error("engine failed request_id=%s: %s", tracked.request_id, message)
                error = self._error(message)
                if isinstance(error, EngineDead) and not self._stop.is_set():
                    self.mark_dead_threadsafe(f"TensorRT-LLM engine error: {message}")
                batch.append((tracked.request_id, error))
                continue
            result = response.result
            reason = finish_reason_name(result)
            logprobs = result.log_probs[0] if result.log_probs else None
            delta = tracked.assembler.feed(
                list(result.output_token_ids[0]),
                logprobs,
                reason,
                are_logprobs_cumulative=True,
                num_cached_tokens=reused_prompt_tokens(
                    result, self._layout.tokens_per_block, tracked.num_prompt_tokens
                ),
            )
            if tracked.assembler.is_done:
                self._forget(tracked.client_id)
                if reason is None and tracked.engine_request_id is not None:
                    self._engine.cancel_request(tracked.engine_request_id)  # stopped before engine
            if delta is not None:
                batch.append((tracked.request_id, delta))
        return batch

    def _forget(self, client_id: int) -> None:
        with self._lock:
            tracked = self._tracked.pop(client_id, None)
            if tracked is not None:
                self._client_ids.pop(tracked.request_id, None)
                if tracked.engine_request_id is not None:
                    self._by_engine_id.pop(tracked.engine_request_id, None)

    def _error(self, message: str) -> Exception:
        return classify_engine_error(message, self._config.fatal_error_patterns)

    def _stats_loop(self) -> None:
        while not self._stop.wait(self._config.stats_period_s):
            try:
                iterations = self._engine.get_latest_iteration_stats()
            except Exception:  # the awaiter reports the engine's death
                return
            if iterations:
                self._latest_iteration = iterations[-1]

    def _kv_event_loop(self, manager: Any) -> None:
        timeout_ms = float(self._config.kv_events_timeout_ms)
        idle_s = self._config.kv_events_poll_period_ms / 1000.0
        while not self._stop.is_set():
            try:
                events = manager.get_latest_events(timeout_ms)
            except Exception:
                return
            if events:
                self._kv_index.apply(events)
            else:
                self._stop.wait(idle_s)
