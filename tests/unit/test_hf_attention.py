"""The `varlen` attention implementation (executors/hf_attention.py) inside continuous batching, against
transformers' own `generate` with its default attention: seeded greedy decoding gives the same tokens.

On the CPU the per-sequence reference loop runs where CUDA runs torch's varlen kernel; both take the same
inputs from continuous batching (packed queries, each sequence's gathered keys, cumulative lengths), so
what this pins is the wiring: the lengths, grouped key heads, and causal attention aligned to the end of
each sequence when its prefix comes from the cache.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from deployments.config import TransformersEngineConfig
from deployments.executors.hf import TransformersExecutor
from deployments.executors.hf_attention import VARLEN_ATTENTION, _reference_varlen
from deployments.messages import GenerateRequest, SamplingParams
from tests.unit.test_executor_hf import PROMPTS, collect, prompt_ids, reference_tokens

GREEDY = SamplingParams(temperature=0.0)
VARLEN = TransformersEngineConfig(
    device="cpu", num_blocks=64, page_size=16, sampling="greedy", attn_implementation="varlen"
)


@pytest.fixture(scope="module")
def reference_model(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_the_reference_loop_is_bottom_right_causal_attention_per_sequence() -> None:
    """Two packed sequences, the first with 3 cached keys before its 2 queries, grouped key heads."""
    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, dim = 4, 2, 8
    q = torch.randn(2 + 3, heads, dim, generator=generator)
    k = torch.randn(5 + 3, kv_heads, dim, generator=generator)
    v = torch.randn(5 + 3, kv_heads, dim, generator=generator)
    out = _reference_varlen(q, k, v, torch.tensor([0, 2, 5]), torch.tensor([0, 5, 8]), None)

    def dense(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
        ks, vs = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (ks, vs))
        scores = torch.einsum("qhd,khd->hqk", qs, ks) / dim**0.5
        offset = ks.shape[0] - qs.shape[0]
        allowed = torch.arange(ks.shape[0])[None, :] <= torch.arange(qs.shape[0])[:, None] + offset
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        return torch.einsum("hqk,khd->qhd", weights, vs)

    torch.testing.assert_close(out[:2], dense(q[:2], k[:5], v[:5]))
    torch.testing.assert_close(out[2:], dense(q[2:], k[5:], v[5:]))


def test_concurrent_greedy_output_equals_generate(
    model_dir: Path, tokenizer: Any, reference_model: Any
) -> None:
    prompts = [prompt_ids(tokenizer, text) for text in PROMPTS]
    expected = [reference_tokens(reference_model, ids, 16) for ids in prompts]

    async def main() -> tuple[list[list[int]], str]:
        executor = TransformersExecutor(model_dir, VARLEN)
        await executor.start()
        try:
            manager = executor._manager
            assert manager is not None
            implementation = str(manager.model.config._attn_implementation)
            requests = [
                GenerateRequest(
                    request_id=f"r{i}", prompt_token_ids=ids, max_tokens=16, sampling=GREEDY
                )
                for i, ids in enumerate(prompts)
            ]
            done = await asyncio.gather(*(collect(executor.generate(r)) for r in requests))
            return [tokens for tokens, _ in done], implementation
        finally:
            await executor.shutdown()

    outputs, implementation = asyncio.run(main())
    assert implementation == VARLEN_ATTENTION
    assert outputs == expected


def test_a_continued_conversation_attends_over_its_cached_prefix_as_generate_does(
    model_dir: Path, tokenizer: Any, reference_model: Any
) -> None:
    first_ids = prompt_ids(tokenizer, PROMPTS[3])

    async def main() -> tuple[list[int], list[int], int]:
        executor = TransformersExecutor(model_dir, VARLEN)
        await executor.start()
        try:
            reply, _ = await collect(
                executor.generate(
                    GenerateRequest(
                        request_id="t1", prompt_token_ids=first_ids, max_tokens=12, sampling=GREEDY
                    )
                )
            )
            second_ids = first_ids + reply + prompt_ids(tokenizer, "and then?")
            second = executor.generate(
                GenerateRequest(
                    request_id="t2", prompt_token_ids=second_ids, max_tokens=12, sampling=GREEDY
                )
            )
            tokens: list[int] = []
            cached = 0
            async for delta in second:
                tokens += delta.token_ids
                cached = cached or delta.num_cached_tokens
            return second_ids, tokens, cached
        finally:
            await executor.shutdown()

    second_ids, tokens, cached = asyncio.run(main())
    assert cached > 0  # the second turn's queries came after a prefix read from the cache
    assert tokens == reference_tokens(reference_model, second_ids, 12)
