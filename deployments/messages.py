"""The router<->engine contract: requests and deltas carry token ids, never text."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Literal

_SAMPLING_EPS = 1e-5


class FinishReason(str, enum.Enum):
    """Why a request stopped, mirroring TensorRT-LLM's `FinishReason` (END_ID, STOP_WORDS, LENGTH, CANCELLED)."""

    END_ID = "end_id"
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling; `temperature == 0` means greedy, `top_k == 0` and `top_p == 1` disable those filters."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    # (token id, bias) pairs added to the logits before sampling (OpenAI's `logit_bias`, sorted by id).
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def is_greedy(self) -> bool:
        # Temperatures below vLLM's sampling epsilon mean greedy: dividing logits by a subnormal gives inf,
        # and one such request would poison the whole batch's sampling step.
        return self.temperature < _SAMPLING_EPS or self.top_k == 1


GuidedDecodingKind = Literal["json_object", "json_schema", "regex", "lark"]
GUIDED_DECODING_KINDS: tuple[GuidedDecodingKind, ...] = (
    "json_object",
    "json_schema",
    "regex",
    "lark",
)


@dataclass(frozen=True, slots=True)
class GuidedDecodingSpec:
    """What the output must match: a JSON object (`grammar` empty), a JSON Schema, a regular expression, or a
    Lark grammar in llguidance's dialect (`%json{...}` embeds a schema, `<[id]>` names a token). The router
    validated it; engines compile it with their grammar backend (TensorRT-LLM's `GuidedDecodingParams`)."""

    kind: GuidedDecodingKind
    grammar: str = ""


@dataclass(frozen=True, slots=True)
class RetentionRange:
    """A prompt token range the engine should keep in its KV cache longer (TensorRT-LLM retention priority)."""

    start: int
    end: int
    priority: int = 100


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """One generation request as the engine sees it.

    `end_id` ends the request (finish END_ID); each of `stop_token_sequences` ends it with finish STOP.
    Neither the end id nor a matched stop sequence is ever part of the returned token ids.
    """

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    end_id: int | None = None
    pad_id: int | None = None
    stop_token_sequences: tuple[tuple[int, ...], ...] = ()
    return_logprobs: bool = False
    session_id: str | None = None
    retention: RetentionRange | None = None
    # With `return_logprobs`: also the most likely tokens at each step, with their logprobs (at most 20).
    num_top_logprobs: int = 0
    guided_decoding: GuidedDecodingSpec | None = None


@dataclass(slots=True)
class TokenDelta:
    """New tokens since the previous delta of the same request; the last delta has a `finish_reason`.

    `logprobs` are the sampled tokens' (model distribution, before penalties and temperature); `top_logprobs`
    hold, per token, the `num_top_logprobs` most likely (token id, logprob) pairs, most likely first.
    """

    token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[float] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV the engine reused (first delta only)
    top_logprobs: list[list[tuple[int, float]]] | None = None

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None

    def merge(self, later: TokenDelta) -> None:
        """Append a later delta to this one (used when the consumer lags behind the engine)."""
        self.token_ids.extend(later.token_ids)
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        if later.top_logprobs is not None:
            self.top_logprobs = (self.top_logprobs or []) + later.top_logprobs
        self.finish_reason = later.finish_reason
        self.num_prompt_tokens = self.num_prompt_tokens or later.num_prompt_tokens
        self.num_cached_tokens = self.num_cached_tokens or later.num_cached_tokens


@dataclass(frozen=True, slots=True)
class EngineCapabilities:
    """What an executor can honour; the router rejects requests asking for more with a 400."""

    # False: greedy only (temperature, top_p and top_k cannot be set).
    supports_sampling: bool = True
    supports_seed: bool = False
    supports_penalties: bool = False
    supports_min_tokens: bool = False
    supports_logprobs: bool = False
    supports_logit_bias: bool = False
    # Up to how many most likely tokens per step (`top_logprobs`); 0: only the sampled token's logprob.
    max_top_logprobs: int = 0
    # The guided-decoding kinds the engine enforces (none: `response_format`, forced tool calls and
    # `structured_outputs` get a 400).
    guided_decoding_kinds: tuple[GuidedDecodingKind, ...] = ()
    # Appended to the 400 for what this engine cannot do (the setting that would enable it).
    unsupported_hint: str = ""


@dataclass(frozen=True, slots=True)
class ExecutorStats:
    """A snapshot of one executor's counters (exported as metrics and routing stats)."""

    num_active_requests: int
    num_queued_requests: int
    num_submitted_requests: int
    num_finished_requests: int
    num_cancelled_requests: int
    num_generated_tokens: int
    kv_cache_usage: float | None = None
    prefix_cache_hit_rate: float | None = None
    # Prompt tokens whose KV was reused / computed since start (None: the engine does not say).
    num_cached_prompt_tokens: int | None = None
    num_uncached_prompt_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class EngineStats:
    """One Engine replica as an operator sees it (`Engine.stats`): its executor and its direct channel."""

    replica_id: str
    executor: ExecutorStats
    channel_address: str | None
    num_channel_streams_served: int
    num_channel_streams_active: int


class DeltaCollector:
    """A one-slot mailbox per request: deltas merge while the consumer lags, so memory stays bounded
    and the consumer always receives everything ready in one item (no batching timer).

    After the first item, the consumer is woken only once `stream_interval_tokens` tokens are waiting
    (vLLM's and TensorRT-LLM's stream interval; a count, never a timer), or on the final delta or an error.
    Every item crossing a process hop costs CPU on both sides, so fewer, larger items raise the tokens/s a
    replica sustains. Both ends use it: the executor per request, and the router per channel stream.
    """

    __slots__ = ("_error", "_event", "_interval", "_pending", "_threshold")

    def __init__(self, stream_interval_tokens: int = 1) -> None:
        self._pending: TokenDelta | None = None
        self._error: BaseException | None = None
        self._event = asyncio.Event()
        self._interval = stream_interval_tokens
        self._threshold = 1  # the first token goes at once: TTFT does not change

    def put(self, delta: TokenDelta) -> None:
        if self._pending is None:
            self._pending = delta
        else:
            self._pending.merge(delta)
        if self._pending.is_final or len(self._pending.token_ids) >= self._threshold:
            self._event.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._event.set()

    async def get(self) -> TokenDelta:
        await self._event.wait()
        # An error stays signalled: the delta that arrived before it is returned first, then the error.
        if self._error is None:
            self._event.clear()
        if self._pending is not None:
            delta, self._pending = self._pending, None
            self._threshold = self._interval
            return delta
        assert self._error is not None
        raise self._error
