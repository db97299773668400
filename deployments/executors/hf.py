"""Transformers continuous batching behind the Executor contract (the embedded default and GPU benchmark engine)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from deployments.config import TransformersEngineConfig
from deployments.errors import EngineDead, EngineError
from deployments.executors.base import Executor, StopSequenceMatcher
from deployments.messages import (
    EngineCapabilities,
    FinishReason,
    GenerateRequest,
    TokenDelta,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.generation.continuous_batching import ContinuousBatchingManager

logger = logging.getLogger(__name__)

# The base GenerationConfig must hold non-default values so that CB creates the per-request temperature,
# top-k and top-p processors at all (transformers PR #45553); every request then overrides all three.
_BASE_TEMPERATURE = 0.7
_BASE_TOP_K = 50
_BASE_TOP_P = 0.9


@dataclass(slots=True)
class _Tracked:
    num_seen_tokens: int
    end_id: int | None
    matcher: StopSequenceMatcher
    num_prompt_tokens: int
    pending_logprobs: list[float]
    is_first: bool = True


def sampling_kwargs(request: GenerateRequest, vocab_size: int) -> dict[str, Any]:
    """Per-request processor kwargs. Greedy is top_k=1: CB samples for every request once any request samples,
    and multinomial over a single surviving logit is argmax."""
    sampling = request.sampling
    if sampling.is_greedy:
        return {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
    return {
        "temperature": float(sampling.temperature),
        # Clamped: a top_k past the vocabulary means all of it, and one past int64 killed the CB thread.
        "top_k": min(int(sampling.top_k), vocab_size) if sampling.top_k > 0 else vocab_size,
        "top_p": float(sampling.top_p),
    }


class TransformersExecutor(Executor):
    """One `ContinuousBatchingManager`; its generation thread hands outputs to our loop through
    `register_result_handler` (transformers calls `loop.call_soon_threadsafe` for us)."""

    capabilities = EngineCapabilities(supports_logprobs=True)

    def __init__(self, model_dir: str | Path, config: TransformersEngineConfig) -> None:
        super().__init__()
        self._model_dir = str(model_dir)
        self._config = config
        self._model: PreTrainedModel | None = None
        self._manager: ContinuousBatchingManager | None = None
        self._tracked: dict[str, _Tracked] = {}
        self._vocab_size = 0
        self._is_greedy_only = config.sampling == "greedy"
        self.capabilities = EngineCapabilities(
            supports_logprobs=True, supports_sampling=not self._is_greedy_only
        )
        self.device = "cpu"

    async def start(self) -> None:
        await super().start()
        # Loading weights and starting the CB thread blocks for seconds: keep it off the loop.
        await asyncio.to_thread(self._load_and_start)

    def _load_and_start(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

        cfg = self._config
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        dtype = {
            "auto": "auto",
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
        }[cfg.dtype]
        model = AutoModelForCausalLM.from_pretrained(
            self._model_dir, dtype=dtype, attn_implementation=cfg.attn_implementation
        )
        # Any: the decorator on transformers' `to` hides its signature from mypy.
        model = cast(Any, model).to(device).eval()
        self._vocab_size = int(model.config.vocab_size)
        # Greedy only: no processors at all, CB takes the argmax of the logits (transformers serve's default).
        sampling: dict[str, Any] = (
            {"do_sample": False}
            if self._is_greedy_only
            else {
                "do_sample": True,
                "temperature": _BASE_TEMPERATURE,
                "top_k": _BASE_TOP_K,
                "top_p": _BASE_TOP_P,
            }
        )
        generation_config = GenerationConfig(
            **sampling,
            max_new_tokens=16,
            eos_token_id=-1,
            pad_token_id=model.config.pad_token_id or 0,
        )
        cb_config = ContinuousBatchingConfig(
            num_blocks=cfg.num_blocks,
            max_batch_tokens=cfg.max_batch_tokens,
            page_size=cfg.page_size,
            max_requests_per_batch=cfg.max_requests_per_batch,
            allow_block_sharing=cfg.enable_prefix_sharing,
            per_request_processors=not self._is_greedy_only,
            return_logprobs=True,
            use_cuda_graph=cfg.use_cuda_graph if device != "cpu" else False,
            scheduler_type=cfg.scheduler,
        )
        manager = model.init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=cb_config
        )
        manager.start()
        self._model, self._manager = model, manager
        logger.info("transformers executor ready on %s (%s)", device, self._model_dir)

    async def shutdown(self) -> None:
        await super().shutdown()
        if self._manager is not None:
            manager, self._manager = self._manager, None
            await asyncio.to_thread(manager.stop, True, 30)

    # ---- contract --------------------------------------------------------------------------------
    def _submit(self, request: GenerateRequest) -> None:
        manager = self._require_manager()
        request_id = request.request_id
        self._tracked[request_id] = _Tracked(
            num_seen_tokens=0,
            end_id=request.end_id,
            matcher=StopSequenceMatcher(request.stop_token_sequences),
            num_prompt_tokens=len(request.prompt_token_ids),
            pending_logprobs=[],
        )
        manager.register_result_handler(request_id, self._on_output)
        accepted = manager.add_request(
            list(request.prompt_token_ids),
            request_id=request_id,
            max_new_tokens=request.max_tokens,
            streaming=True,
            eos_token_id=request.end_id if request.end_id is not None else -1,
            **({} if self._is_greedy_only else sampling_kwargs(request, self._vocab_size)),
        )
        if accepted is None:
            self._forget(request_id)
            if not manager.is_running():
                # The CB thread died: 503 now; check_health fails, and Serve replaces the replica.
                self._mark_dead("the continuous batching thread stopped")
                raise EngineDead("the transformers engine stopped")
            raise EngineError("the transformers engine refused the request (it is stopping)")

    def _cancel(self, request_id: str) -> None:
        self._forget(request_id)
        if self._manager is not None:
            self._manager.cancel_request(request_id)

    def queue_depth(self) -> int:
        manager = self._manager
        return manager.input_queue.qsize() if manager is not None else 0

    def check_health(self) -> None:
        super().check_health()
        manager = self._manager
        if manager is not None and not manager.is_running():
            self._mark_dead("the continuous batching thread stopped")
            super().check_health()

    # ---- results, on the loop ------------------------------------------------------------------------
    def _on_output(self, output: Any) -> None:
        request_id = output.request_id
        tracked = self._tracked.get(request_id)
        if tracked is None:
            return
        if output.error is not None:
            self._forget(request_id)
            self.fail(request_id, EngineError(f"generation failed: {output.error}"))
            return
        generated: list[int] = output.generated_tokens
        new_token_ids = generated[tracked.num_seen_tokens :]
        has_logprobs = bool(output.logprobs)
        if has_logprobs:
            tracked.pending_logprobs.extend(output.logprobs[tracked.num_seen_tokens :])
        tracked.num_seen_tokens = len(generated)
        is_finished = output.is_finished()
        finish: FinishReason | None = None
        if new_token_ids and tracked.end_id is not None and new_token_ids[-1] == tracked.end_id:
            new_token_ids = new_token_ids[:-1]
            if has_logprobs:
                tracked.pending_logprobs.pop()
            finish = FinishReason.END_ID
        emitted, is_stopped = tracked.matcher.feed(new_token_ids)
        if is_stopped:
            finish = FinishReason.STOP
            self._cancel(request_id)
        elif finish is not None or is_finished:
            emitted += tracked.matcher.flush()
            finish = finish or FinishReason.LENGTH
        if finish is not None:
            self._forget(request_id)
        if not emitted and finish is None:
            return
        logprobs = None
        if has_logprobs:
            logprobs = tracked.pending_logprobs[: len(emitted)]
            del tracked.pending_logprobs[: len(emitted)]
        delta = TokenDelta(
            token_ids=emitted,
            finish_reason=finish,
            logprobs=logprobs,
            num_prompt_tokens=tracked.num_prompt_tokens if tracked.is_first else 0,
        )
        tracked.is_first = False
        self.deliver(request_id, delta)

    def _forget(self, request_id: str) -> None:
        self._tracked.pop(request_id, None)
        manager = self._manager
        if manager is not None:
            # Cancelled requests never produce a final output, so transformers would keep their handler.
            with manager.output_router._lock:
                manager.output_router.result_handlers.pop(request_id, None)

    def _require_manager(self) -> ContinuousBatchingManager:
        if self._manager is None:
            raise EngineError("the transformers executor is not started")
        return self._manager
