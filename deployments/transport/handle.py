"""Serve's handle path to the Engine: `generate.remote` with the session id Serve's request router reads,
and Ray's exceptions turned into ours, so that the Router sees one kind of stream and one error tree."""

from __future__ import annotations

import inspect
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments.errors import EngineDead, EngineError, OverloadedError, ServingError
from deployments.messages import GenerateRequest, TokenDelta

# Ray 2.55 (the `tensorrt` extra's) has no `session_id` handle option; SessionAffinityRouter then reads the
# session from the GenerateRequest itself.
HANDLE_TAKES_SESSION_ID = "session_id" in inspect.signature(DeploymentHandle.options).parameters


def to_serving_error(error: BaseException) -> ServingError:
    """Errors raised by the engine replica arrive wrapped by Ray; recover ours, name the rest."""
    if isinstance(error, ServingError):
        return error
    cause = getattr(error, "cause", None)
    if isinstance(cause, ServingError):
        return cause
    if isinstance(error, BackPressureError):
        # Serve's queue for the engine is full (engine.max_queued_requests): a 503 to retry, not a 500.
        return OverloadedError("the engine is at capacity; retry shortly", code="engine_overloaded")
    if isinstance(error, ActorDiedError | ActorUnavailableError | RayActorError):
        return EngineDead(f"the engine replica became unavailable: {type(error).__name__}")
    return EngineError(f"the engine failed: {type(error).__name__}: {error}")


class HandleStream:
    """One `Engine.generate` call through Serve's handle: its deltas, with Ray's errors translated."""

    __slots__ = ("_response",)

    def __init__(self, handle: Any, request: GenerateRequest) -> None:
        if request.session_id and HANDLE_TAKES_SESSION_ID:
            handle = handle.options(session_id=request.session_id)
        self._response = handle.generate.remote(request)

    def __aiter__(self) -> HandleStream:
        return self

    async def __anext__(self) -> TokenDelta:
        try:
            delta: TokenDelta = await self._response.__anext__()
        except (StopAsyncIteration, ServingError):
            raise
        except Exception as error:
            raise to_serving_error(error) from error
        return delta

    def cancel(self) -> None:
        self._response.cancel()
