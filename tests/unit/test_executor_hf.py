"""The transformers executor against transformers' own `generate` (seeded greedy: exact tokens)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from deployments.config import TransformersEngineConfig
from deployments.executors.hf import TransformersExecutor, engine_capabilities
from deployments.executors.hf_model import runs_processors
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
    distribution, as the per-request path's are (`test_per_request_logprobs_are_the_models_own...`)."""
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


async def _run_all(model_dir: Path, requests: list[GenerateRequest]) -> list[list[Any]]:
    executor = await _executor(model_dir)

    async def deltas(request: GenerateRequest) -> list[Any]:
        return [delta async for delta in executor.generate(request)]

    try:
        return list(await asyncio.gather(*(deltas(r) for r in requests)))
    finally:
        await executor.shutdown()


def _tokens(deltas: list[Any]) -> list[int]:
    return [token_id for delta in deltas for token_id in delta.token_ids]


def test_a_seed_gives_the_same_tokens_alone_and_in_a_batch_and_other_seeds_differ(
    model_dir: Path, tokenizer: Any
) -> None:
    ids = prompt_ids(tokenizer, PROMPTS[1])

    def seeded(request_id: str, seed: int) -> GenerateRequest:
        return GenerateRequest(request_id, ids, 24, SamplingParams(temperature=1.0, seed=seed))

    company = [
        GenerateRequest(f"c{i}", prompt_ids(tokenizer, text), 24, SamplingParams(temperature=1.0))
        for i, text in enumerate(PROMPTS)
    ]
    [alone] = asyncio.run(_run_all(model_dir, [seeded("alone", 1234)]))
    batched = asyncio.run(_run_all(model_dir, [*company, seeded("batched", 1234)]))[-1]
    others = asyncio.run(_run_all(model_dir, [seeded(f"s{seed}", seed) for seed in (1, 2, 3)]))
    assert _tokens(batched) == _tokens(alone)
    assert all(_tokens(other) != _tokens(alone) for other in others)


def test_per_request_logprobs_are_the_models_own_with_the_most_likely_tokens_in_order(
    model_dir: Path, tokenizer: Any, reference_model: Any
) -> None:
    ids = prompt_ids(tokenizer, PROMPTS[0])
    with torch.no_grad():
        logits = reference_model(torch.tensor([ids])).logits[0, -1].float()
    expected = torch.log_softmax(logits, dim=-1)
    request = GenerateRequest(
        "r", ids, 6, GREEDY, return_logprobs=True, num_top_logprobs=5, end_id=None
    )
    [deltas] = asyncio.run(_run_all(model_dir, [request]))
    logprobs = [lp for d in deltas for lp in d.logprobs or []]
    tops = [top for d in deltas for top in d.top_logprobs or []]
    assert len(logprobs) == len(tops) == len(_tokens(deltas)) == 6
    first = _tokens(deltas)[0]
    assert first == int(logits.argmax())
    assert logprobs[0] == pytest.approx(float(expected[first]), abs=1e-4)
    assert [token_id for token_id, _ in tops[0]] == expected.topk(5).indices.tolist()
    for token_id, top in zip(_tokens(deltas), tops, strict=True):
        assert len(top) == 5 and top[0][0] == token_id  # greedy: the most likely one
        assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)


def test_a_banned_token_never_appears_and_a_frequency_penalty_changes_greedy_text(
    model_dir: Path, tokenizer: Any, reference_model: Any
) -> None:
    ids = prompt_ids(tokenizer, PROMPTS[2])
    greedy = reference_tokens(reference_model, ids, 32)
    banned = max(set(greedy), key=greedy.count)
    requests = [
        GenerateRequest(
            "ban", ids, 32, SamplingParams(temperature=0, logit_bias=((banned, -100),))
        ),
        GenerateRequest(
            "sampled-ban",
            ids,
            32,
            SamplingParams(temperature=1.5, logit_bias=((banned, -100),), seed=5),
        ),
        GenerateRequest("penalty", ids, 32, SamplingParams(temperature=0, frequency_penalty=2.0)),
    ]
    ban, sampled_ban, penalty = (_tokens(d) for d in asyncio.run(_run_all(model_dir, requests)))
    assert banned not in ban and banned not in sampled_ban
    assert ban != greedy[: len(ban)]
    assert penalty != greedy and max(map(penalty.count, penalty)) <= max(map(greedy.count, greedy))


@pytest.mark.parametrize(
    ("settings", "device", "hint"),
    [
        ({"sampling": "greedy"}, "cpu", "sampling: greedy"),
        ({"use_cuda_graph": True}, "cuda", "use_cuda_graph"),
        ({"tensor_parallel_size": 2}, "cpu", "tensor_parallel_size"),
    ],
)
def test_engines_without_processors_decline_what_needs_them_and_name_the_setting(
    settings: dict[str, Any], device: str, hint: str
) -> None:
    config = TransformersEngineConfig(**settings)
    assert not runs_processors(config, device)
    capabilities = engine_capabilities(
        is_greedy_only=config.sampling == "greedy",
        has_processors=False,
        has_grammars=False,
        tensor_parallel_size=config.tensor_parallel_size,
    )
    assert not capabilities.supports_seed and not capabilities.supports_logit_bias
    assert capabilities.max_top_logprobs == 0 and not capabilities.guided_decoding_kinds
    assert hint in capabilities.unsupported_hint
    assert runs_processors(TransformersEngineConfig(), device)


async def _first_delta_and_rest(
    executor: TransformersExecutor, request: GenerateRequest
) -> tuple[Any, list[int]]:
    deltas = [delta async for delta in executor.generate(request)]
    return deltas[0], [t for delta in deltas for t in delta.token_ids]


def test_a_repeated_prompt_reports_its_cached_prefix_in_whole_pages(
    model_dir: Path, tokenizer: Any, reference_model: Any
) -> None:
    page_size = 16
    ids = prompt_ids(tokenizer, PROMPTS[3])  # about 60 tokens: three whole pages and a bit
    expected = reference_tokens(reference_model, ids, 8)

    async def main() -> tuple[Any, Any, list[int], Any, int]:
        executor = TransformersExecutor(
            model_dir, TransformersEngineConfig(device="cpu", num_blocks=64, page_size=page_size)
        )
        await executor.start()
        try:
            first, _ = await _first_delta_and_rest(
                executor,
                GenerateRequest(
                    request_id="a", prompt_token_ids=ids, max_tokens=8, sampling=GREEDY
                ),
            )
            second, tokens = await _first_delta_and_rest(
                executor,
                GenerateRequest(
                    request_id="b", prompt_token_ids=ids, max_tokens=8, sampling=GREEDY
                ),
            )
            return first, second, tokens, executor.stats(), len(executor._prefix_matches)
        finally:
            await executor.shutdown()

    first, second, tokens, stats, num_left = asyncio.run(main())
    assert (first.num_prompt_tokens, first.num_cached_tokens) == (len(ids), 0)
    # transformers shares whole pages and always computes at least the last prompt token.
    assert second.num_cached_tokens == (len(ids) - 1) // page_size * page_size > 0
    assert tokens == expected  # reused KV gives the same greedy tokens
    assert stats.num_cached_prompt_tokens == second.num_cached_tokens
    assert stats.num_uncached_prompt_tokens == 2 * len(ids) - second.num_cached_tokens
    assert stats.prefix_cache_hit_rate == second.num_cached_tokens / (2 * len(ids))
    assert num_left == 0


def test_a_continued_conversation_reports_the_previous_turn_as_cached(
    model_dir: Path, tokenizer: Any
) -> None:
    page_size = 16
    first_ids = prompt_ids(tokenizer, PROMPTS[3])

    async def main() -> tuple[list[int], Any]:
        executor = TransformersExecutor(
            model_dir, TransformersEngineConfig(device="cpu", num_blocks=64, page_size=page_size)
        )
        await executor.start()
        try:
            _, reply = await _first_delta_and_rest(
                executor,
                GenerateRequest(
                    request_id="t1", prompt_token_ids=first_ids, max_tokens=20, sampling=GREEDY
                ),
            )
            second_ids = first_ids + reply + prompt_ids(tokenizer, "and then?")
            second, _ = await _first_delta_and_rest(
                executor,
                GenerateRequest(
                    request_id="t2", prompt_token_ids=second_ids, max_tokens=4, sampling=GREEDY
                ),
            )
            return reply, second
        finally:
            await executor.shutdown()

    reply, second = asyncio.run(main())
    # The first turn's prompt and the reply's tokens whose KV was computed (all but the last), in whole pages.
    assert second.num_cached_tokens == (len(first_ids) + len(reply) - 1) // page_size * page_size


def test_cancelled_requests_leave_no_prefix_match_behind(model_dir: Path, tokenizer: Any) -> None:
    async def main() -> int:
        executor = await _executor(model_dir)
        try:
            for i in range(3):
                request = GenerateRequest(
                    request_id=f"c{i}",
                    prompt_token_ids=prompt_ids(tokenizer, PROMPTS[3]),
                    max_tokens=200,
                )
                stream = executor.generate(request)
                await stream.__anext__()
                await stream.aclose()
            await asyncio.sleep(0.2)
            return len(executor._prefix_matches)
        finally:
            await executor.shutdown()

    assert asyncio.run(main()) == 0
