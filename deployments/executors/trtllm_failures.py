"""How TensorRT-LLM fails, for both backends: an engine that never finishes loading, and errors that
leave the engine unusable although its loop goes on."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from deployments.errors import EngineDead, EngineError, OverloadedError, ServingError

T = TypeVar("T")

_QUEUE_FULL = "Maximum queue size"
_SHUTDOWN = ("Shutdown called", "LLM is shutting down")


async def load_with_timeout(load: Callable[[], T], *, timeout_s: float, what: str) -> T:
    """Runs a blocking engine load on a daemon thread and waits at most `timeout_s` for it.

    The load cannot be interrupted: in orchestrator mode the C++ constructor waits in `MPI_Barrier`
    for every spawned rank, and a rank that failed to load its engine never arrives
    (executorWorker.cpp has no try/catch around the load). The thread is a daemon so that a stuck
    load never holds up interpreter exit; the replica is expected to be replaced.

    Raises:
        EngineError: the load failed, or did not finish within `timeout_s`.
    """
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(load())
        except BaseException as exc:  # handed to the awaiting coroutine
            future.set_exception(exc)

    threading.Thread(target=run, name="trtllm-load", daemon=True).start()
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
    except TimeoutError:
        raise EngineError(
            f"{what} did not start within {timeout_s:g} s (engine.trtllm.engine_start_timeout_s). "
            "With tensor parallelism this usually means an MPI worker failed to load its engine "
            "and never reached the barrier the engine waits on: look for the worker's error in "
            "this replica's log (out of GPU memory, a missing rank engine file, a CUDA error)."
        ) from None


def classify_engine_error(message: str, fatal_patterns: Sequence[str]) -> ServingError:
    """The contract's error for an engine error message.

    A full queue is a 503 to retry; "Shutdown called" and sticky device errors (CUDA, NCCL) mean the
    engine can serve nothing more; anything else failed only this request.
    """
    if _QUEUE_FULL in message:
        return OverloadedError(message)
    if any(marker in message for marker in _SHUTDOWN) or is_fatal(message, fatal_patterns):
        return EngineDead(message)
    return EngineError(message)


def is_fatal(message: str, fatal_patterns: Sequence[str]) -> bool:
    return any(pattern in message for pattern in fatal_patterns)
