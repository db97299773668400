"""The scripted engine (tests' tool-calling model) meets the Executor contract: the first matching reply,
token by token, END_ID or LENGTH, an engine error when nothing matches, and cancellation."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from deployments.config import EngineConfig
from deployments.engine import create_executor
from deployments.errors import EngineError
from deployments.messages import FinishReason, GenerateRequest

SCRIPT = {
    "kind": "scripted",
    "scripted": {
        "replies": [
            {"when": r"weather", "text": "<tool_call>\n{}\n</tool_call>"},
            {"when": r"^hello", "text": "Hi there, friend."},
        ]
    },
}


def _generate(executor: Any, prompt_ids: list[int], max_tokens: int = 100) -> list[Any]:
    async def main() -> list[Any]:
        await executor.start()
        request = GenerateRequest("r", prompt_token_ids=prompt_ids, max_tokens=max_tokens)
        return [delta async for delta in executor.generate(request)]

    return asyncio.run(main())


def test_each_prompt_gets_the_first_matching_reply_token_by_token(
    model_dir: Path, tokenizer: Any
) -> None:
    executor = create_executor(EngineConfig.model_validate(SCRIPT), str(model_dir))
    deltas = _generate(executor, tokenizer.encode("what is the weather, hello"))
    token_ids = [token_id for delta in deltas for token_id in delta.token_ids]
    assert tokenizer.decode(token_ids, skip_special_tokens=False) == "<tool_call>\n{}\n</tool_call>"
    assert all(len(delta.token_ids) == 1 for delta in deltas)
    assert deltas[-1].finish_reason == FinishReason.END_ID and deltas[0].num_prompt_tokens > 0

    cut = _generate(executor, tokenizer.encode("hello you"), max_tokens=2)
    assert [d.token_ids[0] for d in cut] == tokenizer.encode("Hi there, friend.")[:2]
    assert cut[-1].finish_reason == FinishReason.LENGTH


def test_a_prompt_no_reply_matches_is_an_engine_error(model_dir: Path, tokenizer: Any) -> None:
    executor = create_executor(EngineConfig.model_validate(SCRIPT), str(model_dir))
    with pytest.raises(EngineError):
        _generate(executor, tokenizer.encode("nothing to see"))


def test_a_cancelled_request_stops_streaming(model_dir: Path, tokenizer: Any) -> None:
    executor = create_executor(EngineConfig.model_validate(SCRIPT), str(model_dir))

    async def main() -> Any:
        await executor.start()
        request = GenerateRequest("r", prompt_token_ids=tokenizer.encode("hello"), max_tokens=100)
        stream = executor.generate(request)
        await stream.__anext__()
        await stream.aclose()  # the consumer leaves: the request is cancelled
        await asyncio.sleep(0.01)
        return executor.stats()

    stats = asyncio.run(main())
    assert stats.num_cancelled_requests == 1 and stats.num_active_requests == 0
    assert not executor._tasks
