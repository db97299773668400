"""The Executor contract every engine backend meets, and the one place engine threads cross into asyncio."""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import logging
from collections.abc import AsyncGenerator, Iterable

from deployments.errors import EngineDead, EngineError
from deployments.messages import (
    DeltaCollector,
    EngineCapabilities,
    ExecutorStats,
    GenerateRequest,
    TokenDelta,
)

logger = logging.getLogger(__name__)


class StopSequenceMatcher:
    """Holds back tokens that could begin a stop sequence, so a matched sequence never reaches the client.

    Used by backends whose engine cannot stop on token sequences itself (transformers CB).
    """

    __slots__ = ("_held", "_sequences")

    def __init__(self, sequences: Iterable[tuple[int, ...]]) -> None:
        self._sequences = [tuple(s) for s in sequences if s]
        self._held: list[int] = []

    def feed(self, token_ids: list[int]) -> tuple[list[int], bool]:
        """Returns (tokens safe to emit, whether a stop sequence matched)."""
        if not self._sequences:
            return token_ids, False
        emitted: list[int] = []
        for token_id in token_ids:
            self._held.append(token_id)
            for seq in self._sequences:
                if len(self._held) >= len(seq) and tuple(self._held[-len(seq) :]) == seq:
                    emitted.extend(self._held[: -len(seq)])
                    self._held = []
                    return emitted, True
            keep = self._longest_prefix_suffix()
            if keep < len(self._held):
                cut = len(self._held) - keep
                emitted.extend(self._held[:cut])
                self._held = self._held[cut:]
        return emitted, False

    def flush(self) -> list[int]:
        held, self._held = self._held, []
        return held

    def _longest_prefix_suffix(self) -> int:
        """Length of the longest tail of the held tokens that is a proper prefix of some stop sequence."""
        best = 0
        for seq in self._sequences:
            for n in range(min(len(seq) - 1, len(self._held)), best, -1):
                if tuple(self._held[-n:]) == seq[:n]:
                    best = n
                    break
        return best


class Executor(abc.ABC):
    """An engine that turns `GenerateRequest`s into streams of `TokenDelta`s.

    Subclasses implement `_submit` and `_cancel`; engine threads hand results over with `deliver_threadsafe`
    (or `deliver` when already on the loop). `generate` is the only entry point callers use.
    Threading: every public method runs on the replica's event loop.
    """

    capabilities = EngineCapabilities()
    # True: each request's first delta says how many prompt tokens the engine found in its prefix cache,
    # and `stats` reports the totals and the hit rate from them.
    reports_cached_tokens = False

    def __init__(self) -> None:
        self._collectors: dict[str, DeltaCollector] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead_reason: str | None = None
        self._num_submitted = 0
        self._num_finished = 0
        self._num_cancelled = 0
        self._num_generated_tokens = 0
        self._num_prompt_tokens = 0
        self._num_cached_prompt_tokens = 0

    # ---- contract --------------------------------------------------------------------------------
    @abc.abstractmethod
    def _submit(self, request: GenerateRequest) -> None:
        """Hand the request to the engine; must not block the loop."""

    @abc.abstractmethod
    def _cancel(self, request_id: str) -> None:
        """Ask the engine to stop a request; the final CANCELLED delta may come from the engine or not at all."""

    async def start(self) -> None:
        """Bind to the running loop; subclasses extend this to start their threads."""
        self._loop = asyncio.get_running_loop()

    async def shutdown(self) -> None:
        """Stop the engine; pending requests fail with EngineDead."""
        self._mark_dead("executor shut down", is_failure=False)

    def queue_depth(self) -> int:
        return 0

    # ---- what callers use ------------------------------------------------------------------------
    async def generate(
        self, request: GenerateRequest, *, stream_interval_tokens: int = 1
    ) -> AsyncGenerator[TokenDelta, None]:
        """Submit `request` and yield its deltas until one carries a finish reason.

        Yields:
            TokenDelta with only new tokens; everything ready is merged into one delta, and after the
            first one a delta waits for `stream_interval_tokens` tokens (or the finish, or an error).
        Raises:
            EngineDead: the engine stopped; EngineError: the engine failed this request.
        A cancelled or closed consumer cancels the engine request.
        """
        if self._dead_reason is not None:
            raise EngineDead(self._dead_reason)
        if request.request_id in self._collectors:
            raise EngineError(f"duplicate request id {request.request_id!r}")
        collector = DeltaCollector(stream_interval_tokens)
        self._collectors[request.request_id] = collector
        self._num_submitted += 1
        is_finished = False
        try:
            self._submit(request)
            while not is_finished:
                delta = await collector.get()
                self._num_generated_tokens += len(delta.token_ids)
                if delta.num_prompt_tokens:  # the first delta
                    self._num_prompt_tokens += delta.num_prompt_tokens
                    self._num_cached_prompt_tokens += delta.num_cached_tokens
                is_finished = delta.is_final
                yield delta
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away: free the engine slot, then let cancellation propagate.
            if not is_finished:
                self._num_cancelled += 1
                self._cancel(request.request_id)
            raise
        finally:
            self._collectors.pop(request.request_id, None)
            if is_finished:
                self._num_finished += 1

    def stats(self) -> ExecutorStats:
        stats = ExecutorStats(
            num_active_requests=len(self._collectors),
            num_queued_requests=self.queue_depth(),
            num_submitted_requests=self._num_submitted,
            num_finished_requests=self._num_finished,
            num_cancelled_requests=self._num_cancelled,
            num_generated_tokens=self._num_generated_tokens,
        )
        if not self.reports_cached_tokens:
            return stats
        cached, total = self._num_cached_prompt_tokens, self._num_prompt_tokens
        return dataclasses.replace(
            stats,
            prefix_cache_hit_rate=cached / total if total else None,
            num_cached_prompt_tokens=cached,
            num_uncached_prompt_tokens=total - cached,
        )

    def check_health(self) -> None:
        """Raises EngineDead once the engine can no longer serve."""
        if self._dead_reason is not None:
            raise EngineDead(self._dead_reason)

    # ---- for subclasses: handing results over ------------------------------------------------------
    def deliver(self, request_id: str, delta: TokenDelta) -> None:
        """On the loop: route a delta to its request (late deltas for finished requests are dropped)."""
        collector = self._collectors.get(request_id)
        if collector is not None:
            collector.put(delta)

    def fail(self, request_id: str, error: BaseException) -> None:
        collector = self._collectors.get(request_id)
        if collector is not None:
            collector.fail(error)

    def deliver_threadsafe(self, batch: list[tuple[str, TokenDelta | BaseException]]) -> None:
        """From an engine thread: one loop wake-up per batch of responses."""
        assert self._loop is not None, "start() was not awaited"
        self._loop.call_soon_threadsafe(self._deliver_batch, batch)

    def mark_dead_threadsafe(self, reason: str) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._mark_dead, reason)

    def _deliver_batch(self, batch: list[tuple[str, TokenDelta | BaseException]]) -> None:
        for request_id, item in batch:
            if isinstance(item, BaseException):
                self.fail(request_id, item)
            else:
                self.deliver(request_id, item)

    def _mark_dead(self, reason: str, *, is_failure: bool = True) -> None:
        if self._dead_reason is None:
            # A shutdown that was asked for is not an error: it ends every executor's life.
            logger.log(
                logging.ERROR if is_failure else logging.INFO, "executor is dead: %s", reason
            )
            self._dead_reason = reason
        for collector in list(self._collectors.values()):
            collector.fail(EngineDead(reason))

    @property
    def is_dead(self) -> bool:
        return self._dead_reason is not None
