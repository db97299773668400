"""One request's trip through the engine: token deltas in, detokenized text events out (router side)."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from deployments.detokenizer import IncrementalDetokenizer
from deployments.errors import EngineError, ServingError
from deployments.messages import FinishReason, GenerateRequest, TokenDelta

if TYPE_CHECKING:
    from deployments.metrics import RequestMetrics
    from deployments.transport.client import EngineClient, EngineStream

logger = logging.getLogger(__name__)

OpenAIFinish = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class TextEvent:
    """Text that became safe to send; the last event carries the finish reason."""

    text: str
    finish_reason: OpenAIFinish | None = None


def _serving_error(error: Exception) -> ServingError:
    # Both engine paths raise our errors already (transport/); anything else is a bug worth naming.
    if isinstance(error, ServingError):
        return error
    return EngineError(f"the engine failed: {type(error).__name__}: {error}")


class Generation:
    """Streams one `GenerateRequest` from an engine replica (`EngineClient`: direct channel or Serve handle).

    `start()` awaits the first delta before any byte is sent, so early failures still get a real HTTP status.
    A stop string ends the engine request at once (cancelling the handle call frees the engine slot).
    """

    def __init__(
        self,
        engine: EngineClient,
        request: GenerateRequest,
        tokenizer: Any,
        *,
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
        observer: RequestMetrics | None = None,
    ) -> None:
        self.request = request
        self._engine = engine
        self._observer = observer
        self._detokenizer = IncrementalDetokenizer(
            tokenizer,
            stop=stop,
            prompt_token_ids=request.prompt_token_ids,
            skip_special_tokens=skip_special_tokens,
        )
        self._stream: EngineStream | None = None
        self._first: TokenDelta | None = None
        self._is_done = False
        self.completion_token_ids: list[int] = []
        # Prompt tokens whose KV the engine reused, as its first delta reports them.
        self.num_cached_tokens = 0
        self.logprobs: list[float] = []
        # Per token, the most likely (token id, logprob) pairs, when the request asked for them.
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self._num_logprobs_taken = 0
        self.text = ""
        self.is_finished = False
        self.is_stopped_by_string = False

    @property
    def num_completion_tokens(self) -> int:
        return len(self.completion_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    async def start(self) -> None:
        try:
            self._stream = await self._engine.open(self.request)
            self._first = await self._stream.__anext__()
        except StopAsyncIteration:
            raise EngineError("the engine closed the stream without a result") from None
        except BaseException as error:
            if self._stream is not None:
                self._stream.cancel()  # cancelled or failed before the first token: free the engine slot
            self._is_done = True
            self._finish("error")
            if isinstance(error, Exception):
                raise _serving_error(error) from error
            raise

    async def events(self) -> AsyncGenerator[TextEvent, None]:
        """Yields text events; the last one has `finish_reason`. Raises ServingError on engine failure."""
        assert self._first is not None, "start() first"
        delta: TokenDelta | None = self._first
        try:
            while delta is not None:
                event = self._consume(delta)
                if event is not None:
                    yield event
                if self._is_done:
                    return
                delta = await self._next_delta()
        finally:
            self.close()

    def close(self) -> None:
        """Cancel the engine call unless it already finished (client gone, stop string, error)."""
        if not self._is_done and self._stream is not None:
            self._is_done = True
            self._finish("cancelled")
            self._stream.cancel()

    async def _next_delta(self) -> TokenDelta | None:
        assert self._stream is not None
        try:
            delta: TokenDelta = await self._stream.__anext__()
            return delta
        except StopAsyncIteration:
            raise EngineError("the engine stream ended without a finish reason") from None
        except Exception as error:
            self._is_done = True
            self._finish("error")
            raise _serving_error(error) from error

    def _finish(self, finish_reason: str) -> None:
        if self._observer is not None:
            self._observer.on_finish(
                finish_reason,
                num_prompt_tokens=self.num_prompt_tokens,
                num_completion_tokens=self.num_completion_tokens,
                num_cached_tokens=self.num_cached_tokens,
            )

    def take_logprobs(self) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """(token id, logprob, most likely alternatives) not taken yet: streamed chunks carry those of their
        own tokens. The alternatives are empty unless the request asked for `num_top_logprobs`."""
        start, end = self._num_logprobs_taken, len(self.logprobs)
        self._num_logprobs_taken = end
        tops = self.top_logprobs[start:end]
        tops += [[] for _ in range(end - start - len(tops))]
        return list(
            zip(self.completion_token_ids[start:end], self.logprobs[start:end], tops, strict=True)
        )

    def _consume(self, delta: TokenDelta) -> TextEvent | None:
        self.completion_token_ids.extend(delta.token_ids)
        self.num_cached_tokens = self.num_cached_tokens or delta.num_cached_tokens
        if self._observer is not None:
            self._observer.on_tokens(len(delta.token_ids))
        if delta.logprobs is not None:
            self.logprobs.extend(delta.logprobs)
        if delta.top_logprobs is not None:
            self.top_logprobs.extend(delta.top_logprobs)
        text = self._detokenizer.feed(delta.token_ids)
        if self._detokenizer.is_stopped:
            self._finish("stop")
            self.close()
            self.is_finished = self.is_stopped_by_string = True
            self.text += text
            return TextEvent(text, "stop")
        if delta.finish_reason is not None:
            self._is_done = True
            text += self._detokenizer.flush()
            self.text += text
            if delta.finish_reason is FinishReason.CANCELLED:
                self._finish("error")
                raise EngineError("the engine cancelled the request")
            self.is_finished = True
            finish: OpenAIFinish = (
                "length" if delta.finish_reason is FinishReason.LENGTH else "stop"
            )
            self._finish(finish)
            return TextEvent(text, finish)
        self.text += text
        return TextEvent(text) if text else None
