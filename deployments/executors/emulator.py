"""A load-testing engine that does no compute: it streams token ids at configured H100 TensorRT-LLM speeds.

It exists to measure what the serving layer itself costs (benchmarks only, never the default engine). A prefix
cache model (`prefix_cache.PrefixCache`) decides which prompt tokens need prefill, so routing shows in TTFT.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import heapq
import json
import logging
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from deployments.config import EmulatorConfig
from deployments.errors import EngineError
from deployments.executors.base import Executor
from deployments.executors.prefix_cache import PrefixCache
from deployments.messages import (
    EngineCapabilities,
    ExecutorStats,
    FinishReason,
    GenerateRequest,
    TokenDelta,
)

logger = logging.getLogger(__name__)

# Byte-level BPE spells a leading space as "Ġ": such a token followed by ASCII letters decodes to " word";
# without enough of them, any all-letter piece will do.
_TOKEN_PATTERNS = (re.compile(r"^Ġ[A-Za-z]{2,}$"), re.compile(r"^Ġ?[A-Za-z]{2,}$"))
_MIN_WORD_TOKENS = 16

# TensorRT-LLM's published first-token latency at batch 1 on an H100 (FP8, LLaMA 7B, TP1) is 7 ms for 128
# input tokens and 36 ms for 2048: each further prompt token costs (36 - 7) ms / 1920 = 15.1 us ("Low Latency",
# table "H100 GPUs (FP8)" of https://github.com/NVIDIA/TensorRT-LLM/blob/77d24b5fa178f11ed7fafdd9833b7245e075f721/
# docs/source/performance.md). The H200 keeps the H100's time to first token, prefill being compute bound
# (https://github.com/NVIDIA/TensorRT-LLM/blob/1555478c1b417a0b34de05209862ea5a2ab9add1/docs/source/blogs/H200launch.md).
PUBLISHED_PREFILL_TOKENS_PER_S = (2048 - 128) / 0.029  # 66,207 tokens/s


def read_vocab_size(model_dir: str | Path) -> int:
    """`vocab_size` from a Hugging Face config.json, or from a trtllm-build engine's `pretrained_config`."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    vocab_size = config.get("vocab_size") or (config.get("pretrained_config") or {}).get(
        "vocab_size"
    )
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"{model_dir}/config.json declares no vocab_size")
    return vocab_size


def visible_token_ids(model_dir: str | Path, vocab_size: int) -> list[int]:
    """Ids the emulator emits: word tokens of tokenizer.json when there is one, so the stream detokenizes to
    visible text; otherwise (no tokenizer beside the weights) the upper half of the vocabulary."""
    path = Path(model_dir) / "tokenizer.json"
    if path.exists():
        tokenizer = json.loads(path.read_text())
        special_ids = {token["id"] for token in tokenizer.get("added_tokens", [])}
        vocab = (tokenizer.get("model") or {}).get("vocab") or {}
        for pattern in _TOKEN_PATTERNS:
            token_ids = sorted(
                token_id
                for token, token_id in vocab.items()
                if pattern.match(token) and token_id not in special_ids and token_id < vocab_size
            )
            if len(token_ids) >= _MIN_WORD_TOKENS:
                return token_ids
    return list(range(vocab_size // 2, vocab_size))


@dataclass(slots=True)
class _Running:
    """One admitted request: where it is in its output and when its first token is due."""

    request_id: str
    token_ids: list[int]
    offset: int
    max_tokens: int
    prompt_token_ids: list[int]
    block_hashes: list[int]
    num_cached_tokens: int
    first_token_at: float
    num_emitted: int = 0

    def output_token_ids(self) -> list[int]:
        table = self.token_ids
        return [table[(self.offset + i) % len(table)] for i in range(self.num_emitted)]


class EmulatorExecutor(Executor):
    """Emits `max_tokens` ids per request (finish LENGTH) with the timing of an in-flight batching engine.

    Up to `max_batch_size` requests run together; more wait in a FIFO queue. An admitted request's first token
    comes `ttft_ms` (+ uncached prompt tokens / `prefill_tokens_per_s`) after admission, the prefix cache model
    deciding which prompt tokens are cached (its first delta says how many); from then on it joins the
    decoding steps, one every `itl_ms`, in which every running request gains one token together, as on a GPU.
    An idle engine starts its step clock at the first token, so one request alone sees exactly `ttft_ms` and
    `itl_ms`. When the loop wakes late (a busy CPU), it catches up on the missed steps: the engine keeps its
    configured speed, and a lagging consumer receives merged deltas, as it would from a real engine.

    Emitted ids are never `end_id` nor the first id of a stop sequence. Threading: everything runs on the
    replica's event loop, in one timer task per replica (no task or timer per request or token).
    """

    capabilities = EngineCapabilities()

    def __init__(self, config: EmulatorConfig, model_dir: str) -> None:
        super().__init__()
        self._config = config
        self._ttft_s = config.ttft_ms / 1000
        self._itl_s = config.itl_ms / 1000
        self.vocab_size = read_vocab_size(model_dir)
        self.token_ids = visible_token_ids(model_dir, self.vocab_size)
        self._cache = (
            PrefixCache(config.num_kv_blocks, config.tokens_per_block)
            if config.num_kv_blocks
            else None
        )
        # With a cache model, each first delta says what it found; `Executor.stats` totals them.
        self.reports_cached_tokens = self._cache is not None
        self._waiting: collections.deque[GenerateRequest] = collections.deque()
        self._prefilling: list[
            tuple[float, int, str]
        ] = []  # heap of (first_token_at, seq, request_id)
        self._running: dict[str, _Running] = {}
        self._decoding: dict[str, _Running] = {}
        self._next_step_at = 0.0
        self._num_admitted = 0
        self._wakeup: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await super().start()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="emulator-steps")
        self._task.add_done_callback(self._on_task_done)
        logger.info(
            "emulator engine: ttft %.1f ms, itl %.1f ms, max batch %d, %d distinct token ids",
            self._config.ttft_ms,
            self._config.itl_ms,
            self._config.max_batch_size,
            len(self.token_ids),
        )

    async def shutdown(self) -> None:
        await super().shutdown()
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    def queue_depth(self) -> int:
        return len(self._waiting)

    def prefill_s(self, num_uncached_tokens: int) -> float:
        """Admission to first token: `ttft_ms`, plus the prefill of the prompt tokens the cache lacks."""
        if self._config.prefill_tokens_per_s <= 0:
            return self._ttft_s
        return self._ttft_s + num_uncached_tokens / self._config.prefill_tokens_per_s

    def stats(self) -> ExecutorStats:
        stats = super().stats()
        if self._cache is None:
            return stats
        return dataclasses.replace(stats, kv_cache_usage=self._cache.usage)

    # ---- contract --------------------------------------------------------------------------------
    def _submit(self, request: GenerateRequest) -> None:
        if self._task is None or self._task.done():
            raise EngineError("the emulator engine is not running")
        self._waiting.append(request)
        self._wake()

    def _cancel(self, request_id: str) -> None:
        # A prefilling entry stays in the heap and is skipped when popped (lazy deletion).
        if self._cache is not None:
            self._cache.release(request_id)
        if self._running.pop(request_id, None) is None:
            self._waiting = collections.deque(
                r for r in self._waiting if r.request_id != request_id
            )
        self._decoding.pop(request_id, None)
        self._wake()

    # ---- the one timer loop ------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            self._emit_first_tokens(now)
            if self._decoding and now >= self._next_step_at:
                self._step(now)
            # After the step, so slots of requests that just finished are refilled in the same pass.
            self._admit(loop.time())
            wake_at = self._next_wake_at()
            if wake_at is None or wake_at > loop.time():
                await self._sleep_until(loop, wake_at)

    def _admit(self, now: float) -> None:
        while self._waiting and len(self._running) < self._config.max_batch_size:
            request = self._waiting.popleft()
            prompt_token_ids = request.prompt_token_ids
            block_hashes: list[int] = []
            num_cached_tokens = 0
            if self._cache is not None:
                block_hashes = self._cache.block_hashes(prompt_token_ids)
                num_cached_tokens = self._cache.acquire(request.request_id, block_hashes)
            prefill_s = self.prefill_s(len(prompt_token_ids) - num_cached_tokens)
            running = _Running(
                request_id=request.request_id,
                token_ids=self._allowed_token_ids(request),
                offset=zlib.crc32(repr(prompt_token_ids[-8:]).encode()),
                max_tokens=request.max_tokens,
                prompt_token_ids=prompt_token_ids,
                block_hashes=block_hashes,
                num_cached_tokens=num_cached_tokens,
                first_token_at=now + prefill_s,
            )
            self._running[request.request_id] = running
            self._num_admitted += 1
            heapq.heappush(
                self._prefilling, (running.first_token_at, self._num_admitted, request.request_id)
            )

    def _emit_first_tokens(self, now: float) -> None:
        while self._prefilling and self._prefilling[0][0] <= now:
            first_token_at, _, request_id = heapq.heappop(self._prefilling)
            running = self._running.get(request_id)
            if running is None:
                continue  # cancelled while prefilling
            if self._cache is not None:
                self._cache.store(request_id, running.block_hashes)  # the prompt's KV now exists
            if not self._decoding:
                # An idle engine starts its step clock with this request, so c=1 sees exact TTFT and ITL.
                self._next_step_at = first_token_at + self._itl_s
            self._emit(running, 1, is_first=True)
            if request_id in self._running:
                self._decoding[request_id] = running

    def _step(self, now: float) -> None:
        if self._itl_s > 0:
            num_steps = int((now - self._next_step_at) / self._itl_s) + 1
        else:
            num_steps = max((r.max_tokens for r in self._decoding.values()), default=1)
        self._next_step_at += num_steps * self._itl_s
        for running in list(self._decoding.values()):
            self._emit(running, num_steps, is_first=False)

    def _emit(self, running: _Running, num_tokens: int, *, is_first: bool) -> None:
        num_tokens = min(num_tokens, running.max_tokens - running.num_emitted)
        table = running.token_ids
        start = running.offset + running.num_emitted
        token_ids = [table[(start + i) % len(table)] for i in range(num_tokens)]
        running.num_emitted += num_tokens
        finish = None
        if running.num_emitted >= running.max_tokens:
            finish = FinishReason.LENGTH
            del self._running[running.request_id]
            self._decoding.pop(running.request_id, None)
            self._keep_sequence(running)
        self.deliver(
            running.request_id,
            TokenDelta(
                token_ids=token_ids,
                finish_reason=finish,
                num_prompt_tokens=len(running.prompt_token_ids) if is_first else 0,
                num_cached_tokens=running.num_cached_tokens if is_first else 0,
            ),
        )

    def _keep_sequence(self, running: _Running) -> None:
        """A finished request leaves its prompt and output in the cache: a session's next turn starts there."""
        if self._cache is None:
            return
        sequence = running.prompt_token_ids + running.output_token_ids()
        self._cache.store(
            running.request_id, self._cache.block_hashes(sequence, known=running.block_hashes)
        )
        self._cache.release(running.request_id)

    def _allowed_token_ids(self, request: GenerateRequest) -> list[int]:
        excluded = {seq[0] for seq in request.stop_token_sequences}
        if request.end_id is not None:
            excluded.add(request.end_id)
        if not excluded.intersection(self.token_ids):
            return self.token_ids
        return [token_id for token_id in self.token_ids if token_id not in excluded]

    def _next_wake_at(self) -> float | None:
        candidates = []
        if self._decoding:
            candidates.append(self._next_step_at)
        if self._prefilling:
            candidates.append(self._prefilling[0][0])
        return min(candidates) if candidates else None

    async def _sleep_until(self, loop: asyncio.AbstractEventLoop, wake_at: float | None) -> None:
        """Sleeps until `wake_at` (forever when None) or until `_wake` (a submit or a cancel)."""
        self._wakeup = loop.create_future()
        timer = loop.call_at(wake_at, self._wake) if wake_at is not None else None
        try:
            await self._wakeup
        finally:
            self._wakeup = None
            if timer is not None:
                timer.cancel()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._mark_dead(f"the emulator loop failed: {task.exception()!r}")
