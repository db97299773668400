"""The Engine deployment: one Executor per replica, streaming token-id deltas to the router."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from deployments.config import EngineConfig
from deployments.executors.base import Executor
from deployments.messages import EngineCapabilities, ExecutorStats, GenerateRequest, TokenDelta

logger = logging.getLogger(__name__)


def create_executor(config: EngineConfig, model_dir: str) -> Executor:
    """The one place that maps `engine.kind` to a backend (imports stay lazy: each pulls heavy libraries)."""
    if config.kind == "transformers":
        from deployments.executors.hf import TransformersExecutor

        return TransformersExecutor(model_dir, config.transformers)
    if config.kind == "emulator":
        from deployments.executors.emulator import EmulatorExecutor

        return EmulatorExecutor(config.emulator, model_dir)
    raise ValueError(f"unknown engine kind {config.kind!r}")


class Engine:
    """Owns one Executor. `generate` forwards whatever the executor has ready, with no batching timer:
    while Ray's stream is busy the executor's collector merges deltas, so items get larger under load."""

    async def __init__(self, config: EngineConfig, model_dir: str) -> None:
        self._executor = create_executor(config, model_dir)
        await self._executor.start()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Yields TokenDelta items until one has a finish reason; cancelling the call cancels the request."""
        async for delta in self._executor.generate(request):
            yield delta

    def capabilities(self) -> EngineCapabilities:
        return self._executor.capabilities

    def stats(self) -> ExecutorStats:
        return self._executor.stats()

    def check_health(self) -> None:
        self._executor.check_health()

    def record_routing_stats(self) -> dict[str, Any]:
        stats = self._executor.stats()
        return {"num_active_requests": stats.num_active_requests, "num_queued_requests": stats.num_queued_requests}

    async def __del__(self) -> None:
        await self._executor.shutdown()


def engine_deployment(config: EngineConfig) -> Any:
    """The Engine class as a Serve deployment, with options computed from the config."""
    return serve.deployment(
        Engine,
        name="Engine",
        num_replicas=config.num_replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        health_check_period_s=config.health_check_period_s,
        ray_actor_options={
            "num_cpus": config.num_cpus_per_replica,
            "num_gpus": config.num_gpus_per_replica,
        },
    )
