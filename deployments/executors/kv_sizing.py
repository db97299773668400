"""How many KV-cache blocks a transformers engine replica allocates from its share of a GPU (`num_blocks: auto`).

Pure arithmetic over the model's shape, so it is testable on the CPU. The per-token and per-step costs follow
transformers 5.24's own sizing (`PagedAttentionMemoryHandler` in `generation/continuous_batching/cache.py`),
which the engine then checks the chosen count against; the difference is the budget: transformers sizes
from the memory free on the device when the cache is built, which several replicas starting on one GPU
would race for, while a replica here takes only its share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 1024**3
# CUDA context, cuBLAS/cuDNN workspaces and CUDA graph pools: memory a replica's process uses beside its
# tensors (about 0.5 GiB of context alone on Hopper with torch).
RUNTIME_OVERHEAD_BYTES = 1 * GIB
_INT32_BYTES, _INT64_BYTES, _FP32_BYTES = 4, 8, 4


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What a model's KV cache and activations scale with (one tensor-parallel rank's share of the heads)."""

    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    dtype_bytes: int
    is_flash_attention: bool = False

    @classmethod
    def of(
        cls, config: Any, *, dtype_bytes: int, attn_implementation: str, tp_size: int = 1
    ) -> ModelShape:
        """From a transformers `PretrainedConfig` (its text config)."""
        num_heads = int(config.num_attention_heads)
        num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_heads)
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // num_heads
        return cls(
            num_layers=int(config.num_hidden_layers),
            num_attention_heads=num_heads // tp_size,
            num_kv_heads=max(1, num_kv_heads // tp_size),
            head_dim=int(head_dim),
            hidden_size=int(config.hidden_size),
            vocab_size=int(config.vocab_size),
            dtype_bytes=dtype_bytes,
            is_flash_attention="flash" in attn_implementation,
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of one token in every layer: what the cache itself holds."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def _kv_heads_at_peak(self) -> int:
        # Flash kernels read grouped KV heads in place; eager and SDPA repeat them to every query head.
        if self.is_flash_attention:
            return 2 * self.num_kv_heads
        return 2 * self.num_attention_heads + self.num_kv_heads

    @property
    def read_bytes_per_cached_token(self) -> int:
        """Beside the cache itself: the keys and values read back for attention, and the read index."""
        return self._kv_heads_at_peak * self.head_dim * self.dtype_bytes + _INT64_BYTES

    @property
    def mask_bytes_per_element(self) -> int:
        """One element of the [batch tokens, cached + batch tokens] attention mask (none with flash)."""
        return 0 if self.is_flash_attention else self.dtype_bytes

    @property
    def activation_bytes_per_batch_token(self) -> int:
        """The attention peak of one batch token (hidden state, query, new and read-back K/V) and its IO."""
        d = self.head_dim
        attention = self.dtype_bytes * (
            self.hidden_size
            + self.num_attention_heads * d
            + 2 * self.num_kv_heads * d
            + self._kv_heads_at_peak * d
        )
        return attention + 8 * _INT32_BYTES + 2 * _INT64_BYTES

    @property
    def logits_bytes_per_request(self) -> int:
        """One request's row of fp32 logits and its hidden state (transformers keeps only the last rows)."""
        return self.hidden_size * self.dtype_bytes + self.vocab_size * _FP32_BYTES


@dataclass(frozen=True, slots=True)
class KvCachePlan:
    """The outcome of sizing, with the figures that explain it (logged at start)."""

    num_blocks: int
    budget_bytes: int
    weight_bytes: int
    reserved_bytes: int
    cache_bytes: int

    @property
    def summary(self) -> str:
        return (
            f"{self.num_blocks} KV blocks ({self.cache_bytes / GIB:.2f} GiB with their attention reads) in a "
            f"budget of {self.budget_bytes / GIB:.2f} GiB: weights {self.weight_bytes / GIB:.2f} GiB, "
            f"activations and runtime {self.reserved_bytes / GIB:.2f} GiB"
        )


def plan_kv_cache(
    shape: ModelShape,
    *,
    device_bytes: int,
    gpu_fraction: float,
    memory_utilization: float,
    weight_bytes: int,
    page_size: int,
    max_batch_tokens: int,
    max_requests_per_batch: int,
) -> KvCachePlan:
    """The KV blocks that fit in `memory_utilization` of `gpu_fraction` of a device of `device_bytes`.

    The weights, the activations of one step of `max_batch_tokens` tokens, the logits of
    `max_requests_per_batch` requests and the runtime's own memory come first; each cached token then costs
    its keys and values plus what attention reads back for it.

    Raises:
        ValueError: the share cannot hold the weights plus a cache for one full step (naming the figures).
    """
    budget = int(device_bytes * gpu_fraction * memory_utilization)
    m = max_batch_tokens
    reserved = (
        RUNTIME_OVERHEAD_BYTES
        + m * shape.activation_bytes_per_batch_token
        + max_requests_per_batch * shape.logits_bytes_per_request
        + m * m * shape.mask_bytes_per_element
    )
    per_token = (
        shape.kv_bytes_per_token
        + shape.read_bytes_per_cached_token
        + m * shape.mask_bytes_per_element
    )
    free = budget - weight_bytes - reserved
    num_blocks = max(0, free) // (per_token * page_size)
    min_blocks = -(-max_batch_tokens // page_size)
    if num_blocks < min_blocks:
        needed = weight_bytes + reserved + min_blocks * page_size * per_token
        raise ValueError(
            f"the replica's GPU share cannot fit the model: {memory_utilization:g} of "
            f"{gpu_fraction:g} x {device_bytes / GIB:.1f} GiB is {budget / GIB:.2f} GiB, but the weights "
            f"({weight_bytes / GIB:.2f} GiB), one step's activations and the runtime "
            f"({reserved / GIB:.2f} GiB) and a KV cache for one step of max_batch_tokens "
            f"({max_batch_tokens}) need {needed / GIB:.2f} GiB. Give each replica a larger share "
            f"(engine.num_gpus_per_replica), raise engine.transformers.gpu_memory_utilization, or lower "
            f"max_batch_tokens"
        )
    return KvCachePlan(
        num_blocks=num_blocks,
        budget_bytes=budget,
        weight_bytes=weight_bytes,
        reserved_bytes=reserved,
        cache_bytes=num_blocks * page_size * per_token,
    )
