"""Double of `tensorrt_llm/executor/result.py`: `GenerationResult`, `CompletionOutput`,
`IterationResult`, as read at NVIDIA/TensorRT-LLM tensorrt_llm/executor/result.py@a678b91a
(`Logprob`, `CompletionOutput`, `GenerationResultBase`; `_handle_sequence` with the PyTorch-backend
branch "each streamed response_tensors.log_probs[src_idx] contains a streamwise monotonically
growing list of logprobs").

Streaming semantics kept: every response extends `outputs[0].token_ids` and moves the
`_last_*_len` cursors, so `token_ids_diff` / `logprobs_diff` are the new part; the final response
maps FinishReason END_ID and STOP_WORDS to "stop" (with `stop_reason` the stop token id for
STOP_WORDS, whose ids are cut from `token_ids` unless `include_stop_str_in_output`), LENGTH to
"length", TIMED_OUT to "timeout", CANCELLED to "cancelled". An error response raises
`RequestError` from the iteration. `abort()` asks the executor to cancel the request; the final
response then arrives with "cancelled".
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tensorrt_llm.bindings import executor as tllm

from ..sampling_params import SamplingParams
from .utils import RequestError


@dataclass(slots=True)
class Logprob:
    """Holds logprob and vocab rank for a token."""

    logprob: float
    rank: int | None = None


TokenLogprobs = list[dict[int, Logprob]]


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[Any] = field(default_factory=list)
    prompt_logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    generation_logits: Any = None
    disaggregated_params: Any = None
    request_perf_metrics: Any = None
    _last_text_len: int = field(default=0, init=False, repr=False)
    _last_token_ids_len: int = field(default=0, init=False, repr=False)
    _last_logprobs_len: int = field(default=0, init=False, repr=False)

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def text_diff(self) -> str:
        return self.text[self._last_text_len :]

    @property
    def token_ids_diff(self) -> list[int]:
        return self.token_ids[self._last_token_ids_len :]

    @property
    def logprobs_diff(self) -> list[Any]:
        return self.logprobs[self._last_logprobs_len :]


class GenerationResult:
    """One request's stream; iterate it with `async for` (each step returns the result itself)."""

    # True where `log_probs` come as TokenLogprobs dicts (the LLM API's PyTorch backend).
    _token_logprobs = False

    def __init__(
        self,
        request_id: int,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        *,
        streaming: bool,
        loop: asyncio.AbstractEventLoop,
        abort: Callable[[int], None],
    ) -> None:
        self._request_id = request_id
        self._prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self._streaming = streaming
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._abort = abort
        self._aborted = False
        self._done = False
        self._outputs = [CompletionOutput(i) for i in range(sampling_params.best_of or 1)]
        # Prompt tokens the engine reused, from the PyTorch backend's `LlmResult.cached_tokens`
        # (result.py@a678b91a: `self.cached_tokens = getattr(response_result, 'cached_tokens', 0)`).
        self.cached_tokens = 0

    # ---- what callers use --------------------------------------------------------------------------
    @property
    def request_id(self) -> int:
        return self._request_id

    @property
    def prompt_token_ids(self) -> list[int]:
        return self._prompt_token_ids

    @property
    def outputs(self) -> list[CompletionOutput]:
        return self._outputs[: self.sampling_params.n]

    @property
    def finished(self) -> bool:
        return self._done

    def abort(self) -> None:
        """Abort the generation request."""
        self._abort(self._request_id)
        self._aborted = True

    def aborted(self) -> bool:
        return self._aborted

    def __aiter__(self) -> GenerationResult:
        return self

    async def __anext__(self) -> GenerationResult:
        if self._done:
            raise StopAsyncIteration
        self._handle_response(await self._queue.get())
        return self

    async def aresult(self) -> GenerationResult:
        while not self._done:
            self._handle_response(await self._queue.get())
        return self

    def __await__(self) -> Any:
        return self.aresult().__await__()

    # ---- the executor side -------------------------------------------------------------------------
    def _enqueue_threadsafe(self, response: Any) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, response)

    def _handle_response(self, response: Any) -> None:
        if isinstance(response, BaseException):
            self._done = True
            raise response
        if response.has_error():
            self._done = True
            raise RequestError(response.error_msg)
        result = response.result
        self._done = result.is_final
        self.cached_tokens = getattr(result, "cached_tokens", 0)
        self._handle_sequence(result)

    def _handle_sequence(self, result: Any) -> None:
        output = self._outputs[result.sequence_index]
        if result.request_perf_metrics is not None:
            output.request_perf_metrics = result.request_perf_metrics
        output._last_token_ids_len = len(output.token_ids)
        output.token_ids.extend(result.output_token_ids[0])
        if result.cum_log_probs is not None:
            output.cumulative_logprob = result.cum_log_probs[0]
        if result.log_probs is not None:
            output._last_logprobs_len = len(output.logprobs)
            new = result.log_probs[0][output._last_logprobs_len :]
            if self._token_logprobs:
                # PyTorch backend: `LlmResult.log_probs` is `LogProbStorage.log_probs`, a
                # `list[TokenLogprobs]`: one `{token_id: Logprob}` per generated token, the
                # sampled token first (_torch/pyexecutor/llm_request.py@06517d23 sums
                # `next(iter(prob.values())).logprob` into cum_log_probs). The double's model is
                # greedy, so the sampled token is the top one: rank 1.
                start = output._last_logprobs_len
                tokens = output.token_ids[start : start + len(new)]
                new = [{t: Logprob(float(lp), rank=1)} for t, lp in zip(tokens, new, strict=False)]
            output.logprobs += new
            if result.finish_reasons[0] != tllm.FinishReason.CANCELLED:
                if len(output.logprobs) > output.length:
                    output.logprobs = output.logprobs[: output.length]
        reason = result.finish_reasons[0]
        if reason == tllm.FinishReason.CANCELLED:
            output.finish_reason = "cancelled"
        if not self._done:
            return
        if reason == tllm.FinishReason.END_ID:
            output.finish_reason = "stop"
        elif reason == tllm.FinishReason.STOP_WORDS:
            output.finish_reason = "stop"
            for stop_reason, stop_ids in self.sampling_params._get_stop_reasons_and_words():
                if output.token_ids[-len(stop_ids) :] == stop_ids:
                    output.stop_reason = stop_reason
                    if not self.sampling_params.include_stop_str_in_output:
                        output.token_ids = output.token_ids[: -len(stop_ids)]
                    break
        elif reason == tllm.FinishReason.LENGTH:
            output.finish_reason = "length"
        elif reason == tllm.FinishReason.TIMED_OUT:
            output.finish_reason = "timeout"
        elif reason != tllm.FinishReason.CANCELLED:
            raise ValueError(f"Unknown finish reason: {reason}")


class IterationResult:
    """Runtime results (stats or KV events, JSON strings) drained with `async for`.

    As in result.py: `__anext__` waits up to the timeout for the next item and ends the iteration
    when none comes; the executor calls `mark_undone` when new requests are submitted.
    """

    def __init__(self) -> None:
        self._done = False
        self._timeout = 2.0
        self._queue: asyncio.Queue[str] | None = None

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._queue is None:
            self._loop = loop
            self._queue = asyncio.Queue()

    def _put_threadsafe(self, data: str) -> None:
        if self._queue is not None:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, data)

    def set_timeout(self, timeout: float) -> None:
        self._timeout = timeout

    def mark_undone(self) -> None:
        self._done = False

    def __aiter__(self) -> IterationResult:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._done or self._queue is None:
            raise StopAsyncIteration
        try:
            data = await asyncio.wait_for(self._queue.get(), self._timeout)
        except TimeoutError:
            self._done = True
            raise StopAsyncIteration from None
        loaded: dict[str, Any] = json.loads(data)
        return loaded
