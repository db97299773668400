"""The transformers engine's KV cache as this server sees it: how many prompt tokens each request found in the
prefix cache, and how many blocks a replica allocates from its GPU share (`num_blocks: auto`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from deployments.config import TransformersEngineConfig
from deployments.errors import EngineError
from deployments.executors.kv_sizing import ModelShape, plan_kv_cache

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.generation.continuous_batching import ContinuousBatchingManager

logger = logging.getLogger(__name__)

_BATCH_PROCESSOR_TIMEOUT_S = 300.0


class PrefixMatches:
    """The prompt tokens whose KV transformers reused, per request, recorded where its cache decides.

    transformers 5.24 reports a request's prefix match in no output: the scheduler calls
    `PagedAttentionCache.search_prefix_match(request_id, prompt_ids)` once when it admits a pending request,
    which shares the matched blocks and returns the number of matched tokens (whole pages, never the whole
    prompt). `watch` wraps that method on the manager's cache object, so the count is kept as the cache
    decides it, on the engine thread, once per admission, and nothing runs per step. The executor takes it
    on the loop with the request's first output, which always comes after its admission.

    Only requests the executor `expect`s are recorded (a request re-admitted after an offload keeps its first
    count), so cancelled requests leave nothing behind. Threading: `record` runs on the engine thread,
    the rest on the loop; one lock guards both maps.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._expected: set[str] = set()
        self._matches: dict[str, int] = {}

    def watch(self, cache: Any) -> None:
        """Records every match `cache` (a `PagedAttentionCache`) finds from now on."""
        search: Callable[[str, list[int]], int] = cache.search_prefix_match

        def search_and_record(request_id: str, prompt_ids: list[int]) -> int:
            num_tokens = search(request_id, prompt_ids)
            self.record(request_id, num_tokens)
            return num_tokens

        cache.search_prefix_match = search_and_record

    def expect(self, request_id: str) -> None:
        with self._lock:
            self._expected.add(request_id)

    def record(self, request_id: str, num_tokens: int) -> None:
        with self._lock:
            if request_id in self._expected:
                self._matches.setdefault(request_id, num_tokens)

    def take(self, request_id: str) -> int:
        """The tokens matched at the request's admission (0: none, or not admitted through a search)."""
        with self._lock:
            self._expected.discard(request_id)
            return self._matches.pop(request_id, 0)

    def __len__(self) -> int:
        return len(self._expected) + len(self._matches)


def watch_prefix_matches(manager: ContinuousBatchingManager, matches: PrefixMatches) -> None:
    """Hooks `matches` into a started manager's cache before any request arrives.

    The engine thread builds the cache when it starts, so this waits for it (seconds at most: the cache is
    allocated, nothing is computed). Requests reach the manager only after the executor started, so no
    admission can precede the hook.

    Raises:
        EngineError: the engine thread stopped, or never built its cache.
    """
    import time

    deadline = time.monotonic() + _BATCH_PROCESSOR_TIMEOUT_S
    while (processor := manager.batch_processor) is None:
        if not manager.is_running():
            raise EngineError("the continuous batching thread stopped while starting")
        if time.monotonic() > deadline:
            raise EngineError(
                f"the continuous batching thread built no KV cache in {_BATCH_PROCESSOR_TIMEOUT_S:g} s"
            )
        time.sleep(0.005)
    matches.watch(processor.cache)


def resolve_num_blocks(
    model: PreTrainedModel, config: TransformersEngineConfig, device: str, gpu_fraction: float
) -> int:
    """`config.num_blocks`, or with `auto` the blocks that fit this replica's share of its GPU.

    Raises:
        EngineError: the share cannot hold the weights plus a KV cache for one step (the message says what
            each part needs).
    """
    if config.num_blocks != "auto":
        return config.num_blocks
    if device == "cpu":
        raise EngineError(
            "engine.transformers.num_blocks: auto sizes the KV cache from a GPU share; on the CPU set a "
            "number of blocks"
        )
    import torch

    _, device_bytes = torch.cuda.mem_get_info()
    dtype_bytes = torch.finfo(model.dtype).bits // 8
    weight_bytes = sum(_local_bytes(t) for t in (*model.parameters(), *model.buffers()))
    shape = ModelShape.of(
        model.config.get_text_config(),
        dtype_bytes=dtype_bytes,
        attn_implementation=str(model.config._attn_implementation),
        tp_size=config.tensor_parallel_size,
    )
    try:
        plan = plan_kv_cache(
            shape,
            device_bytes=int(device_bytes),
            gpu_fraction=gpu_fraction,
            memory_utilization=config.gpu_memory_utilization,
            weight_bytes=weight_bytes,
            page_size=config.page_size,
            max_batch_tokens=config.max_batch_tokens,
            max_requests_per_batch=config.max_requests_per_batch,
        )
    except ValueError as error:
        raise EngineError(str(error)) from None
    logger.info("num_blocks auto, GPU share %g: %s", gpu_fraction, plan.summary)
    return plan.num_blocks


def _local_bytes(tensor: Any) -> int:
    """A tensor's bytes on this rank (a tensor-parallel DTensor counts only its local shard)."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return int(local.numel() * local.element_size())
