"""The Engine deployment: one Executor per replica, streaming token-id deltas to the router."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve

from deployments import metrics
from deployments.config import EngineConfig
from deployments.engine_core import EngineCore
from deployments.engine_core_process import EngineCoreProcess
from deployments.messages import EngineCapabilities, ExecutorStats, GenerateRequest, TokenDelta
from deployments.placement import engine_deployment_options
from deployments.replica_directory import CHANNEL_METADATA_KEY
from deployments.routing import engine_request_router_config

logger = logging.getLogger(__name__)

# How long a stopping replica lets its routers' direct streams finish (Serve drains only its own requests,
# and stops waiting for `__del__` after its graceful shutdown timeout, 20 s by default).
_CHANNEL_DRAIN_TIMEOUT_S = 15.0


class Engine:
    """Serve's side of one engine core (`engine_core.py`): placement, health, routing stats, metrics, and
    `generate` on Serve's handle path. The core runs in this replica or, with
    `engine.executor_process: subprocess`, in a child process whose executor thread then has a GIL of its own.

    With `engine.transport: direct` routers stream from the core's channel (`engine_channel.py`), whose
    address Serve hands to them as replica metadata; Serve's handle path stays open for every method,
    `generate` included.
    """

    async def __init__(self, config: EngineConfig, model_dir: str) -> None:
        self._core: EngineCore | EngineCoreProcess | None = (
            None  # first: `__del__` runs even if the rest fails
        )
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        core_class = EngineCoreProcess if config.executor_process == "subprocess" else EngineCore
        core = core_class(config, model_dir, self._replica_id)
        self._core = core
        channel_host = ray.util.get_node_ip_address() if config.transport == "direct" else None
        await core.start(channel_host)
        engine_metrics = metrics.EngineMetrics()

        async def update_metrics() -> None:
            engine_metrics.update(await core.stats())

        self._metrics_task = metrics.start_polling(update_metrics)

    def record_replica_metadata(self) -> dict[str, Any]:
        """Serve's static per-replica metadata, read by every router of this deployment (routing.py)."""
        address = None if self._core is None else self._core.channel_address
        if address is None:
            return {}
        return {CHANNEL_METADATA_KEY: address}

    async def channel_stats(self) -> dict[str, Any]:
        return await self._require_core().channel_stats()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Yields TokenDelta items until one has a finish reason; cancelling the call cancels the request."""
        async for delta in self._require_core().generate(request):
            yield delta

    async def recent_requests(self) -> list[dict[str, Any]]:
        return await self._require_core().recent_requests()

    def capabilities(self) -> EngineCapabilities:
        return self._require_core().capabilities

    async def stats(self) -> ExecutorStats:
        return await self._require_core().stats()

    async def check_health(self) -> None:
        await self._require_core().check_health()

    async def record_routing_stats(self) -> dict[str, Any]:
        """Polled by Serve for the request router (deployments.routing)."""
        stats = await self._require_core().stats()
        return {
            "num_active_requests": stats.num_active_requests,
            "num_queued_requests": stats.num_queued_requests,
        }

    async def __del__(self) -> None:
        if self._core is not None:
            await self._core.close(drain_timeout_s=_CHANNEL_DRAIN_TIMEOUT_S)

    def _require_core(self) -> EngineCore | EngineCoreProcess:
        assert self._core is not None, "the Engine replica did not start"
        return self._core


def engine_deployment(config: EngineConfig, model_dir: str) -> Any:
    """The Engine class as a Serve deployment, with options computed from the config (and, for TensorRT-LLM,
    from the engine's own parallel layout: a TP group is one placement-group bundle on one node)."""
    tensor_parallel_size = 1
    # Predicted blocks match the engine's KV block size: transformers' page size, TensorRT-LLM's tokens per block.
    block_size = config.transformers.page_size
    if config.kind == "trtllm":
        from deployments.executors.trtllm_config import read_engine_layout

        layout = read_engine_layout(config.trtllm.engine_dir or model_dir)
        tensor_parallel_size = layout.tp_size
        block_size = layout.tokens_per_block
        if config.num_gpus_per_replica != layout.world_size:
            raise ValueError(
                f"the engine has {layout.world_size} ranks (tp={layout.tp_size}, pp={layout.pp_size}); "
                f"set engine.num_gpus_per_replica: {layout.world_size}"
            )
    options = engine_deployment_options(
        num_gpus=config.num_gpus_per_replica,
        num_cpus=config.num_cpus_per_replica,
        tensor_parallel_size=tensor_parallel_size,
        uses_mpi=config.kind == "trtllm",
    )
    # Our request router for both policies: it also tells the direct channel which replicas run.
    options["request_router_config"] = engine_request_router_config(
        block_size=block_size, is_affinity=config.request_router == "session_affinity"
    )
    return serve.deployment(
        Engine,
        name="Engine",
        num_replicas=config.num_replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        health_check_period_s=config.health_check_period_s,
        **options,
    )
