"""The transformers executor against transformers' own `generate` (seeded greedy: exact tokens)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from deployments.config import TransformersEngineConfig
from deployments.executors.hf import TransformersExecutor
from deployments.messages import FinishReason, GenerateRequest, SamplingParams

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = ["Hello café 東京", "What is the session token?", "hi", "A much longer prompt " * 12]


@pytest.fixture(scope="module")
def reference_model(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=False
        )
    )


def reference_tokens(model: Any, ids: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None
    )
    return list(out[0, len(ids) :].tolist())


async def _executor(model_dir: Path, sampling: str = "per_request") -> TransformersExecutor:
    executor = TransformersExecutor(
        model_dir, TransformersEngineConfig(device="cpu", num_blocks=64, sampling=sampling)
    )
    await executor.start()
    return executor


async def collect(stream: AsyncIterator[Any]) -> tuple[list[int], FinishReason | None]:
    token_ids: list[int] = []
    finish = None
    async for delta in stream:
        token_ids += delta.token_ids
        finish = delta.finish_reason
    return token_ids, finish


@pytest.mark.parametrize("sampling", ["per_request", "greedy"])
def test_concurrent_greedy_output_equals_generate(
    model_dir: Path, tokenizer: Any, reference_model: Any, sampling: str
) -> None:
    prompts = [prompt_ids(tokenizer, text) for text in PROMPTS]
    expected = [reference_tokens(reference_model, ids, 24) for ids in prompts]

    async def main() -> list[tuple[list[int], FinishReason | None]]:
        executor = await _executor(model_dir, sampling)
        try:
            requests = [
                GenerateRequest(
                    request_id=f"r{i}", prompt_token_ids=ids, max_tokens=24, sampling=GREEDY
                )
                for i, ids in enumerate(prompts)
            ]
            return await asyncio.gather(*(collect(executor.generate(r)) for r in requests))
        finally:
            await executor.shutdown()

    results = asyncio.run(main())
    for (token_ids, finish), want in zip(results, expected, strict=True):
        assert token_ids == want
        assert finish is FinishReason.LENGTH


def test_end_id_and_stop_sequences_end_requests_without_being_returned(
    model_dir: Path, tokenizer: Any, reference_model: Any
) -> None:
    ids = prompt_ids(tokenizer, PROMPTS[0])
    want = reference_tokens(reference_model, ids, 24)
    end_id, stop_pair = want[5], (want[9], want[10])

    async def main() -> tuple[Any, Any]:
        executor = await _executor(model_dir)
        try:
            by_end = GenerateRequest(
                request_id="e", prompt_token_ids=ids, max_tokens=24, sampling=GREEDY, end_id=end_id
            )
            by_stop = GenerateRequest(
                request_id="s",
                prompt_token_ids=ids,
                max_tokens=24,
                sampling=GREEDY,
                stop_token_sequences=(stop_pair,),
            )
            return await collect(executor.generate(by_end)), await collect(
                executor.generate(by_stop)
            )
        finally:
            await executor.shutdown()

    (end_tokens, end_finish), (stop_tokens, stop_finish) = asyncio.run(main())
    assert (end_tokens, end_finish) == (want[:5], FinishReason.END_ID)
    assert (stop_tokens, stop_finish) == (want[:9], FinishReason.STOP)


def test_cancelled_consumer_frees_the_engine_slot(model_dir: Path, tokenizer: Any) -> None:
    async def main() -> Any:
        executor = await _executor(model_dir)
        try:
            request = GenerateRequest(
                request_id="c", prompt_token_ids=prompt_ids(tokenizer, "x"), max_tokens=1500
            )
            stream = executor.generate(request)
            await stream.__anext__()
            await stream.aclose()
            await asyncio.sleep(0.3)
            stats = executor.stats()
            manager = executor._manager
            assert manager is not None
            # The request no longer occupies the CB scheduler either.
            assert manager.batch_processor is not None
            scheduler = manager.batch_processor.scheduler
            return stats, len(scheduler.active_requests) + len(scheduler.waiting_requests)
        finally:
            await executor.shutdown()

    stats, active = asyncio.run(main())
    assert stats.num_cancelled_requests == 1
    assert stats.num_active_requests == 0
    assert active == 0


def test_sampling_with_temperature_differs_from_greedy_and_respects_max_tokens(
    model_dir: Path, tokenizer: Any, reference_model: Any
) -> None:
    ids = prompt_ids(tokenizer, PROMPTS[1])
    greedy = reference_tokens(reference_model, ids, 16)

    async def main() -> list[tuple[list[int], Any]]:
        executor = await _executor(model_dir)
        try:
            sampling = SamplingParams(temperature=1.5, top_p=1.0)
            requests = [
                GenerateRequest(
                    request_id=f"t{i}", prompt_token_ids=ids, max_tokens=16, sampling=sampling
                )
                for i in range(4)
            ]
            return await asyncio.gather(*(collect(executor.generate(r)) for r in requests))
        finally:
            await executor.shutdown()

    results = asyncio.run(main())
    assert all(len(tokens) == 16 for tokens, _ in results)
    assert any(tokens != greedy for tokens, _ in results)


def test_dead_executor_fails_health_and_new_requests(model_dir: Path, tokenizer: Any) -> None:
    from deployments.errors import EngineDead

    async def main() -> None:
        executor = await _executor(model_dir)
        await executor.shutdown()
        with pytest.raises(EngineDead):
            executor.check_health()
        request = GenerateRequest(
            request_id="d", prompt_token_ids=prompt_ids(tokenizer, "x"), max_tokens=4
        )
        with pytest.raises(EngineDead):
            await collect(executor.generate(request))

    asyncio.run(main())


def test_a_subnormal_temperature_is_greedy_and_does_not_break_the_batch(
    model_dir: Path, tokenizer: Any, reference_model: Any
) -> None:
    ids = prompt_ids(tokenizer, PROMPTS[0])
    expected = reference_tokens(reference_model, ids, 8)

    async def main() -> list[tuple[list[int], Any]]:
        executor = await _executor(model_dir)
        try:
            tiny = SamplingParams(temperature=1.1125369292536007e-308)
            requests = [
                GenerateRequest(
                    request_id="tiny", prompt_token_ids=ids, max_tokens=8, sampling=tiny
                ),
                GenerateRequest(
                    request_id="next", prompt_token_ids=ids, max_tokens=8, sampling=GREEDY
                ),
            ]
            return list(await asyncio.gather(*(collect(executor.generate(r)) for r in requests)))
        finally:
            await executor.shutdown()

    results = asyncio.run(main())
    assert [tokens for tokens, _ in results] == [expected, expected]


def test_greedy_only_engine_has_no_processors_and_returns_the_models_own_logprobs(
    model_dir: Path, tokenizer: Any, reference_model: Any
) -> None:
    """`sampling: greedy` drops transformers' per-request processors; its logprobs are those of the model's
    distribution (the per-request path returns those of its top-k=1 distribution, 0.0)."""
    ids = prompt_ids(tokenizer, PROMPTS[0])
    with torch.no_grad():
        logits = reference_model(torch.tensor([ids])).logits[0, -1].float()
    first = int(logits.argmax())
    want_logprob = float(torch.log_softmax(logits, dim=-1)[first])

    async def main() -> tuple[bool, list[Any]]:
        executor = await _executor(model_dir, "greedy")
        try:
            assert executor._manager is not None
            has_processors = executor._manager.logit_processor.do_processing
            request = GenerateRequest(
                request_id="r", prompt_token_ids=ids, max_tokens=4, return_logprobs=True
            )
            deltas = [d async for d in executor.generate(request)]
            return has_processors, deltas
        finally:
            await executor.shutdown()

    has_processors, deltas = asyncio.run(main())
    assert not has_processors
    assert deltas[0].token_ids[0] == first
    assert deltas[0].logprobs is not None
    assert deltas[0].logprobs[0] == pytest.approx(want_logprob, abs=1e-3)
