"""Sizing the transformers engine's KV cache from a replica's share of a GPU (`num_blocks: auto`)."""

from __future__ import annotations

from typing import Any

import pytest

from deployments.config import TransformersEngineConfig
from deployments.errors import EngineError
from deployments.executors.kv_sizing import GIB, RUNTIME_OVERHEAD_BYTES, ModelShape, plan_kv_cache

H200_BYTES = 140 * GIB
# Llama-3.2-1B in bf16: 16 layers, 8 KV heads of 64: 32 KiB of keys and values a token.
LLAMA_1B = ModelShape(
    num_layers=16,
    num_attention_heads=32,
    num_kv_heads=8,
    head_dim=64,
    hidden_size=2048,
    vocab_size=128256,
    dtype_bytes=2,
)
WEIGHTS_1B = int(2.47 * GIB)


def plan(**overrides: Any) -> Any:
    kwargs: dict[str, Any] = {
        "device_bytes": H200_BYTES,
        "gpu_fraction": 0.25,
        "memory_utilization": 0.9,
        "weight_bytes": WEIGHTS_1B,
        "page_size": 64,
        "max_batch_tokens": 512,
        "max_requests_per_batch": 64,
        **overrides,
    }
    return plan_kv_cache(kwargs.pop("shape", LLAMA_1B), **kwargs)


def test_the_shape_comes_from_a_transformers_config() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
    )
    assert ModelShape.of(config, dtype_bytes=2, attn_implementation="sdpa") == LLAMA_1B
    assert LLAMA_1B.kv_bytes_per_token == 32 * 1024
    # Each tensor-parallel rank holds its share of the heads.
    halved = ModelShape.of(config, dtype_bytes=2, attn_implementation="sdpa", tp_size=2)
    assert (halved.num_kv_heads, halved.num_attention_heads) == (4, 16)
    flash = ModelShape.of(config, dtype_bytes=2, attn_implementation="flash_attention_2")
    assert flash.is_flash_attention and flash.mask_bytes_per_element == 0


def test_a_quarter_of_an_h200_holds_the_1b_model_and_the_cache_fills_the_rest() -> None:
    quarter = plan()
    budget = int(H200_BYTES * 0.25 * 0.9)
    assert quarter.budget_bytes == budget
    per_block = 64 * (
        LLAMA_1B.kv_bytes_per_token
        + LLAMA_1B.read_bytes_per_cached_token
        + 512 * LLAMA_1B.mask_bytes_per_element
    )
    assert quarter.num_blocks == (budget - WEIGHTS_1B - quarter.reserved_bytes) // per_block
    # Everything planned fits the budget, and less than one more block is left over.
    used = WEIGHTS_1B + quarter.reserved_bytes + quarter.cache_bytes
    assert budget - per_block < used <= budget
    assert quarter.reserved_bytes > RUNTIME_OVERHEAD_BYTES
    # About 560k tokens of context for 4 replicas' worth of sessions each.
    assert 500_000 < quarter.num_blocks * 64 < 700_000


def test_the_cache_grows_with_the_share_and_the_utilization() -> None:
    quarter, half, whole = (plan(gpu_fraction=f).num_blocks for f in (0.25, 0.5, 1.0))
    assert quarter < half < whole
    # The fixed parts are paid once: twice the share buys more than twice the cache.
    assert half > 2 * quarter
    assert plan(memory_utilization=0.5).num_blocks < quarter


def test_a_share_too_small_for_the_model_names_what_each_part_needs() -> None:
    with pytest.raises(
        ValueError, match=r"cannot fit the model: 0\.9 of 0\.02 x 140\.0 GiB"
    ) as raised:
        plan(gpu_fraction=0.02)
    message = str(raised.value)
    assert "weights (2.47 GiB)" in message and "num_gpus_per_replica" in message
    # The smallest cache that still fits one step of max_batch_tokens is accepted.
    smallest = plan(gpu_fraction=0.0315)
    assert smallest.num_blocks >= 512 // 64


def test_auto_on_the_cpu_is_an_engine_error() -> None:
    from deployments.executors.hf_cache import resolve_num_blocks

    config = TransformersEngineConfig(device="cpu", num_blocks="auto")
    with pytest.raises(EngineError, match="sizes the KV cache from a GPU share"):
        resolve_num_blocks(object(), config, "cpu", 1.0)  # type: ignore[arg-type]
    assert resolve_num_blocks(object(), TransformersEngineConfig(num_blocks=7), "cpu", 1.0) == 7  # type: ignore[arg-type]


def test_auto_sizes_a_real_model_from_its_share_of_the_device(
    model_dir: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transformers engine's path with `num_blocks: auto`: the loaded model's weights and shape, and
    the device's total memory (pretended here: the test runs on the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    from deployments.executors.hf_cache import resolve_num_blocks

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *_: (0, 4 * GIB))
    config = TransformersEngineConfig(num_blocks="auto", page_size=16, gpu_memory_utilization=0.5)
    shape = ModelShape.of(model.config, dtype_bytes=4, attn_implementation="sdpa")
    expected = plan_kv_cache(
        shape,
        device_bytes=4 * GIB,
        gpu_fraction=0.75,
        memory_utilization=0.5,
        weight_bytes=sum(p.numel() * 4 for p in model.parameters())
        + sum(b.numel() * b.element_size() for b in model.buffers()),
        page_size=16,
        max_batch_tokens=config.max_batch_tokens,
        max_requests_per_batch=config.max_requests_per_batch,
    )
    assert resolve_num_blocks(model, config, "cuda", 0.75) == expected.num_blocks > 0
    with pytest.raises(EngineError, match="cannot fit the model"):
        resolve_num_blocks(model, config, "cuda", 0.2)  # 0.4 GiB: less than the runtime's own 1 GiB
