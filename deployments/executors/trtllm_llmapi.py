"""TensorRT-LLM on the PyTorch backend: one `tensorrt_llm.LLM` over a Hugging Face checkpoint.

The LLM API streams from `generate_async(prompt_token_ids, streaming=True)` with the tokenizer
skipped: the router already turned text into ids and turns ids back into text, so the engine never
detokenizes. With tensor_parallel_size * pipeline_parallel_size > 1, TensorRT-LLM spawns its MPI
ranks inside this replica (the GPUs Ray gave it; placement.py's STRICT_PACK bundle).

Written against the LLM API of TensorRT-LLM 1.2 (tensorrt_llm/llmapi/llm.py, llm_args.py,
sampling_params.py, executor/result.py; the versions read are cited in tests/trtllm_double):
- each streamed `RequestOutput.outputs[0]` carries `token_ids_diff` / `logprobs_diff` since the
  previous step; a final output has `finish_reason` "stop" (END_ID, or STOP_WORDS with
  `stop_reason` set and the stop ids cut), "length", "timeout" or "cancelled";
- a per-request error raises `RequestError` from the iteration; `abort()` cancels a request;
- `RequestOutput.cached_tokens` is the prompt length the engine reused (`GenerationResultBase`
  copies it from the PyTorch backend's `LlmResult.cached_tokens` with every response);
- KV events come from `get_kv_cache_events_async`, stats from `get_stats_async` (JSON dicts).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
from collections.abc import Mapping
from typing import Any

from deployments.config import TrtllmConfig
from deployments.errors import EngineDead, EngineError, RequestError
from deployments.executors.base import Executor
from deployments.executors.ranks import replica_device_ids
from deployments.executors.trtllm_config import resolve_guided_backend
from deployments.executors.trtllm_failures import classify_engine_error, load_with_timeout
from deployments.executors.trtllm_kv_events import KvBlockIndex, routing_stats
from deployments.executors.trtllm_requests import (
    DeltaAssembler,
    kv_cache_kwargs,
    sampling_knobs,
    trtllm_capabilities,
)
from deployments.messages import ExecutorStats, GenerateRequest, GuidedDecodingSpec

logger = logging.getLogger(__name__)

# The LLM API's finish reasons -> the FinishReason names DeltaAssembler reads.
_FINISH_REASONS = {"length": "LENGTH", "timeout": "TIMED_OUT", "cancelled": "CANCELLED"}


def build_sampling_params(llmapi: Any, request: GenerateRequest) -> Any:
    """`SamplingParams` for one request (keyword-only dataclass in sampling_params.py).

    `end_id` is always set (-1 without one, with `ignore_eos`): with the tokenizer skipped, `LLM`
    refuses a request whose end id it would have to look up. Only single-token stop sequences go
    to the engine (`stop_token_ids`); longer ones are matched here and the request is aborted.
    A guided request carries `guided_decoding=GuidedDecodingParams(...)`.
    """
    sampling = request.sampling
    kwargs: dict[str, Any] = {
        "max_tokens": request.max_tokens,
        "end_id": request.end_id if request.end_id is not None else -1,
        "pad_id": request.pad_id if request.pad_id is not None else request.end_id,
        "ignore_eos": request.end_id is None,
        "detokenize": False,
        "n": 1,
        **sampling_knobs(sampling),
    }
    single = sorted({seq[0] for seq in request.stop_token_sequences if len(seq) == 1})
    if single:
        kwargs["stop_token_ids"] = single
    if request.return_logprobs:
        kwargs["logprobs"] = 1
    if request.guided_decoding is not None:
        kwargs["guided_decoding"] = build_guided_decoding(llmapi, request.guided_decoding)
    return llmapi.SamplingParams(**kwargs)


def build_guided_decoding(llmapi: Any, spec: GuidedDecodingSpec) -> Any:
    """`GuidedDecodingParams(json=..., regex=..., grammar=..., json_object=...)`, one field set
    (sampling_params.py); a Lark grammar is the `grammar` guide, which llguidance reads as Lark."""
    if spec.kind == "json_object":
        return llmapi.GuidedDecodingParams(json_object=True)
    field = {"json_schema": "json", "regex": "regex", "lark": "grammar"}[spec.kind]
    return llmapi.GuidedDecodingParams(**{field: spec.grammar})


def build_retention_config(llmapi: Any, request: GenerateRequest, *, decode_priority: int) -> Any:
    """The binding's `KvCacheRetentionConfig` (llmapi re-exports it); `directory` must be given."""
    if request.retention is None:
        return None
    retention = llmapi.KvCacheRetentionConfig
    token_range = retention.TokenRangeRetentionConfig(
        request.retention.start, request.retention.end, request.retention.priority
    )
    return retention([token_range], decode_retention_priority=decode_priority, directory="")


def _engine_reason(output: Any, is_final: bool) -> str | None:
    if not is_final:
        return "CANCELLED" if output.finish_reason == "cancelled" else None
    if output.finish_reason == "stop":
        return "END_ID" if output.stop_reason is None else "STOP_WORDS"
    return _FINISH_REASONS.get(str(output.finish_reason), "LENGTH")


def _logprobs(token_ids: list[int], entries: list[Any]) -> list[float]:
    """Per-token floats; the PyTorch backend may give `{token_id: Logprob}` dicts instead."""
    values: list[float] = []
    for token_id, entry in zip(token_ids, entries, strict=False):
        if isinstance(entry, Mapping):
            chosen = entry.get(token_id)
            values.append(float(chosen.logprob) if chosen is not None else 0.0)
        else:
            values.append(float(entry))
    return values


@dataclasses.dataclass(slots=True)
class _Stream:
    result: Any
    task: asyncio.Task[None] | None = None


class TrtllmLlmApiExecutor(Executor):
    """Serves a Hugging Face checkpoint with `tensorrt_llm.LLM(backend="pytorch")`.

    Args:
        config: backend settings (tensor/pipeline parallel sizes, KV cache, timeouts).
        model_dir: the checkpoint (config.json + weights; quantized checkpoints load as they are).
    Raises:
        ValueError: the replica sees fewer GPUs than tp * pp.
    Threading: everything runs on the replica's event loop; the LLM API does its own threading.
    """

    capabilities = trtllm_capabilities(None)
    # `RequestOutput.cached_tokens`, the PyTorch backend's reused prompt length.
    reports_cached_tokens = True

    def __init__(self, config: TrtllmConfig, model_dir: str) -> None:
        super().__init__()
        self._config = config
        self._model_dir = model_dir
        self._tokenizer_dir = config.tokenizer_dir or model_dir
        self._guided_backend = resolve_guided_backend(config, "pytorch", self._tokenizer_dir)
        self.world_size = config.tensor_parallel_size * config.pipeline_parallel_size
        replica_device_ids(
            self.world_size
        )  # raises when Ray gave the replica fewer GPUs than ranks
        self._llm: Any = None
        self._llmapi: Any = None
        self._streams: dict[str, _Stream] = {}
        self._pollers: list[asyncio.Task[None]] = []
        self._kv_index = KvBlockIndex(
            tokens_per_block=config.tokens_per_block, max_blocks=config.max_tracked_block_hashes
        )
        self._has_kv_events = config.enable_block_reuse and config.event_buffer_max_size > 0
        self._latest_stats: Mapping[str, Any] | None = None
        self._is_closed = False
        self._is_stopping = False

    # ---- lifetime --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Loads the model (and spawns its ranks) off the loop, then starts the pollers.

        Raises:
            EngineError: the model could not be loaded, or not within engine_start_timeout_s.
        """
        await super().start()
        try:
            self._llm = await load_with_timeout(
                self._create_llm,
                timeout_s=self._config.engine_start_timeout_s,
                what=f"TensorRT-LLM (PyTorch backend) for {self._model_dir}",
            )
        except EngineError as exc:
            self._mark_dead(str(exc))
            raise
        self._pollers.append(asyncio.create_task(self._poll_stats()))
        if self._has_kv_events:
            self._pollers.append(asyncio.create_task(self._poll_kv_events()))
        logger.info(
            "TensorRT-LLM PyTorch backend started: %s tp=%d pp=%d kv_events=%s",
            self._model_dir,
            self._config.tensor_parallel_size,
            self._config.pipeline_parallel_size,
            self._has_kv_events,
        )

    async def shutdown(self) -> None:
        """Stops the pollers and streams, then the LLM (which joins its ranks); idempotent."""
        self._is_stopping = True
        for task in self._pollers + [s.task for s in self._streams.values() if s.task]:
            task.cancel()
        if self._pollers:
            # The flag, not only the cancel: `asyncio.wait_for` inside the LLM API's iterators
            # can swallow a cancellation that races a completed get (Python < 3.12).
            await asyncio.wait(self._pollers, timeout=5.0)
        if self._llm is not None and not self._is_closed:
            self._is_closed = True
            await asyncio.to_thread(self._llm.shutdown)
        await super().shutdown()

    # ---- contract --------------------------------------------------------------------------------
    def _submit(self, request: GenerateRequest) -> None:
        assert self._llm is not None, "start() was not awaited"
        try:
            sampling_params = build_sampling_params(self._llmapi, request)
            retention = build_retention_config(
                self._llmapi, request, decode_priority=self._config.decode_retention_priority
            )
            result = self._llm.generate_async(
                list(request.prompt_token_ids),
                sampling_params=sampling_params,
                streaming=True,
                kv_cache_retention_config=retention,
            )
        except (TypeError, ValueError) as exc:  # SamplingParams and LLM._check_arguments
            raise RequestError(f"invalid request for TensorRT-LLM: {exc}") from exc
        except RuntimeError as exc:  # "LLM is shutting down"
            raise self._error(str(exc)) from exc
        stream = _Stream(result)
        self._streams[request.request_id] = stream
        stream.task = asyncio.create_task(self._stream(request, stream))

    def _cancel(self, request_id: str) -> None:
        # The stream task stays until the final "cancelled" output, whose delta is then dropped.
        stream = self._streams.get(request_id)
        if stream is None or stream.result.finished or self._is_closed:
            return
        try:
            stream.result.abort()
        except Exception as exc:  # the executor may be gone already
            logger.warning("abort failed for request_id=%s: %s", request_id, exc)

    # ---- stats -----------------------------------------------------------------------------------
    def queue_depth(self) -> int:
        stats = self._latest_stats or {}
        return int(stats.get("numQueuedRequests") or 0)

    def stats(self) -> ExecutorStats:
        stats = super().stats()
        kv = (self._latest_stats or {}).get("kvCacheStats")
        if not isinstance(kv, Mapping):
            return stats
        max_blocks = kv.get("maxNumBlocks") or 0
        usage = (kv.get("usedNumBlocks") or 0) / max_blocks if max_blocks else None
        hit_rate = kv.get("cacheHitRate")
        return dataclasses.replace(
            stats,
            kv_cache_usage=usage,
            prefix_cache_hit_rate=None if hit_rate is None else float(hit_rate),
        )

    def routing_stats(self) -> dict[str, Any]:
        """The blocks this replica holds, for a KV-aware router (`trtllm_kv_events.routing_stats`)."""
        return routing_stats(
            self.stats(),
            self._kv_index,
            tokens_per_block=self._config.tokens_per_block,
            has_kv_events=self._has_kv_events,
            num_hashes=self._config.routing_block_hashes,
        )

    # ---- internals ---------------------------------------------------------------------------------
    def _create_llm(self) -> Any:
        trtllm = importlib.import_module("tensorrt_llm")
        llmapi = importlib.import_module("tensorrt_llm.llmapi")
        config = self._config
        kv_cache_config = llmapi.KvCacheConfig(
            **kv_cache_kwargs(config), tokens_per_block=config.tokens_per_block
        )
        kwargs: dict[str, Any] = {
            "backend": "pytorch",
            "pipeline_parallel_size": config.pipeline_parallel_size,
            "kv_cache_config": kv_cache_config,
            "enable_chunked_prefill": config.enable_chunked_context,
        }
        for name, value in (
            ("max_batch_size", config.max_batch_size),
            ("max_num_tokens", config.max_num_tokens),
            ("max_seq_len", config.max_seq_len),
        ):
            if value is not None:
                kwargs[name] = value
        if self._guided_backend is not None:
            # The grammar backend needs the tokenizer (py_executor_creator asserts one); prompts
            # still arrive as ids and outputs leave as ids (`detokenize=False`).
            kwargs["guided_decoding_backend"] = self._guided_backend
            kwargs["tokenizer"] = self._tokenizer_dir
        try:
            llm = trtllm.LLM(
                self._model_dir,
                skip_tokenizer_init=self._guided_backend is None,
                tensor_parallel_size=config.tensor_parallel_size,
                **kwargs,
            )
        except (RuntimeError, ValueError, TypeError, OSError) as exc:
            raise EngineError(f"cannot load {self._model_dir} with TensorRT-LLM: {exc}") from exc
        self._llmapi = llmapi
        self.capabilities = trtllm_capabilities(self._guided_backend)
        return llm

    async def _stream(self, request: GenerateRequest, stream: _Stream) -> None:
        request_id = request.request_id
        assembler = DeltaAssembler(request)
        try:
            async for output in stream.result:
                out = output.outputs[0]
                token_ids = list(out.token_ids_diff)
                logprobs = _logprobs(token_ids, list(out.logprobs_diff or []))
                reason = _engine_reason(out, output.finished)
                delta = assembler.feed(
                    token_ids,
                    logprobs or None,
                    reason,
                    num_cached_tokens=int(getattr(output, "cached_tokens", 0) or 0),
                )
                if delta is not None:
                    self.deliver(request_id, delta)
                if assembler.is_done:
                    if reason is None:  # a stop sequence matched here: the engine goes on
                        stream.result.abort()
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            message = str(exc)
            logger.error("engine failed request_id=%s: %s", request_id, message)
            error = self._error(message)
            if type(exc).__name__ != "RequestError":  # the executor itself failed
                error = EngineDead(f"TensorRT-LLM failed: {message}")
            if isinstance(error, EngineDead):
                self._mark_dead(str(error))
            self.fail(request_id, error)
        finally:
            self._streams.pop(request_id, None)

    def _error(self, message: str) -> Exception:
        return classify_engine_error(message, self._config.fatal_error_patterns)

    async def _poll_stats(self) -> None:
        while not self._is_stopping:
            try:
                async for stats in self._llm.get_stats_async(timeout=self._config.stats_period_s):
                    self._latest_stats = stats
            except Exception as exc:  # stats are best effort; the streams report engine death
                logger.debug("get_stats_async failed: %s", exc)
            await asyncio.sleep(self._config.stats_period_s)

    async def _poll_kv_events(self) -> None:
        # Unlike the binding's manager, the LLM API's queue waits without the GIL; a zero
        # timeout would end every drain before it looked at the queue.
        timeout_s = max(self._config.kv_events_timeout_ms, 50.0) / 1000.0
        while not self._is_stopping:
            try:
                events = [
                    event async for event in self._llm.get_kv_cache_events_async(timeout=timeout_s)
                ]
            except Exception as exc:
                logger.debug("get_kv_cache_events_async failed: %s", exc)
                events = []
            if events:
                self._kv_index.apply_serialized(events)
            else:
                await asyncio.sleep(self._config.kv_events_poll_period_ms / 1000.0)
