"""The load generator's HTTP backend against the served app: what it measures matches what was served."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from benchmarks import loadgen
from tests.e2e.conftest import API_KEY, MODEL

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_a_closed_loop_through_the_app_counts_every_token_and_times_every_chunk(
    base_url: str, model_dir: Path, endpoint: str
) -> None:
    source = loadgen.PromptSource(str(model_dir), seed=1)

    async def body() -> tuple[list[loadgen.RequestRecord], float]:
        backend = loadgen.OpenAIBackend(
            base_url,
            MODEL,
            endpoint=endpoint,
            max_tokens=16,
            api_key=API_KEY,
            extra_body={"ignore_eos": True},
        )
        try:
            work = loadgen.make_jobs(source, 6, 24, 2 if endpoint == "chat" else 1)
            return await loadgen.run_load(backend, work, concurrency=3, source=source)
        finally:
            await backend.close()

    records, duration = asyncio.run(body())
    assert len(records) == (12 if endpoint == "chat" else 6)
    for r in records:
        assert r.ok, r.error
        assert r.num_output_tokens == 16 and r.finish_reason == "length"
        assert 0 < r.ttft <= r.latency
        assert len(r.itl) == r.num_chunks - 1 >= 0
        assert r.num_prompt_tokens >= 24
    summary = loadgen.summarize(records, duration)
    assert summary["num_failed"] == 0
    assert summary["output_throughput"] == pytest.approx(16 * len(records) / duration)
    if endpoint == "chat":
        # The second turn's prompt holds the first turn's question and answer.
        first, second = records[0], records[1]
        assert second.turn == 1 and second.num_prompt_tokens > first.num_prompt_tokens + 16
