"""Double of `tensorrt_llm.LLM` on the PyTorch backend (NVIDIA/TensorRT-LLM tensorrt_llm/llmapi/llm.py@4c05a748:
`BaseLLM.__init__`, `generate_async`, `get_stats_async`, `get_kv_cache_events_async`, `shutdown`,
`_prepare_sampling_params`, `_check_arguments`; signatures pinned by
tests/unit/test_trtllm_llmapi_conformance.py). That commit's version.py is not stored, so its exact
version is not established: it is the BaseLLM/TorchLlmArgs generation with `scheduling_params`,
`cache_salt` and `orchestrator_type`, the shape the 1.2 release has.

What is mirrored, with the real behaviour it stands for:
- the constructor rejects unknown keywords ("LLM got invalid argument: <key>"), needs a local HF
  checkpoint dir, and fails with "Only N GPUs are available, but M are required." when fewer GPUs
  are visible than tensor_parallel_size * pipeline_parallel_size;
- with tp*pp > 1 the ranks are separate MPI processes started with MPI_Comm_spawn from this
  process (the real LLM uses an `MpiPoolSession`, mpi4py's spawn), so a replica's Open MPI
  environment and GPU visibility are exercised exactly as for the 1.2 Executor's orchestrator;
- `generate_async(prompt_token_ids, sampling_params, streaming=True, kv_cache_retention_config=...)`
  returns a `RequestOutput` at once; "LLM is shutting down" after `shutdown()`; `end_id=None`
  without a tokenizer is a ValueError; a prompt over `max_num_tokens` without chunked prefill is a
  ValueError (`_check_arguments`);
- results, KV events (`KVCacheEventSerializer` dicts) and stats (camelCase JSON) stream as in
  result.py; per-request errors raise `RequestError` from the iteration;
- guided decoding (`guided_decoding_backend` "xgrammar" or "llguidance", llm_args.py): it needs the
  tokenizer (`_torch/pyexecutor/py_executor_creator.py` asserts one, so `skip_tokenizer_init=True`
  fails), its `GuidedDecodingConfig` comes from `_xgrammar_tokenizer_info` (llmapi/tokenizer.py), and
  each request's `SamplingParams._get_guided_decoding_params()` reaches the engine's `Request`. With
  llguidance the double builds each request's matcher as `LLGuidanceMatcherFactory.create` does
  (`_torch/pyexecutor/grammar_matcher.py`: JSON is `{"type": "object"}`, EBNF_GRAMMAR is Lark,
  STRUCTURAL_TAG is refused) and fails the request with its error; xgrammar is not installed here, so
  its guides are passed on unchecked. Without a backend, guides are ignored, as the executor has no
  guided decoder. The double never constrains its "model".
The "model" and the KV cache are the bindings double's engine core, so outputs, block hashes and
events agree with the 1.2 Executor double for the same prompt.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from pathlib import Path
from typing import Any

from tensorrt_llm.bindings import executor as tllm
from tensorrt_llm.bindings.executor import _executor as _bindings_executor
from tensorrt_llm.bindings.executor._engine import EngineSpec

from ..executor.result import GenerationResult, IterationResult
from ..sampling_params import SamplingParams
from .llm_args import TORCH_LLM_ARGS, KvCacheConfig


class RequestOutput(GenerationResult):
    """The output data of a completion request to the LLM."""

    _token_logprobs = True

    @property
    def prompt(self) -> str | None:
        return None


def _serialize_event(event: Any) -> dict[str, Any]:
    """`tensorrt_llm._utils.KVCacheEventSerializer.to_json_str` (lora_id is not serialized)."""
    data = event.data
    if hasattr(data, "num_blocks_per_cache_level"):
        body: dict[str, Any] = {
            "type": "created",
            "num_blocks_per_cache_level": data.num_blocks_per_cache_level,
        }
    elif hasattr(data, "blocks"):
        body = {
            "type": "stored",
            "parent_hash": data.parent_hash,
            "blocks": [
                {
                    "type": "stored_block",
                    "block_hash": block.block_hash,
                    "tokens": [
                        {
                            "type": "unique_token",
                            "token_id": t.token_id,
                            "token_extra_id": t.token_extra_id,
                        }
                        for t in block.tokens
                    ],
                    "cache_level": block.cache_level,
                    "priority": block.priority,
                }
                for block in data.blocks
            ],
        }
    elif hasattr(data, "block_hashes"):
        body = {"type": "removed", "block_hashes": list(data.block_hashes)}
    else:
        body = {"type": "updated", "block_hash": data.block_hash}
    return {"event_id": event.event_id, "data": body, "window_size": event.window_size}


class LLM:
    def __init__(
        self,
        model: str | Path,
        tokenizer: Any = None,
        tokenizer_mode: str = "auto",
        skip_tokenizer_init: bool = False,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        revision: str | None = None,
        tokenizer_revision: str | None = None,
        **kwargs: Any,
    ) -> None:
        for key in kwargs:
            if key not in TORCH_LLM_ARGS:
                raise ValueError(f"{self.__class__.__name__} got invalid argument: {key}")
        backend = kwargs.get("backend", "pytorch")
        if backend != "pytorch":
            raise ValueError(f"the double serves backend='pytorch' only, got {backend!r}")
        kv = kwargs.get("kv_cache_config") or KvCacheConfig()
        if not isinstance(kv, KvCacheConfig):
            raise TypeError("kv_cache_config must be a tensorrt_llm.llmapi.KvCacheConfig")
        self.kv_cache_config = kv
        self._pp = int(kwargs.get("pipeline_parallel_size", 1))
        self._tp = int(tensor_parallel_size)
        world_size = self._tp * self._pp
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
        if visible and len(visible) < world_size:
            raise RuntimeError(
                f"Only {len(visible)} GPUs are available, but {world_size} are required."
            )
        self.max_num_tokens: int | None = kwargs.get("max_num_tokens", 8192)
        self.enable_chunked_prefill = bool(kwargs.get("enable_chunked_prefill", False))
        self.spec = EngineSpec.from_hf_config(
            model,
            tp_size=self._tp,
            pp_size=self._pp,
            tokens_per_block=kv.tokens_per_block,
            max_batch_size=kwargs.get("max_batch_size"),
            max_seq_len=kwargs.get("max_seq_len"),
        )
        self.tokenizer = None if skip_tokenizer_init else self._load_tokenizer(model, tokenizer)
        self.guided_decoding_backend = kwargs.get("guided_decoding_backend")
        self.guided_decoding_config = self._guided_decoding_config(self.guided_decoding_backend)
        self._llguidance_tokenizer: Any = None
        config = self._executor_config(kv, kwargs)
        self._responses = _bindings_executor._ResponseStore(threading.Event())
        self._stop = threading.Event()
        self._fatal: str | None = None
        self._is_shut_down = False
        self._results: dict[int, GenerationResult] = {}
        self._perf_metrics_asked: dict[int, bool] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._kv_events = IterationResult()
        self._stats = IterationResult()
        self._backend: Any
        if world_size > 1:
            from tensorrt_llm.bindings.executor._orchestrator import OrchestratorBackend

            self._backend = OrchestratorBackend(
                str(model),
                tllm.ModelType.DECODER_ONLY,
                config,
                self.spec,
                device_ids=list(range(world_size)),
                on_responses=self._responses.push,
                on_fatal=self._set_fatal,
                send_spec=True,
            )
        else:
            self._backend = _bindings_executor._LocalBackend(
                self.spec, config, self._responses.push, self._set_fatal
            )
        self._dispatcher = threading.Thread(target=self._dispatch, name="llm-dispatch", daemon=True)
        self._dispatcher.start()

    # ---- the API ---------------------------------------------------------------------------------
    def generate_async(
        self,
        inputs: Any,
        sampling_params: SamplingParams | None = None,
        lora_request: Any = None,
        prompt_adapter_request: Any = None,
        streaming: bool = False,
        kv_cache_retention_config: Any = None,
        disaggregated_params: Any = None,
        _postproc_params: Any = None,
        scheduling_params: Any = None,
        cache_salt: str | None = None,
    ) -> RequestOutput:
        if self._is_shut_down or self._fatal is not None:
            raise RuntimeError("LLM is shutting down")
        sampling_params = sampling_params or SamplingParams()
        if sampling_params.end_id is None and self.tokenizer is None:
            raise ValueError(
                "tokenizer is required to reset end_id if it is None, or you can explicitly "
                "specify the end_id for sampling_params"
            )
        if isinstance(inputs, dict) and "prompt_token_ids" in inputs:
            prompt_token_ids = list(inputs["prompt_token_ids"])
        elif isinstance(inputs, list) and all(isinstance(t, int) for t in inputs):
            prompt_token_ids = list(inputs)
        else:
            raise TypeError(f"The inputs must be type str or list of int, but got {type(inputs)}")
        if (
            not self.enable_chunked_prefill
            and self.max_num_tokens
            and len(prompt_token_ids) > self.max_num_tokens
        ):
            raise ValueError(
                f"The sum of prompt length ({float(len(prompt_token_ids))}), query length (0) "
                f"should not exceed max_num_tokens ({self.max_num_tokens})"
            )
        loop = asyncio.get_running_loop()
        self._kv_events._bind(loop)
        self._stats._bind(loop)
        self._kv_events.mark_undone()
        self._stats.mark_undone()
        request_id = next(self._ids)
        result = RequestOutput(
            request_id,
            prompt_token_ids,
            sampling_params,
            streaming=streaming,
            loop=loop,
            abort=self._abort_request,
        )
        end_id = -1 if sampling_params.ignore_eos else sampling_params.end_id
        guided_decoding_params = sampling_params._get_guided_decoding_params()
        output_config = sampling_params._get_output_config(is_pytorch_backend=True)
        # The PyTorch backend always knows the prompt length it reused (the C++ LlmRequest's
        # prepopulated prompt length, reported as `LlmResult.cached_tokens`); the double's engine
        # reports reuse through its perf metrics, which `_dispatch` turns into that number.
        is_perf_metrics_asked = output_config.return_perf_metrics
        output_config.return_perf_metrics = True
        request = tllm.Request(
            prompt_token_ids,
            sampling_params.max_tokens,
            streaming=streaming,
            sampling_config=sampling_params._get_sampling_config(),
            output_config=output_config,
            end_id=end_id,
            pad_id=sampling_params.pad_id,
            stop_words=sampling_params._get_stop_words() or None,
            kv_cache_retention_config=kv_cache_retention_config,
            client_id=request_id,
            guided_decoding_params=guided_decoding_params
            if self.guided_decoding_config is not None
            else None,
        )
        with self._lock:
            self._results[request_id] = result
            self._perf_metrics_asked[request_id] = is_perf_metrics_asked
        error = self._guided_decoding_error(request.guided_decoding_params)
        if error is not None:
            self._responses.push([tllm.Response(request_id, error, request_id)])
            return result
        self._backend.submit(request_id, request)
        return result

    def get_stats_async(self, timeout: float | None = 2) -> IterationResult:
        self._stats.set_timeout(timeout or 0.0)
        return self._stats

    def get_kv_cache_events_async(self, timeout: float | None = 2) -> IterationResult:
        self._kv_events.set_timeout(timeout or 0.0)
        return self._kv_events

    def shutdown(self) -> None:
        if self._is_shut_down:
            return
        self._is_shut_down = True
        self._stop.set()
        self._dispatcher.join()
        self._backend.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> bool:
        self.shutdown()
        return False

    # ---- internals ---------------------------------------------------------------------------------
    def _guided_decoding_config(self, backend: Any) -> Any:
        if backend is None:
            return None
        if backend not in ("xgrammar", "llguidance"):
            raise ValueError(
                f"guided_decoding_backend: Input should be 'xgrammar' or 'llguidance' [input_value={backend!r}]"
            )
        assert self.tokenizer is not None  # py_executor_creator.py, for either backend
        stop_token_ids = [self.tokenizer.eos_token_id]
        vocab = self.tokenizer.get_vocab()
        encoded_vocab = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
        kind = tllm.GuidedDecodingConfig.GuidedDecodingBackend
        return tllm.GuidedDecodingConfig(
            kind.XGRAMMAR if backend == "xgrammar" else kind.LLGUIDANCE,
            encoded_vocab=encoded_vocab,
            tokenizer_str=self.tokenizer.backend_tokenizer.to_str(),
            stop_token_ids=stop_token_ids,
        )

    def _guided_decoding_error(self, params: Any) -> str | None:
        """What `LLGuidanceMatcherFactory.create` raises for this request's guide, if anything."""
        if params is None or self.guided_decoding_backend != "llguidance":
            return None
        import llguidance

        if self._llguidance_tokenizer is None:
            config = self.guided_decoding_config
            self._llguidance_tokenizer = llguidance.LLTokenizer(
                config.tokenizer_str,
                n_vocab=self.spec.vocab_size,
                eos_token=config.stop_token_ids[0],
            )
        guide_type = tllm.GuidedDecodingParams.GuideType
        matcher = llguidance.LLMatcher
        if params.guide_type is guide_type.JSON:
            grammar = matcher.grammar_from_json_schema('{"type": "object"}')
        elif params.guide_type is guide_type.JSON_SCHEMA:
            try:
                grammar = matcher.grammar_from_json_schema(params.guide)
            except ValueError as exc:
                return str(exc)
        elif params.guide_type is guide_type.REGEX:
            grammar = matcher.grammar_from_regex(params.guide)
        elif params.guide_type is guide_type.EBNF_GRAMMAR:
            grammar = matcher.grammar_from_lark(params.guide)
        else:
            return f"Unsupported guide type: {params.guide_type}."
        built = matcher(self._llguidance_tokenizer, grammar)
        return f"LLGuidance matcher error: {built.get_error()}" if built.is_error() else None

    @staticmethod
    def _load_tokenizer(model: str | Path, tokenizer: Any) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer or model))

    def _executor_config(self, kv: KvCacheConfig, kwargs: dict[str, Any]) -> Any:
        kv_cache_config = tllm.KvCacheConfig(
            enable_block_reuse=kv.enable_block_reuse,
            max_tokens=kv.max_tokens,
            event_buffer_max_size=kv.event_buffer_max_size,
            enable_partial_reuse=kv.enable_partial_reuse,
        )
        parallel = None
        if self._tp * self._pp > 1:
            worker = Path(__file__).resolve().parents[1] / "bin" / "executorWorker"
            parallel = tllm.ParallelConfig(
                communication_mode=tllm.CommunicationMode.ORCHESTRATOR,
                orchestrator_config=tllm.OrchestratorConfig(True, str(worker)),
            )
        return tllm.ExecutorConfig(
            1,
            kv_cache_config=kv_cache_config,
            max_batch_size=kwargs.get("max_batch_size"),
            iter_stats_max_iterations=kwargs.get("iter_stats_max_iterations") or 1000,
            parallel_config=parallel,
        )

    def _abort_request(self, request_id: int) -> None:
        self._backend.cancel(request_id)

    def _set_fatal(self, message: str) -> None:
        self._fatal = message

    def _dispatch(self) -> None:
        """The proxy's dispatch thread: responses to their results, events and stats to theirs."""
        while not self._stop.is_set():
            for response in self._responses.take(None, 0.01):
                with self._lock:
                    result = self._results.get(response.request_id)
                    is_asked = self._perf_metrics_asked.get(response.request_id, False)
                    if response.has_error() or response.result.is_final:
                        self._results.pop(response.request_id, None)
                        self._perf_metrics_asked.pop(response.request_id, None)
                if not response.has_error():
                    self._set_cached_tokens(response.result, is_perf_metrics_asked=is_asked)
                if result is not None:
                    result._enqueue_threadsafe(response)
            if self._fatal is not None:
                with self._lock:
                    pending, self._results = list(self._results.values()), {}
                for result in pending:
                    result._enqueue_threadsafe(RuntimeError(self._fatal))
            events = self._drain_events()
            for event in events:
                self._kv_events._put_threadsafe(_json(_serialize_event(event)))
            for stats in self._backend.iteration_stats():
                self._stats._put_threadsafe(stats.to_json_str())

    def _set_cached_tokens(self, result: Any, *, is_perf_metrics_asked: bool) -> None:
        """`LlmResult.cached_tokens`: the reused prompt blocks in tokens (the double reuses whole
        blocks only)."""
        metrics = result.request_perf_metrics
        reused = metrics.kv_cache_metrics.num_reused_blocks if metrics is not None else 0
        result.cached_tokens = reused * self.spec.tokens_per_block
        if not is_perf_metrics_asked:
            result.request_perf_metrics = None

    def _drain_events(self) -> list[Any]:
        if hasattr(self._backend, "drain_events"):
            events: list[Any] = self._backend.drain_events()
            return events
        queue = self._backend.core.events
        return [] if queue is None else queue.drain(0.0, self._stop)


def _json(value: dict[str, Any]) -> str:
    import json

    return json.dumps(value)
