"""The Engine deployment: one Executor per replica, streaming token-id deltas to the router."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import ray
from ray import serve

from deployments import metrics
from deployments.autoscaling import (
    ENGINE_LOAD_METRIC,
    ENGINE_POLICY,
    serve_autoscaling_config,
    surge_option,
)
from deployments.config import EngineConfig
from deployments.executors.base import Executor
from deployments.messages import EngineCapabilities, EngineStats, GenerateRequest, TokenDelta
from deployments.placement import engine_deployment_options
from deployments.transport.channel import ChannelServer
from deployments.transport.membership import channel_metadata
from deployments.transport.serve_router import engine_request_router_config
from deployments.transport.wire import WIRE_VERSION

logger = logging.getLogger(__name__)

# How long a stopping replica lets its routers' direct streams finish (Serve drains only its own requests,
# and stops waiting for `__del__` after its graceful shutdown timeout, 20 s by default).
_CHANNEL_DRAIN_TIMEOUT_S = 15.0


def create_executor(config: EngineConfig, model_dir: str) -> Executor:
    """The one place that maps `engine.kind` to a backend (imports stay lazy: each pulls heavy libraries)."""
    if config.kind == "transformers":
        from deployments.executors.hf import TransformersExecutor

        settings = config.transformers
        if settings.device == "auto" and config.num_gpus_per_replica == 0:
            # Ray leaves CUDA_VISIBLE_DEVICES alone for a replica that reserved no GPU: don't take one anyway.
            settings = settings.model_copy(update={"device": "cpu"})
        # A replica holds one GPU per rank, or a share of one (Ray's fractional GPUs).
        gpu_fraction = min(1.0, config.num_gpus_per_replica) or 1.0
        return TransformersExecutor(model_dir, settings, gpu_fraction=gpu_fraction)
    if config.kind == "trtllm":
        from deployments.executors.trtllm_config import resolve_backend

        if resolve_backend(config.trtllm, model_dir) == "pytorch":
            from deployments.executors.trtllm_llmapi import TrtllmLlmApiExecutor

            return TrtllmLlmApiExecutor(config.trtllm, model_dir)
        from deployments.executors.trtllm import TrtllmExecutor

        engine_dir = config.trtllm.engine_dir or model_dir
        return TrtllmExecutor(config.trtllm.model_copy(update={"engine_dir": engine_dir}))
    if config.kind == "emulator":
        from deployments.executors.emulator import EmulatorExecutor

        return EmulatorExecutor(config.emulator, model_dir)
    if config.kind == "scripted":
        from deployments.executors.scripted import ScriptedExecutor

        return ScriptedExecutor(config.scripted, model_dir)
    raise ValueError(f"unknown engine kind {config.kind!r}")


class Engine:
    """Owns one Executor. `generate` forwards what the executor has ready, with no batching timer: while
    the stream is busy the executor's collector merges deltas, so items get larger under load, and after
    the first token it waits for `stream_interval_tokens` tokens (a count; `executors/base.py`).

    With `engine.transport: direct` routers reach `generate` over this replica's channel
    (`transport/channel.py`), whose address Serve hands to them as replica metadata; Serve's handle path
    stays open for every method, `generate` included.
    """

    async def __init__(self, config: EngineConfig, model_dir: str) -> None:  # type: ignore[misc]
        # Serve awaits an async constructor; mypy accepts only a plain one (the ignore above).
        self._channel: ChannelServer | None = None  # first: `__del__` runs even if the rest fails
        self._channel_address: str | None = None
        self._stream_interval_tokens = config.stream_interval_tokens
        self._executor = create_executor(config, model_dir)
        await self._executor.start()
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        engine_metrics = metrics.EngineMetrics()
        self._metrics_task = metrics.start_polling(
            lambda: engine_metrics.update(self._executor.stats())
        )
        if config.transport == "direct":
            self._channel = ChannelServer(self.generate)
            self._channel_address = await self._channel.start(ray.util.get_node_ip_address())

    def record_replica_metadata(self) -> dict[str, Any]:
        """Serve's static per-replica metadata, read by every router of this deployment (transport/)."""
        if self._channel_address is None:
            return {}
        return channel_metadata(self._channel_address, WIRE_VERSION)

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[TokenDelta, None]:
        """Yields TokenDelta items until one has a finish reason; cancelling the call cancels the request."""
        deltas = self._executor.generate(
            request, stream_interval_tokens=self._stream_interval_tokens
        )
        async with aclosing(deltas):  # Serve closing this generator must reach the executor's
            async for delta in deltas:
                yield delta

    def capabilities(self) -> EngineCapabilities:
        return self._executor.capabilities

    def stats(self) -> EngineStats:
        """This replica's counters, for operators (a handle call): the executor's and its channel's."""
        channel = self._channel
        return EngineStats(
            replica_id=self._replica_id,
            executor=self._executor.stats(),
            channel_address=self._channel_address,
            num_channel_streams_served=0 if channel is None else channel.num_streams_served,
            num_channel_streams_active=0 if channel is None else channel.num_active_streams,
        )

    def check_health(self) -> None:
        self._executor.check_health()

    def record_routing_stats(self) -> dict[str, Any]:
        """Polled by Serve for the request router (transport/serve_router.py)."""
        stats = self._executor.stats()
        routing: dict[str, Any] = {
            "num_active_requests": stats.num_active_requests,
            "num_queued_requests": stats.num_queued_requests,
        }
        # TensorRT-LLM executors also report the KV blocks they hold (`kv_block_hashes`, in the
        # router's own chained block hashes), for routing on real cache contents.
        kv_blocks = getattr(self._executor, "routing_stats", None)
        if kv_blocks is not None:
            routing["kv_blocks"] = kv_blocks()
        return routing

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Pushed to Serve's controller for `engine.autoscaling` (autoscaling.py): every request the executor
        holds, whichever path it came by (Serve's own count misses the direct channel's)."""
        stats = self._executor.stats()
        return {ENGINE_LOAD_METRIC: stats.num_active_requests + stats.num_queued_requests}

    async def __del__(self) -> None:
        if self._channel is not None:
            await self._channel.close(drain_timeout_s=_CHANNEL_DRAIN_TIMEOUT_S)
        executor = getattr(self, "_executor", None)
        if executor is not None:
            await executor.shutdown()


def engine_deployment(config: EngineConfig, model_dir: str) -> Any:
    """The Engine class as a Serve deployment, with options computed from the config (and, for TensorRT-LLM,
    from the engine's own parallel layout: a TP group is one placement-group bundle on one node)."""
    tensor_parallel_size = (
        config.transformers.tensor_parallel_size if config.kind == "transformers" else 1
    )
    # Predicted blocks match the engine's KV block size: transformers' page size, the emulator's and
    # TensorRT-LLM's tokens per block.
    block_size = config.transformers.page_size
    if config.kind == "emulator":
        block_size = config.emulator.tokens_per_block
    if config.kind == "trtllm":
        from deployments.executors.trtllm_config import read_engine_layout, resolve_backend

        settings = config.trtllm
        if resolve_backend(settings, model_dir) == "pytorch":
            tensor_parallel_size = settings.tensor_parallel_size
            world_size = tensor_parallel_size * settings.pipeline_parallel_size
            block_size = settings.tokens_per_block
            what = f"tensor_parallel_size * pipeline_parallel_size is {world_size}"
        else:
            layout = read_engine_layout(settings.engine_dir or model_dir)
            tensor_parallel_size, world_size = layout.tp_size, layout.world_size
            block_size = layout.tokens_per_block
            what = f"the engine has {world_size} ranks (tp={layout.tp_size}, pp={layout.pp_size})"
        if config.num_gpus_per_replica != world_size:
            raise ValueError(f"{what}; set engine.num_gpus_per_replica: {world_size}")
    options = engine_deployment_options(
        num_gpus=config.num_gpus_per_replica,
        num_cpus=config.num_cpus_per_replica,
        tensor_parallel_size=tensor_parallel_size,
        uses_mpi=config.kind == "trtllm" or tensor_parallel_size > 1,
        custom_resources=config.custom_resources,
    )
    if config.autoscaling is None:
        options["num_replicas"] = config.num_replicas
    else:
        options["autoscaling_config"] = serve_autoscaling_config(
            config.autoscaling, policy_function=ENGINE_POLICY
        )
    # Our request router for both policies: it also tells the direct channel which replicas run.
    options["request_router_config"] = engine_request_router_config(
        block_size=block_size,
        is_affinity=config.request_router == "session_affinity",
        request_routing_stats_period_s=config.routing_stats_period_s,
    )
    options.update(surge_option(config))
    return serve.deployment(
        Engine,
        name="Engine",
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        health_check_period_s=config.health_check_period_s,
        # Serve sleeps this long before it first counts a stopping replica's requests (its default is 2 s),
        # so every stop, and every replacement waiting for the stopped replica's resources, paid 2 s.
        graceful_shutdown_wait_loop_s=0.5,
        **options,
    )
