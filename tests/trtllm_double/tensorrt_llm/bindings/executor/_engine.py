"""The double's engine core: in-flight batching over a paged, reusable KV cache and a hash "model".

Deterministic by construction: the next token is a hash of the last four tokens (plus a seed salt when
sampling), so greedy runs repeat exactly. KV blocks follow TensorRT-LLM's reuse rules closely enough for
routing tests: full blocks are stored with chained hashes after the context phase and at completion,
reuse matches full blocks of `prompt[:-1]`, and unreferenced blocks are evicted lowest priority first,
then least recently used, each eviction producing a "removed" event.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._enums import CapacitySchedulerPolicy, FinishReason
from ._request import KvCacheRetentionConfig, Request, Response, Result
from ._stats import InflightBatchingStats, IterationStats, KvCacheStats
from .kv_cache import (
    KVCacheCreatedData,
    KVCacheRemovedData,
    KVCacheStoredBlockData,
    KVCacheStoredData,
    UniqueToken,
    _EventQueue,
)

_DEFAULT_PRIORITY = 35


@dataclass(frozen=True)
class EngineSpec:
    """What the double reads from an engine dir's config.json (trtllm-build layout).

    The optional "shepherd_double" section tunes the simulation: KV capacity in blocks, per-iteration
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

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size * self.cp_size

    @classmethod
    def from_engine_dir(cls, model_path: str | Path) -> EngineSpec:
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
        )


def next_token(context: list[int], *, vocab_size: int, salt: int = 0) -> tuple[int, float]:
    """The "model": (token, logprob) from the last four tokens; salt 0 is greedy decoding."""
    window = context[-4:]
    data = struct.pack(f"<{len(window)}q", *window) + struct.pack("<q", salt)
    value = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
    return value % vocab_size, -((value >> 32) % 4000) / 1000.0 - 0.001


def block_hash(parent_hash: int | None, token_ids: list[int]) -> int:
    """Chained 64-bit block hash (the engine's own; opaque to routers, like BlockKeyHasher)."""
    data = (parent_hash or 0).to_bytes(8, "little") + struct.pack(f"<{len(token_ids)}I", *token_ids)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class EngineCrashed(RuntimeError):
    """Raised by `step` when the poison token arrives (stands in for a CUDA fault)."""


@dataclass(eq=False)
class _Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set while the block is stored for reuse
    priority: int = _DEFAULT_PRIORITY
    last_used: int = 0


@dataclass(eq=False)
class _Sequence:
    request_id: int
    request: Request
    prompt: list[int]
    max_new_tokens: int
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    blocks: list[_Block] = field(default_factory=list)
    num_stored: int = 0
    reserved: int = 0
    is_cancelled: bool = False
    is_context_done: bool = False

    @property
    def num_computed_tokens(self) -> int:
        # KV exists for the prompt and every generated token but the newest.
        return len(self.prompt) + max(0, len(self.generated) - 1)


class BlockManager:
    """Paged KV blocks with a reuse table keyed by chained hash, and KV event production."""

    def __init__(
        self,
        num_blocks: int,
        tokens_per_block: int,
        *,
        enable_reuse: bool,
        events: _EventQueue | None,
    ) -> None:
        self.num_blocks = num_blocks
        self.tokens_per_block = tokens_per_block
        self.enable_reuse = enable_reuse
        self._events = events
        self._free: collections.deque[_Block] = collections.deque(
            _Block(i) for i in range(num_blocks)
        )
        self._stored: dict[int, _Block] = {}
        self._reserved = 0
        self._removed: list[int] = []
        self.tick = 0
        self.alloc_total_blocks = 0
        self.alloc_new_blocks = 0
        self.reused_blocks = 0
        self.missed_blocks = 0
        if events is not None:
            events.push(KVCacheCreatedData(num_blocks_per_cache_level=[num_blocks, 0]))

    def num_free(self) -> int:
        return len(self._free) + sum(1 for b in self._stored.values() if b.ref_count == 0)

    def try_admit(self, seq: _Sequence) -> bool:
        """Reserve every block the request may need (GUARANTEED_NO_EVICT) and set up its prompt."""
        tpb = self.tokens_per_block
        matched = self._match(seq.prompt) if self.enable_reuse else []
        total_needed = math.ceil((len(seq.prompt) + seq.max_new_tokens) / tpb)
        new_needed = total_needed - len(matched)
        num_idle_matched = sum(1 for b in matched if b.ref_count == 0)
        if new_needed > self.num_free() - num_idle_matched - self._reserved:
            return False
        for block in matched:
            block.ref_count += 1
            block.last_used = self.tick
        seq.blocks = list(matched)
        seq.num_stored = len(matched)
        seq.reserved = new_needed
        self._reserved += new_needed
        num_prompt_blocks = math.ceil(len(seq.prompt) / tpb)
        self.ensure_capacity(seq, len(seq.prompt))
        self.alloc_total_blocks += num_prompt_blocks
        self.alloc_new_blocks += num_prompt_blocks - len(matched)
        self.reused_blocks += len(matched)
        self.missed_blocks += num_prompt_blocks - len(matched)
        return True

    def ensure_capacity(self, seq: _Sequence, num_tokens: int) -> None:
        while len(seq.blocks) * self.tokens_per_block < num_tokens:
            block = self._take_free_block()
            block.ref_count = 1
            block.last_used = self.tick
            seq.blocks.append(block)
            if seq.reserved > 0:
                seq.reserved -= 1
                self._reserved -= 1

    def store(self, seq: _Sequence) -> None:
        """Make every full block with computed KV reusable; one stored event per chain segment."""
        if not self.enable_reuse:
            return
        tpb = self.tokens_per_block
        tokens = (seq.prompt + seq.generated)[: seq.num_computed_tokens]
        num_full = len(tokens) // tpb
        parent = self._chain_hash(seq, seq.num_stored)
        segment: list[KVCacheStoredBlockData] = []
        segment_parent = parent
        for i in range(seq.num_stored, num_full):
            chunk = tokens[i * tpb : (i + 1) * tpb]
            digest = block_hash(parent, chunk)
            block = seq.blocks[i]
            if digest in self._stored:  # an identical block was stored meanwhile: keep ours private
                self._emit_stored(segment_parent, segment)
                segment, segment_parent = [], digest
            else:
                block.hash = digest
                block.priority = self._priority(seq, i)
                self._stored[digest] = block
                segment.append(
                    KVCacheStoredBlockData(
                        block_hash=digest,
                        tokens=[UniqueToken(t, 0) for t in chunk],
                        lora_id=None,
                        cache_level=0,
                        priority=block.priority,
                    )
                )
            parent = digest
        self._emit_stored(segment_parent, segment)
        seq.num_stored = max(seq.num_stored, num_full)

    def release(self, seq: _Sequence) -> None:
        for block in seq.blocks:
            block.ref_count -= 1
            block.last_used = self.tick
            if block.ref_count == 0 and block.hash is None:
                self._free.append(block)
        self._reserved -= seq.reserved
        seq.reserved = 0
        seq.blocks = []

    def flush_events(self) -> None:
        if self._removed and self._events is not None:
            self._events.push(KVCacheRemovedData(block_hashes=self._removed))
        self._removed = []

    def stats(self) -> KvCacheStats:
        num_free = self.num_free()
        lookups = self.reused_blocks + self.missed_blocks
        return KvCacheStats(
            max_num_blocks=self.num_blocks,
            free_num_blocks=num_free,
            used_num_blocks=self.num_blocks - num_free,
            tokens_per_block=self.tokens_per_block,
            alloc_total_blocks=self.alloc_total_blocks,
            alloc_new_blocks=self.alloc_new_blocks,
            reused_blocks=self.reused_blocks,
            missed_blocks=self.missed_blocks,
            cache_hit_rate=self.reused_blocks / lookups if lookups else 0.0,
        )

    # ---- internals ------------------------------------------------------------------------------
    def _match(self, prompt: list[int]) -> list[_Block]:
        """Stored blocks matching full blocks of prompt[:-1]: the last token is never in a key."""
        tpb = self.tokens_per_block
        key_tokens = prompt[:-1]
        matched: list[_Block] = []
        parent: int | None = None
        for i in range(len(key_tokens) // tpb):
            digest = block_hash(parent, key_tokens[i * tpb : (i + 1) * tpb])
            block = self._stored.get(digest)
            if block is None:
                break
            matched.append(block)
            parent = digest
        return matched

    def _chain_hash(self, seq: _Sequence, index: int) -> int | None:
        """Hash of block index-1 of the sequence, recomputed (private duplicates have no .hash)."""
        if index == 0:
            return None
        tpb = self.tokens_per_block
        tokens = seq.prompt + seq.generated
        parent: int | None = None
        for i in range(index):
            parent = block_hash(parent, tokens[i * tpb : (i + 1) * tpb])
        return parent

    def _priority(self, seq: _Sequence, index: int) -> int:
        retention: KvCacheRetentionConfig | None = seq.request.kv_cache_retention_config
        start, end = index * self.tokens_per_block, (index + 1) * self.tokens_per_block
        if retention is None:
            return _DEFAULT_PRIORITY
        priority = retention.decode_retention_priority if end > len(seq.prompt) else None
        for token_range in retention.token_range_retention_configs:
            range_end = token_range.token_end if token_range.token_end is not None else 1 << 62
            if token_range.token_start < end and start < range_end:
                priority = max(priority or 0, token_range.priority)
        return _DEFAULT_PRIORITY if priority is None else priority

    def _take_free_block(self) -> _Block:
        if self._free:
            return self._free.popleft()
        idle = [b for b in self._stored.values() if b.ref_count == 0]
        if not idle:
            raise RuntimeError("[TensorRT-LLM][ERROR] no free KV cache block")  # reserved: unreachable
        victim = min(idle, key=lambda b: (b.priority, b.last_used))
        assert victim.hash is not None
        del self._stored[victim.hash]
        self._removed.append(victim.hash)
        victim.hash = None
        victim.priority = _DEFAULT_PRIORITY
        return victim

    def _emit_stored(self, parent: int | None, blocks: list[KVCacheStoredBlockData]) -> None:
        if blocks and self._events is not None:
            self._events.push(KVCacheStoredData(parent_hash=parent, blocks=blocks))


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
        has_events = kv.enable_block_reuse and kv.event_buffer_max_size > 0
        self.events = (
            _EventQueue(kv.event_buffer_max_size, window_size=spec.max_seq_len)
            if has_events
            else None
        )
        self.blocks = BlockManager(
            num_blocks, spec.tokens_per_block, enable_reuse=kv.enable_block_reuse, events=self.events
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
        self._queued: collections.deque[_Sequence] = collections.deque()
        self._active: list[_Sequence] = []
        self._iter = 0
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
        for seq in list(self._active):
            if self.spec.poison_token_id is not None and self.spec.poison_token_id in seq.prompt:
                raise EngineCrashed(
                    "[TensorRT-LLM][ERROR] CUDA runtime error in step: "
                    "an illegal memory access was encountered"
                )
            if not seq.is_context_done:
                seq.is_context_done = True
                self.blocks.store(seq)
            self._decode(seq, responses)
        self.blocks.flush_events()
        if self._keep_stats:
            num_completed = sum(1 for r in responses if r.has_error() or r.result.is_final)
            self._record_stats(started, num_new, num_context, num_ctx_tokens, num_completed)
        return responses

    # ---- internals ------------------------------------------------------------------------------
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
        self._queued.append(_Sequence(request_id, request, prompt, max_new_tokens))

    def _mark_cancelled(self, request_id: int) -> None:
        for seq in (*self._queued, *self._active):
            if seq.request_id == request_id:
                seq.is_cancelled = True

    def _decode(self, seq: _Sequence, responses: list[Response]) -> None:
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
        self, seq: _Sequence, reason: FinishReason, new_tokens: list[int], out: list[Response]
    ) -> None:
        self.blocks.store(seq)
        self.blocks.release(seq)
        out.append(self._final(seq, reason, new_tokens))

    def _partial(self, seq: _Sequence, new_tokens: list[int]) -> Response:
        return Response(seq.request_id, self._result(seq, new_tokens, None), seq.request.client_id)

    def _final(self, seq: _Sequence, reason: FinishReason, new_tokens: list[int]) -> Response:
        if not seq.request.streaming:
            new_tokens = list(seq.generated)
            if not seq.request.output_config.exclude_input_from_output:
                new_tokens = seq.prompt + new_tokens
        return Response(seq.request_id, self._result(seq, new_tokens, reason), seq.request.client_id)

    def _result(self, seq: _Sequence, tokens: list[int], reason: FinishReason | None) -> Result:
        log_probs = None
        if seq.request.output_config.return_log_probs:
            num_generated = min(len(tokens), len(seq.generated))
            log_probs = [seq.logprobs[len(seq.logprobs) - num_generated :] if num_generated else []]
        return Result(
            is_final=reason is not None,
            output_token_ids=[tokens],
            finish_reasons=[reason or FinishReason.NOT_FINISHED],
            log_probs=log_probs,
            cum_log_probs=[sum(seq.logprobs)] if log_probs is not None else None,
            decoding_iter=len(seq.generated),
        )

    def _num_waiting_dec(self) -> None:
        with self._lock:
            self._num_waiting -= 1

    def _record_stats(
        self, started: float, num_new: int, num_context: int, num_ctx_tokens: int, num_completed: int
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
