"""One engine replica in virtual time: a step model of in-flight batching around the emulator's prefix cache,
with step costs fit to TensorRT-LLM's published figures (used by `routing_sim.py`)."""

from __future__ import annotations

import collections
from dataclasses import dataclass

from deployments.executors.emulator import PUBLISHED_PREFILL_TOKENS_PER_S
from deployments.executors.prefix_cache import PrefixCache

# TensorRT-LLM's published throughput, H100 FP8, LLaMA 7B, TP1 ("Peak Throughput", table "H100 GPUs (FP8)" of
# docs/source/performance.md, v0.6.1 data): (batch size, input tokens, output tokens, output tokens/s).
PUBLISHED_H100_THROUGHPUT = (
    (112, 128, 2048, 6818),  # fits the decode costs
    (48, 2048, 2048, 2740),  # fits the decode costs
    (80, 2048, 128, 2244),  # checks the fit (predicted 0.94x)
    (768, 128, 128, 19694),  # checks the fit (predicted 1.01x)
)
_H200_BANDWIDTH_GAIN = 4.8 / 3.35  # HBM3e vs HBM3, TB/s


@dataclass(frozen=True)
class StepCost:
    """One engine step takes overhead + prefill tokens * per token + per decoding sequence (a fixed part, and
    a part per token of its context: reading its KV).

    Calibrated on TensorRT-LLM's published figures for an H100, FP8, LLaMA 7B, TP1 (docs/source/performance.md,
    https://github.com/NVIDIA/TensorRT-LLM/blob/77d24b5fa178f11ed7fafdd9833b7245e075f721/docs/source/performance.md):
    - "Low Latency", table "H100 GPUs (FP8)": the first token at batch 1 takes 7 ms for 128 input tokens and
      36 ms for 2048, so 15.1 us per prompt token (`PUBLISHED_PREFILL_TOKENS_PER_S`) and 5.07 ms per step;
    - "Peak Throughput", table "H100 GPUs (FP8)": two decode-heavy rows fit the per-sequence costs (14 us,
      and 75 ns per context token, which is an FP8 7B model's 256 KiB of KV per token at 3.35 TB/s); the two
      other rows are then predicted within 7 % (`predicted_throughput`).
    An H200 prefills as fast as an H100 (compute bound) and gains its 1.43x memory bandwidth on the rest, per
    TensorRT-LLM's H200 launch blog ("First token latency is compute bound", 4.8 TB/s; https://github.com/
    NVIDIA/TensorRT-LLM/blob/1555478c1b417a0b34de05209862ea5a2ab9add1/docs/source/blogs/H200launch.md).
    """

    overhead_s: float
    prefill_s_per_token: float
    decode_s_per_sequence: float
    decode_s_per_context_token: float

    @classmethod
    def published(cls, gpu: str = "h200") -> StepCost:
        prefill_s_per_token = 1 / PUBLISHED_PREFILL_TOKENS_PER_S
        overhead_s = 0.007 - 128 * prefill_s_per_token
        # Each row's time is linear in the two decode costs: solve the 2x2 system (Cramer's rule).
        rows = []
        for batch, num_in, num_out, tokens_per_s in PUBLISHED_H100_THROUGHPUT[:2]:
            num_steps = num_out - 1
            known_s = batch * num_in * prefill_s_per_token + num_out * overhead_s
            context = num_steps * num_in + num_out * num_steps / 2
            rows.append(
                (batch * num_steps, batch * context, batch * num_out / tokens_per_s - known_s)
            )
        (a1, b1, c1), (a2, b2, c2) = rows
        determinant = a1 * b2 - a2 * b1
        per_sequence = (c1 * b2 - c2 * b1) / determinant
        per_context_token = (a1 * c2 - a2 * c1) / determinant
        if gpu == "h100":
            return cls(overhead_s, prefill_s_per_token, per_sequence, per_context_token)
        if gpu == "h200":
            gain = _H200_BANDWIDTH_GAIN
            return cls(
                overhead_s / gain,
                prefill_s_per_token,
                per_sequence / gain,
                per_context_token / gain,
            )
        raise ValueError(f"unknown gpu {gpu!r}: h100 or h200")

    def step_s(self, num_prefill_tokens: int, num_decoding: int, num_context_tokens: int) -> float:
        """A step's time; `num_context_tokens` sums the decoding sequences' lengths."""
        return (
            self.overhead_s
            + num_prefill_tokens * self.prefill_s_per_token
            + num_decoding * self.decode_s_per_sequence
            + num_context_tokens * self.decode_s_per_context_token
        )

    def predicted_throughput(
        self, batch_size: int, num_input_tokens: int, num_output_tokens: int
    ) -> float:
        """Output tokens/s of one batch that prefills, then decodes together (the published setup)."""
        total_s = self.step_s(batch_size * num_input_tokens, 0, 0)
        for step in range(1, num_output_tokens):
            total_s += self.step_s(0, batch_size, batch_size * (num_input_tokens + step))
        return batch_size * num_output_tokens / total_s


@dataclass(slots=True)
class SimRequest:
    """One turn of one session, from the router's arrival to its last token."""

    request_id: str
    session_index: int
    turn: int
    prompt_token_ids: list[int]
    block_hashes: list[int]  # the prompt's cache keys
    output_token_ids: list[int]
    arrival_s: float
    num_reusable_tokens: int  # what the session computed before: the most any policy can hit
    replica_id: str = ""
    num_cached_tokens: int = 0
    num_prefill_left: int = 0
    num_decoded: int = 0
    first_token_s: float = -1.0
    finish_s: float = -1.0


class EngineModel:
    """One replica: FIFO admission up to `max_batch_size`, then steps that give every decoding request one
    token and spend the rest of `max_num_tokens` on the uncached prompt tokens of prefilling requests in
    admission order (chunked prefill); a request's first token comes at the end of the step that finishes
    its prefill. Cached prompt tokens cost nothing.

    Decode-only steps run as one event until the first request would finish (each step one context token
    longer per sequence than the last); a request arriving meanwhile cuts that run at the end of the step in
    progress (`interrupt`), so timings equal stepping one step at a time.
    """

    def __init__(
        self,
        replica_id: str,
        cache: PrefixCache,
        cost: StepCost,
        *,
        max_batch_size: int,
        max_num_tokens: int,
        is_step_by_step: bool = False,
    ) -> None:
        self.replica_id = replica_id
        self.cache = cache
        self._cost = cost
        self._max_batch_size = max_batch_size
        self._max_num_tokens = max_num_tokens
        self._is_step_by_step = is_step_by_step
        self.waiting: collections.deque[SimRequest] = collections.deque()
        self.running: list[SimRequest] = []
        self.is_stepping = False
        self.busy_s = 0.0
        self.num_served = 0
        self.num_steps = 0
        self.version = 0  # bumped when a planned run of steps is cut: its end event is stale
        self._chunks: list[tuple[SimRequest, int]] = []
        self._decoding: list[SimRequest] = []
        self._run_steps = 0
        self._run_start_s = 0.0
        self._first_step_s = 0.0
        self._step_growth_s = 0.0  # each further step of the run takes this much longer

    @property
    def num_ongoing_requests(self) -> int:
        """What the router sees: requests sent and not finished, queued or running."""
        return len(self.waiting) + len(self.running)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def submit(self, request: SimRequest) -> None:
        request.replica_id = self.replica_id
        self.waiting.append(request)
        self.num_served += 1

    def start_step(self, now: float) -> float:
        """Plans the next step (or run of identical decode steps) from `now`; returns when it ends."""
        while self.waiting and len(self.running) < self._max_batch_size:
            request = self.waiting.popleft()
            request.num_cached_tokens = self.cache.acquire(request.request_id, request.block_hashes)
            request.num_prefill_left = len(request.prompt_token_ids) - request.num_cached_tokens
            self.running.append(request)
        decoding = [r for r in self.running if r.num_prefill_left == 0]
        budget = self._max_num_tokens - len(decoding)
        chunks: list[tuple[SimRequest, int]] = []
        for request in self.running:
            if budget <= 0:
                break
            if request.num_prefill_left > 0:
                chunk = min(request.num_prefill_left, budget)
                chunks.append((request, chunk))
                budget -= chunk
        self._chunks, self._decoding = chunks, decoding
        self._run_steps = 1
        if not chunks and not self.waiting and not self._is_step_by_step:
            self._run_steps = min(len(r.output_token_ids) - r.num_decoded for r in decoding)
        num_context_tokens = sum(len(r.prompt_token_ids) + r.num_decoded for r in decoding)
        self._first_step_s = self._cost.step_s(
            sum(n for _, n in chunks), len(decoding), num_context_tokens
        )
        self._step_growth_s = len(decoding) * self._cost.decode_s_per_context_token
        self._run_start_s = now
        self.is_stepping = True
        return self._run_end_s(self._run_steps)

    def _run_end_s(self, num_steps: int) -> float:
        growth = self._step_growth_s * num_steps * (num_steps - 1) / 2
        return self._run_start_s + num_steps * self._first_step_s + growth

    def interrupt(self, now: float) -> float | None:
        """A request arrived during a run of decode steps: end the run with the step in progress.
        Returns the run's new end, or None when it ends as planned."""
        low, high = 1, self._run_steps
        while low < high:  # the first step that ends at or after `now`
            middle = (low + high) // 2
            if self._run_end_s(middle) >= now:
                high = middle
            else:
                low = middle + 1
        if low == self._run_steps:
            return None
        self._run_steps = low
        self.version += 1
        return self._run_end_s(low)

    def end_step(self, now: float) -> list[SimRequest]:
        """Applies the planned step(s) at their end; returns the requests that finished."""
        self.is_stepping = False
        self.num_steps += self._run_steps
        self.busy_s += self._run_end_s(self._run_steps) - self._run_start_s
        finished: list[SimRequest] = []
        for request in self._decoding:
            request.num_decoded += self._run_steps
            if request.num_decoded >= len(request.output_token_ids):
                finished.append(request)
        for request, chunk in self._chunks:
            request.num_prefill_left -= chunk
            if request.num_prefill_left == 0:
                request.first_token_s = now
                request.num_decoded = 1
                self.cache.store(request.request_id, request.block_hashes)
                if request.num_decoded >= len(request.output_token_ids):
                    finished.append(request)
        for request in finished:
            request.finish_s = now
            sequence = request.prompt_token_ids + request.output_token_ids
            self.cache.store(
                request.request_id, self.cache.block_hashes(sequence, known=request.block_hashes)
            )
            self.cache.release(request.request_id)
        if finished:
            done = {id(r) for r in finished}
            self.running = [r for r in self.running if id(r) not in done]
        return finished
