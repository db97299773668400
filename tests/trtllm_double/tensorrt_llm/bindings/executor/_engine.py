"""The double's engine core: in-flight batching over a paged, reusable KV cache and a hash "model".

Deterministic by construction: the next token is a hash of the last four tokens (plus a seed salt
when sampling), so greedy runs repeat exactly. The KV cache (reuse, events) is in `_kv_blocks`.

Behaviour taken from TensorRT-LLM 1.2 (cpp/tensorrt_llm/batch_manager/llmRequest.cpp `createResult`
and cpp/tensorrt_llm/executor/executorImpl.cpp @ b35ac1b6 = v1.2.0rc2, the same code in 1.2.x):
- streamed `output_token_ids` are the new tokens of the step, but `log_probs` is the whole per-beam
  vector of the request so far (TensorRT-LLM's own tensorrt_llm/executor/result.py slices it with
  `log_probs[src_idx][output._last_logprobs_len:]`);
- a forward step that throws ends every active request with an error `Response` (carrying its
  client id) and the executor loop goes on: `await_responses` never raises for it. A CUDA error is
  sticky on its context, so the double keeps failing every later step once it has failed.
"""

from __future__ import annotations

import collections
import hashlib
import json
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._enums import CapacitySchedulerPolicy, FinishReason
from ._kv_blocks import BlockManager, RequestState
from ._request import Request, RequestPerfMetrics, Response, Result
from ._stats import InflightBatchingStats, IterationStats
from .kv_cache import _EventQueue


@dataclass(frozen=True)
class EngineSpec:
    """What the double reads from an engine dir's config.json (trtllm-build layout).

    The optional "shepherd_double" section tunes the simulation: KV capacity in blocks, iteration
    latency, and a "poison" token whose arrival kills the engine (to test engine death).
    """

    vocab_size: int
    max_input_len: int
    max_seq_len: int
    max_batch_size: int
    tokens_per_block: int
    tp_size: int
    pp_size: int
    cp_size: int
    num_kv_blocks: int = 512
    iter_latency_s: float = 0.001
    poison_token_id: int | None = None
    hang_worker_rank: int | None = None

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size * self.cp_size

    @classmethod
    def from_hf_config(
        cls,
        model_dir: str | Path,
        *,
        tp_size: int,
        pp_size: int,
        tokens_per_block: int,
        max_batch_size: int | None,
        max_seq_len: int | None,
    ) -> EngineSpec:
        """For the LLM API double: a Hugging Face checkpoint dir (config.json, as the PyTorch
        backend reads it); the same optional "shepherd_double" section tunes the simulation."""
        path = Path(model_dir) / "config.json"
        if not path.exists():
            raise ValueError(f"{model_dir} is not a Hugging Face checkpoint (no config.json)")
        raw: dict[str, Any] = json.loads(path.read_text())
        double = raw.get("shepherd_double", {})
        seq_len = int(max_seq_len or raw.get("max_position_embeddings") or 2048)
        return cls(
            vocab_size=int(raw["vocab_size"]),
            max_input_len=seq_len,
            max_seq_len=seq_len,
            max_batch_size=int(max_batch_size or 2048),
            tokens_per_block=tokens_per_block,
            tp_size=tp_size,
            pp_size=pp_size,
            cp_size=1,
            num_kv_blocks=int(double.get("num_kv_blocks", 512)),
            iter_latency_s=float(double.get("iter_latency_ms", 1.0)) / 1000.0,
            poison_token_id=double.get("poison_token_id"),
            hang_worker_rank=double.get("hang_worker_rank"),
        )

    @classmethod
    def from_engine_dir(cls, model_path: str | Path) -> EngineSpec:
        # The keys `GptJsonConfig::parse` reads (gptJsonConfig.cpp@b57221b7; see
        # deployments/executors/trtllm_config.py `parse_engine_layout`), 32 being PluginConfig's
        # tokens_per_block default (plugin/plugin.py@c20322ff).
        path = Path(model_path) / "config.json"
        if not path.exists():
            raise RuntimeError(f"[TensorRT-LLM][ERROR] File does not exist: {path}")
        raw: dict[str, Any] = json.loads(path.read_text())
        pretrained, build = raw["pretrained_config"], raw["build_config"]
        mapping = pretrained.get("mapping", {})
        double = raw.get("shepherd_double", {})
        return cls(
            vocab_size=int(pretrained["vocab_size"]),
            max_input_len=int(build["max_input_len"]),
            max_seq_len=int(build["max_seq_len"]),
            max_batch_size=int(build.get("max_batch_size", 64)),
            tokens_per_block=int(build.get("plugin_config", {}).get("tokens_per_block", 32)),
            tp_size=int(mapping.get("tp_size", 1)),
            pp_size=int(mapping.get("pp_size", 1)),
            cp_size=int(mapping.get("cp_size", 1)),
            num_kv_blocks=int(double.get("num_kv_blocks", 512)),
            iter_latency_s=float(double.get("iter_latency_ms", 1.0)) / 1000.0,
            poison_token_id=double.get("poison_token_id"),
            hang_worker_rank=double.get("hang_worker_rank"),
        )


def next_token(context: list[int], *, vocab_size: int, salt: int = 0) -> tuple[int, float]:
    """The "model": (token, logprob) from the last four tokens; salt 0 is greedy decoding."""
    window = context[-4:]
    data = struct.pack(f"<{len(window)}q", *window) + struct.pack("<q", salt)
    value = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
    return value % vocab_size, -((value >> 32) % 4000) / 1000.0 - 0.001


class EngineCrashed(RuntimeError):
    """Raised inside `step` when the poison token arrives (stands in for a CUDA fault)."""


# executorImpl.cpp `forwardAsync`'s catch: every active request gets this error, and the loop goes on.
_FORWARD_ERROR = "[TensorRT-LLM][ERROR] Encountered an error in forwardAsync function: "


class EngineCore:
    """One engine instance: queue, scheduler, model and KV cache. `step()` is one iteration.

    Threading: `enqueue`/`cancel` may be called from any thread; `step` from one thread only.
    """

    def __init__(self, spec: EngineSpec, config: Any) -> None:
        kv = config.kv_cache_config
        self.spec = spec
        num_blocks = spec.num_kv_blocks
        if kv.max_tokens is not None:
            num_blocks = min(num_blocks, max(1, kv.max_tokens // spec.tokens_per_block))
        # event_buffer_max_size == 0: no event queue at all (the manager then returns nothing).
        self.events = (
            _EventQueue(kv.event_buffer_max_size, window_size=spec.max_seq_len)
            if kv.event_buffer_max_size > 0
            else None
        )
        self.blocks = BlockManager(
            num_blocks,
            spec.tokens_per_block,
            enable_reuse=kv.enable_block_reuse,
            events=self.events,
        )
        self.max_batch_size = min(config.max_batch_size or spec.max_batch_size, spec.max_batch_size)
        self.max_queue_size: int | None = config.max_queue_size
        # Both policies reserve the whole request here; MAX_UTILIZATION's pausing is not simulated.
        self.policy: CapacitySchedulerPolicy = config.scheduler_config.capacity_scheduler_policy
        self._iteration_stats: collections.deque[IterationStats] = collections.deque(
            maxlen=max(1, config.iter_stats_max_iterations)
        )
        self._keep_stats = config.iter_stats_max_iterations > 0
        self._lock = threading.Lock()
        self._inbox: list[tuple[str, int, Request | None]] = []
        self._num_waiting = 0
        self._queued: collections.deque[RequestState] = collections.deque()
        self._active: list[RequestState] = []
        self._iter = 0
        self._broken: str | None = None  # a sticky CUDA error: every later step fails too
        self.wake = threading.Event()

    # ---- any thread ------------------------------------------------------------------------------
    def enqueue(self, request_id: int, request: Request) -> None:
        with self._lock:
            if self.max_queue_size is not None and self._num_waiting >= self.max_queue_size:
                raise RuntimeError(
                    f"Maximum queue size of {self.max_queue_size} has been reached, "
                    "please try again later"
                )
            self._num_waiting += 1
            self._inbox.append(("enqueue", request_id, request))
        self.wake.set()

    def cancel(self, request_id: int) -> None:
        with self._lock:
            self._inbox.append(("cancel", request_id, None))
        self.wake.set()

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._inbox or self._queued or self._active)

    def drain_iteration_stats(self) -> list[IterationStats]:
        with self._lock:
            stats = list(self._iteration_stats)
            self._iteration_stats.clear()
            return stats

    # ---- engine thread ---------------------------------------------------------------------------
    def step(self) -> list[Response]:
        """One iteration: take new requests and cancellations, admit, decode one token each."""
        started = time.perf_counter()
        self._iter += 1
        self.blocks.tick = self._iter
        responses: list[Response] = []
        # 1) inbox: validate new requests (errors become error responses), apply cancellations
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for kind, request_id, request in inbox:
            if kind == "enqueue":
                assert request is not None
                self._accept(request_id, request, responses)
            else:
                self._mark_cancelled(request_id)
        # 2) cancelled requests end with CANCELLED, queued or running
        for seq in [s for s in self._queued if s.is_cancelled]:
            self._queued.remove(seq)
            self._num_waiting_dec()
            responses.append(self._final(seq, FinishReason.CANCELLED, []))
        for seq in [s for s in self._active if s.is_cancelled]:
            self._active.remove(seq)
            self._finish(seq, FinishReason.CANCELLED, [], responses)
        # 3) admission in FIFO order while the batch and the KV cache allow
        num_new = 0
        while self._queued and len(self._active) < self.max_batch_size:
            if not self.blocks.try_admit(self._queued[0]):
                break
            self._active.append(self._queued.popleft())
            self._num_waiting_dec()
            num_new += 1
        # 4) decode: every running request produces one token (the context phase yields the first)
        num_context = sum(1 for s in self._active if not s.is_context_done)
        num_ctx_tokens = sum(len(s.prompt) for s in self._active if not s.is_context_done)
        try:
            self._forward(responses)
        except EngineCrashed as exc:
            self._broken = str(exc)
        if self._broken is not None and self._active:
            for seq in list(self._active):
                self._active.remove(seq)
                self.blocks.release(seq)
                message = _FORWARD_ERROR + self._broken
                responses.append(Response(seq.request_id, message, seq.request.client_id))
        self.blocks.flush_events()
        if self._keep_stats:
            num_completed = sum(1 for r in responses if r.has_error() or r.result.is_final)
            self._record_stats(started, num_new, num_context, num_ctx_tokens, num_completed)
        return responses

    # ---- internals ------------------------------------------------------------------------------
    def _forward(self, responses: list[Response]) -> None:
        if self._broken is not None:
            return
        for seq in list(self._active):
            if self.spec.poison_token_id is not None and self.spec.poison_token_id in seq.prompt:
                raise EngineCrashed(
                    "CUDA runtime error in step: an illegal memory access was encountered"
                )
            if not seq.is_context_done:
                seq.is_context_done = True
                self.blocks.store(seq)
            self._decode(seq, responses)

    def _accept(self, request_id: int, request: Request, responses: list[Response]) -> None:
        prompt = request.input_token_ids
        error = None
        max_new_tokens = request.max_tokens
        if not prompt:
            error = "Input length is zero"
        elif len(prompt) > self.spec.max_input_len:
            error = (
                f"Prompt length ({len(prompt)}) exceeds maximum input length "
                f"({self.spec.max_input_len})."
            )
        elif request.sampling_config.beam_width != 1:
            error = "Beam width mismatch: the double only decodes beam width 1"
        elif len(prompt) + max_new_tokens > self.spec.max_seq_len:
            # llmRequest validate(): clamps with a warning rather than failing
            max_new_tokens = self.spec.max_seq_len - len(prompt)
            if max_new_tokens <= 0:
                error = f"Prompt length ({len(prompt)}) leaves no room for output tokens."
        if error is not None:
            self._num_waiting_dec()
            responses.append(Response(request_id, error, request.client_id))
            return
        self._queued.append(RequestState(request_id, request, prompt, max_new_tokens))

    def _mark_cancelled(self, request_id: int) -> None:
        for seq in (*self._queued, *self._active):
            if seq.request_id == request_id:
                seq.is_cancelled = True

    def _decode(self, seq: RequestState, responses: list[Response]) -> None:
        request = seq.request
        sampling = request.sampling_config
        is_greedy = sampling.top_k == 1
        salt = 0 if is_greedy else (sampling.seed or 0) * 1_000_003 + len(seq.generated) + 1
        context = seq.prompt + seq.generated
        token, logprob = next_token(context, vocab_size=self.spec.vocab_size, salt=salt)
        min_tokens = sampling.min_tokens or 0
        if token == request.end_id and len(seq.generated) < min_tokens:
            token = (token + 1) % self.spec.vocab_size
        if token == request.end_id:
            # The end id is not part of the output (sequence length does not grow on EOS).
            self._active.remove(seq)
            self._finish(seq, FinishReason.END_ID, [], responses)
            return
        seq.generated.append(token)
        seq.logprobs.append(logprob)
        self.blocks.ensure_capacity(seq, len(seq.prompt) + len(seq.generated))
        reason = None
        full = seq.prompt + seq.generated
        for word in request.stop_words or []:
            if word and len(full) >= len(word) and full[-len(word) :] == list(word):
                reason = FinishReason.STOP_WORDS
        if reason is None and len(seq.generated) >= seq.max_new_tokens:
            reason = FinishReason.LENGTH
        if reason is not None:
            self._active.remove(seq)
            self._finish(seq, reason, [token], responses)
        elif request.streaming:
            responses.append(self._partial(seq, [token]))

    def _finish(
        self, seq: RequestState, reason: FinishReason, new_tokens: list[int], out: list[Response]
    ) -> None:
        self.blocks.store(seq)
        self.blocks.release(seq)
        out.append(self._final(seq, reason, new_tokens))

    def _partial(self, seq: RequestState, new_tokens: list[int]) -> Response:
        return Response(seq.request_id, self._result(seq, new_tokens, None), seq.request.client_id)

    def _final(self, seq: RequestState, reason: FinishReason, new_tokens: list[int]) -> Response:
        if not seq.request.streaming:
            new_tokens = list(seq.generated)
            if not seq.request.output_config.exclude_input_from_output:
                new_tokens = seq.prompt + new_tokens
        return Response(
            seq.request_id, self._result(seq, new_tokens, reason), seq.request.client_id
        )

    def _result(self, seq: RequestState, tokens: list[int], reason: FinishReason | None) -> Result:
        log_probs = None
        if seq.request.output_config.return_log_probs:
            # createResult: the whole per-beam vector so far, even when token ids are deltas.
            log_probs = [list(seq.logprobs)]
        return Result(
            is_final=reason is not None,
            output_token_ids=[tokens],
            finish_reasons=[reason or FinishReason.NOT_FINISHED],
            log_probs=log_probs,
            cum_log_probs=[sum(seq.logprobs)] if log_probs is not None else None,
            decoding_iter=len(seq.generated),
            request_perf_metrics=self._perf_metrics(seq)
            if seq.request.output_config.return_perf_metrics
            else None,
        )

    @staticmethod
    def _perf_metrics(seq: RequestState) -> RequestPerfMetrics:
        """createResult copies the request's metrics into every result once asked for; the KV part
        is fixed at admission."""
        metrics = RequestPerfMetrics()
        kv = metrics.kv_cache_metrics
        kv.num_total_allocated_blocks = seq.num_total_blocks
        kv.num_new_allocated_blocks = seq.num_new_blocks
        kv.num_reused_blocks = seq.num_reused_blocks
        kv.num_missed_blocks = seq.num_total_blocks - seq.num_reused_blocks
        looked_up = seq.num_total_blocks
        kv.kv_cache_hit_rate = seq.num_reused_blocks / looked_up if looked_up else 0.0
        metrics.iter = len(seq.generated)
        return metrics

    def _num_waiting_dec(self) -> None:
        with self._lock:
            self._num_waiting -= 1

    def _record_stats(
        self,
        started: float,
        num_new: int,
        num_context: int,
        num_ctx_tokens: int,
        num_completed: int,
    ) -> None:
        stats = IterationStats(
            timestamp=time.strftime("%m-%d-%Y %H:%M:%S.000000"),
            iter=self._iter,
            iter_latency_ms=(time.perf_counter() - started) * 1000.0,
            new_active_requests_queue_latency_ms=0.0,
            num_new_active_requests=num_new,
            num_active_requests=len(self._active),
            num_queued_requests=len(self._queued),
            num_completed_requests=num_completed,
            max_num_active_requests=self.max_batch_size,
            gpu_mem_usage=0,
            cpu_mem_usage=0,
            pinned_mem_usage=0,
            kv_cache_stats=self.blocks.stats(),
            inflight_batching_stats=InflightBatchingStats(
                num_scheduled_requests=len(self._active),
                num_context_requests=num_context,
                num_gen_requests=len(self._active) - num_context,
                num_paused_requests=0,
                num_ctx_tokens=num_ctx_tokens,
                micro_batch_id=0,
                avg_num_decoded_tokens_per_iter=1.0,
            ),
        )
        with self._lock:
            self._iteration_stats.append(stats)
