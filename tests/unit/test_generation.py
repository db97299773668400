"""A Generation that never gets its first token still lets go of its engine stream (and so of its slot)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from deployments.errors import OverloadedError
from deployments.generation import Generation
from deployments.messages import GenerateRequest


class _Stalled:
    """An engine stream whose first token never comes (a long prefill, or a queue)."""

    def __init__(self) -> None:
        self.num_cancels = 0

    async def __anext__(self) -> Any:
        await asyncio.Event().wait()

    def cancel(self) -> None:
        self.num_cancels += 1


class _Client:
    def __init__(self, stream: _Stalled | None = None, error: Exception | None = None) -> None:
        self.stream, self.error = stream, error

    async def open(self, request: GenerateRequest) -> _Stalled:
        if self.error is not None:
            raise self.error
        assert self.stream is not None
        return self.stream


REQUEST = GenerateRequest(request_id="r", prompt_token_ids=[1, 2], max_tokens=4)


def test_a_client_leaving_before_the_first_token_cancels_the_engine_stream(tokenizer: Any) -> None:
    async def main() -> int:
        stream = _Stalled()
        generation = Generation(_Client(stream), REQUEST, tokenizer)  # type: ignore[arg-type]
        starting = asyncio.create_task(generation.start())
        await asyncio.sleep(0.01)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        generation.close()  # what the router does next must not cancel twice
        return stream.num_cancels

    assert asyncio.run(main()) == 1


def test_a_refused_admission_is_the_clients_503(tokenizer: Any) -> None:
    refusal = OverloadedError("the engine is at capacity; retry shortly", code="engine_overloaded")

    async def main() -> None:
        generation = Generation(_Client(error=refusal), REQUEST, tokenizer)  # type: ignore[arg-type]
        await generation.start()

    with pytest.raises(OverloadedError) as raised:
        asyncio.run(main())
    assert raised.value.status_code == 503
