"""The router<->engine contract: requests and deltas carry token ids, never text."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

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

    @property
    def is_greedy(self) -> bool:
        # Temperatures below vLLM's sampling epsilon mean greedy: dividing logits by a subnormal gives inf,
        # and one such request would poison the whole batch's sampling step.
        return self.temperature < _SAMPLING_EPS or self.top_k == 1


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


@dataclass(slots=True)
class TokenDelta:
    """New tokens since the previous delta of the same request; the last delta has a `finish_reason`."""

    token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[float] | None = None
    num_prompt_tokens: int = 0

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None

    def merge(self, later: TokenDelta) -> None:
        """Append a later delta to this one (used when the consumer lags behind the engine)."""
        self.token_ids.extend(later.token_ids)
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        self.finish_reason = later.finish_reason
        self.num_prompt_tokens = self.num_prompt_tokens or later.num_prompt_tokens


@dataclass(frozen=True, slots=True)
class EngineCapabilities:
    """What an executor can honour; the router rejects requests asking for more with a 400."""

    # False: greedy only (temperature, top_p and top_k cannot be set).
    supports_sampling: bool = True
    supports_seed: bool = False
    supports_penalties: bool = False
    supports_min_tokens: bool = False
    supports_logprobs: bool = False


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
