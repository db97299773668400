"""Transformers continuous batching behind the Executor contract (the embedded default and GPU benchmark engine)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deployments.config import TransformersEngineConfig
from deployments.errors import EngineDead, EngineError
from deployments.executors.base import Executor, StopSequenceMatcher
from deployments.executors.hf_cache import PrefixMatches, watch_prefix_matches
from deployments.executors.hf_model import (
    check_transformers_version,
    create_manager,
    load_model,
    resolve_device,
    runs_processors,
)
from deployments.messages import (
    GUIDED_DECODING_KINDS,
    EngineCapabilities,
    FinishReason,
    GenerateRequest,
    TokenDelta,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.generation.continuous_batching import ContinuousBatchingManager

    from deployments.executors.hf_processors import BatchSampler
    from deployments.executors.hf_tp import TensorParallelGroup

logger = logging.getLogger(__name__)

_RANK_LOSS_GRACE_S = 0.5


@dataclass(slots=True)
class _Tracked:
    num_seen_tokens: int
    end_id: int | None
    matcher: StopSequenceMatcher
    num_prompt_tokens: int
    pending_logprobs: list[float]
    # With `num_top_logprobs`: each pending token's most likely alternatives.
    pending_top: list[list[tuple[int, float]]] | None = None
    # The processors sample this request and report its logprobs (else transformers' own do).
    has_processor_logprobs: bool = False
    is_first: bool = True
    num_cached_tokens: int | None = None  # known with the first output


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


_MAX_TOP_LOGPROBS = 20
_GREEDY_HINT = (
    "engine.transformers.sampling: greedy runs no per-request processors; set it to per_request"
)
_GRAPH_HINT = (
    "engine.transformers.use_cuda_graph: true would capture the per-request processors in a graph; "
    "turn it off for seeds, penalties, logit_bias, top_logprobs and guided decoding"
)
_TP_HINT = (
    "engine.transformers.tensor_parallel_size > 1 runs no per-request processors (every rank samples "
    "its own copy of each token); serve seeds, penalties, logit_bias, top_logprobs and guided decoding "
    "from a tensor_parallel_size: 1 engine"
)


def engine_capabilities(
    *,
    is_greedy_only: bool,
    has_processors: bool,
    has_grammars: bool,
    tensor_parallel_size: int = 1,
) -> EngineCapabilities:
    """What the transformers engine honours in each configuration."""
    if is_greedy_only:
        return EngineCapabilities(
            supports_logprobs=True, supports_sampling=False, unsupported_hint=_GREEDY_HINT
        )
    if not has_processors:
        hint = _TP_HINT if tensor_parallel_size > 1 else _GRAPH_HINT
        return EngineCapabilities(supports_logprobs=True, unsupported_hint=hint)
    return EngineCapabilities(
        supports_sampling=True,
        supports_seed=True,
        supports_penalties=True,
        supports_min_tokens=True,
        supports_logprobs=True,
        supports_logit_bias=True,
        max_top_logprobs=_MAX_TOP_LOGPROBS,
        guided_decoding_kinds=GUIDED_DECODING_KINDS if has_grammars else (),
        unsupported_hint=""
        if has_grammars
        else "no tokenizer beside the weights for guided decoding",
    )


def _stop(manager: ContinuousBatchingManager | None, group: TensorParallelGroup | None) -> None:
    """Stops the CB thread (it finishes what it holds, for up to 30 s), then the other ranks."""
    is_running = manager is not None and manager.is_running()
    if manager is not None:
        manager.stop(True, 30)
    if group is not None:
        # The other ranks leave their loop with this one only after a stop they all agreed on.
        group.close(is_clean=is_running and manager is not None and not manager.is_running())


class TransformersExecutor(Executor):
    """One `ContinuousBatchingManager`; its generation thread hands outputs to our loop through
    `register_result_handler` (transformers calls `loop.call_soon_threadsafe` for us)."""

    capabilities = EngineCapabilities(supports_logprobs=True)
    reports_cached_tokens = True

    def __init__(
        self, model_dir: str | Path, config: TransformersEngineConfig, *, gpu_fraction: float = 1.0
    ) -> None:
        super().__init__()
        self._gpu_fraction = gpu_fraction
        self._prefix_matches = PrefixMatches()
        self._model_dir = str(model_dir)
        self._config = config
        self._model: PreTrainedModel | None = None
        self._manager: ContinuousBatchingManager | None = None
        self._tracked: dict[str, _Tracked] = {}
        self._vocab_size = 0
        self._is_greedy_only = config.sampling == "greedy"
        self._sampler: BatchSampler | None = None
        self.capabilities = engine_capabilities(
            is_greedy_only=self._is_greedy_only, has_processors=False, has_grammars=False
        )
        self.device = "cpu"
        self._group: TensorParallelGroup | None = None

    async def start(self) -> None:
        await super().start()
        check_transformers_version()
        # Loading weights and starting the CB thread blocks for seconds: keep it off the loop.
        await asyncio.to_thread(self._load_and_start)

    def _load_and_start(self) -> None:
        cfg = self._config
        self.device = resolve_device(cfg)
        if cfg.tensor_parallel_size == 1:
            model = load_model(self._model_dir, cfg, self.device)
        else:
            # Only a TP engine pulls in MPI and torch.distributed.
            from deployments.executors.hf_tp import TensorParallelGroup

            self._group = TensorParallelGroup.start(self._model_dir, cfg, self.device)
            try:
                model = load_model(
                    self._model_dir, cfg, self.device, rank=0, device_ids=self._group.device_ids
                )
            except BaseException:
                self._group.close(is_clean=False)
                raise
        self._vocab_size = int(model.config.vocab_size)
        has_processors = runs_processors(cfg, self.device)
        manager = create_manager(
            model, cfg, self.device, self._gpu_fraction, has_processors=has_processors
        )
        if has_processors:
            self._sampler = self._attach_processors(manager, self.device)
        self.capabilities = engine_capabilities(
            is_greedy_only=self._is_greedy_only,
            has_processors=has_processors,
            has_grammars=self._sampler is not None and self._sampler.has_grammars,
            tensor_parallel_size=cfg.tensor_parallel_size,
        )
        manager.start()
        try:
            watch_prefix_matches(manager, self._prefix_matches)
        except BaseException:
            _stop(manager, self._group)
            raise
        self._model, self._manager = model, manager
        logger.info(
            "transformers executor ready on %s, tensor parallel size %d (%s)",
            self.device,
            cfg.tensor_parallel_size,
            self._model_dir,
        )

    def _attach_processors(self, manager: Any, device: str) -> BatchSampler:
        from deployments.executors.hf_processors import BatchSampler, GrammarCompiler

        grammars: GrammarCompiler | None = None
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self._model_dir)
            grammars = GrammarCompiler(tokenizer, self._vocab_size)
        except ImportError as error:
            # A dependency of this package, but an image may lack it: the engine still serves, and
            # guided decoding is refused with a 400 (its capability is off).
            logger.warning("no guided decoding: %s", error)
        except (OSError, ValueError, TypeError) as error:
            logger.warning(
                "no guided decoding: %s has no usable tokenizer (%s)", self._model_dir, error
            )
        sampler = BatchSampler(self._vocab_size, grammars, device)
        sampler.attach(manager.logit_processor)
        return sampler

    async def shutdown(self) -> None:
        await super().shutdown()
        manager, self._manager = self._manager, None
        group, self._group = self._group, None
        if manager is not None or group is not None:
            await asyncio.to_thread(_stop, manager, group)

    # ---- contract --------------------------------------------------------------------------------
    def _submit(self, request: GenerateRequest) -> None:
        manager = self._require_manager()
        request_id = request.request_id
        kwargs = {} if self._is_greedy_only else sampling_kwargs(request, self._vocab_size)
        processing = None
        if self._sampler is not None:
            from deployments.executors.hf_processors import KWARG, RequestSampling

            processing = RequestSampling.of(request)
            if processing is not None:
                kwargs[KWARG] = processing
        self._tracked[request_id] = _Tracked(
            num_seen_tokens=0,
            end_id=request.end_id,
            matcher=StopSequenceMatcher(request.stop_token_sequences),
            num_prompt_tokens=len(request.prompt_token_ids),
            pending_logprobs=[],
            pending_top=[] if request.return_logprobs and request.num_top_logprobs else None,
            has_processor_logprobs=processing is not None and processing.num_logprobs >= 0,
        )
        self._prefix_matches.expect(request_id)
        manager.register_result_handler(request_id, self._on_output)
        accepted = manager.add_request(
            list(request.prompt_token_ids),
            request_id=request_id,
            max_new_tokens=request.max_tokens,
            streaming=True,
            eos_token_id=request.end_id if request.end_id is not None else -1,
            **kwargs,
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
        group = self._group
        if group is not None and (dead := group.dead_ranks()):
            # Serve then replaces the replica, and the surviving ranks go with it.
            self._mark_dead(f"tensor-parallel rank(s) {dead} exited")
        super().check_health()

    # ---- results, on the loop ------------------------------------------------------------------------
    def _on_output(self, output: Any) -> None:
        request_id = output.request_id
        tracked = self._tracked.get(request_id)
        if tracked is None:
            return
        if tracked.num_cached_tokens is None:
            tracked.num_cached_tokens = self._prefix_matches.take(request_id)
        if output.error is not None:
            self._forget(request_id)
            message = f"generation failed: {output.error}"
            if self._group is None:
                self.fail(request_id, EngineError(message))
            else:
                # A lost rank breaks the next collective a moment before its process is seen gone; it fails
                # every request, with a 503 to retry elsewhere, so look again shortly.
                asyncio.get_running_loop().call_later(
                    _RANK_LOSS_GRACE_S, self._fail_unless_engine_lost, request_id, message
                )
            return
        sampler = self._sampler
        guided_error = sampler.take_error(request_id) if sampler is not None else None
        if guided_error is not None:
            self._cancel(request_id)
            self.fail(request_id, EngineError(f"guided decoding failed: {guided_error}"))
            return
        generated: list[int] = output.generated_tokens
        new_token_ids = generated[tracked.num_seen_tokens :]
        has_logprobs = tracked.has_processor_logprobs or bool(output.logprobs)
        if tracked.has_processor_logprobs and sampler is not None:
            for step in sampler.take_outputs(request_id):
                tracked.pending_logprobs.append(step.logprob)
                if tracked.pending_top is not None:
                    tracked.pending_top.append(list(step.top))
        elif has_logprobs:
            tracked.pending_logprobs.extend(output.logprobs[tracked.num_seen_tokens :])
        tracked.num_seen_tokens = len(generated)
        is_finished = output.is_finished()
        finish: FinishReason | None = None
        if new_token_ids and tracked.end_id is not None and new_token_ids[-1] == tracked.end_id:
            new_token_ids = new_token_ids[:-1]
            if has_logprobs:
                # The end id is the request's last token: its entries are the last ones.
                tracked.pending_logprobs.pop()
                if tracked.pending_top:
                    tracked.pending_top.pop()
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
        logprobs = top_logprobs = None
        if has_logprobs:
            logprobs = tracked.pending_logprobs[: len(emitted)]
            del tracked.pending_logprobs[: len(emitted)]
            if tracked.pending_top is not None:
                top_logprobs = tracked.pending_top[: len(emitted)]
                del tracked.pending_top[: len(emitted)]
        delta = TokenDelta(
            token_ids=emitted,
            finish_reason=finish,
            logprobs=logprobs,
            num_prompt_tokens=tracked.num_prompt_tokens if tracked.is_first else 0,
            top_logprobs=top_logprobs,
            num_cached_tokens=(tracked.num_cached_tokens or 0) if tracked.is_first else 0,
        )
        tracked.is_first = False
        self.deliver(request_id, delta)

    def _fail_unless_engine_lost(self, request_id: str, message: str) -> None:
        group, manager = self._group, self._manager
        if group is not None and (dead := group.dead_ranks()):
            self._mark_dead(f"tensor-parallel rank(s) {dead} exited")
        elif manager is not None and not manager.is_running():
            self._mark_dead("the continuous batching thread stopped")
        else:
            self.fail(request_id, EngineError(message))

    def _forget(self, request_id: str) -> None:
        if self._tracked.pop(request_id, None) is not None and self._sampler is not None:
            self._sampler.release(request_id)
        self._prefix_matches.take(request_id)
        manager = self._manager
        if manager is not None:
            # Cancelled requests never produce a final output, so transformers would keep their handler.
            with manager.output_router._lock:
                manager.output_router.result_handlers.pop(request_id, None)

    def _require_manager(self) -> ContinuousBatchingManager:
        if self._manager is None:
            raise EngineError("the transformers executor is not started")
        return self._manager
