"""The engine core: one Executor, the channel its token streams leave by, and the questions the Engine
replica asks of it (stats, health, recent requests).

It runs inside the Engine replica (`engine.executor_process: replica`) or in a child process of it
(`subprocess`, `engine_core_process.py`). In the replica, the executor's thread shares one GIL with the
replica's event loop, Ray's core worker and Serve's own tasks; the transformers engine's step is mostly
Python, so every millisecond they hold the GIL is a millisecond of decoding lost (benchmarks/RESULTS.md,
R4). vLLM V1 splits its API server and engine core the same way.

`python -m deployments.engine_core` is the child's entry point. Its contract with the parent:
  stdin      first line: a JSON spec {"config": EngineConfig, "model_dir", "replica_id", "channel_host",
             "ready_fd"}; then "drain <seconds>": finish running streams for up to that long, refusing new
             ones, and exit; end of file instead: the parent died, so stop at once and free the accelerator
  ready_fd   the child writes one JSON line there once serving: {"address", "capabilities"}; a child that
             fails to start just exits, closing it
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import asdict
from typing import Any

from deployments.config import EngineConfig
from deployments.engine_channel import ChannelServer
from deployments.executors.base import Executor
from deployments.messages import EngineCapabilities, ExecutorStats, GenerateRequest, TokenDelta

logger = logging.getLogger(__name__)

_NUM_RECENT_REQUESTS = 64
DRAIN_COMMAND = "drain"


def create_executor(config: EngineConfig, model_dir: str) -> Executor:
    """The one place that maps `engine.kind` to a backend (imports stay lazy: each pulls heavy libraries)."""
    if config.kind == "transformers":
        from deployments.executors.hf import TransformersExecutor

        settings = config.transformers
        if settings.device == "auto" and config.num_gpus_per_replica == 0:
            # Ray leaves CUDA_VISIBLE_DEVICES alone for a replica that reserved no GPU: don't take one anyway.
            settings = settings.model_copy(update={"device": "cpu"})
        return TransformersExecutor(model_dir, settings)
    if config.kind == "trtllm":
        from deployments.executors.trtllm import TrtllmExecutor

        engine_dir = config.trtllm.engine_dir or model_dir
        return TrtllmExecutor(config.trtllm.model_copy(update={"engine_dir": engine_dir}))
    if config.kind == "emulator":
        from deployments.executors.emulator import EmulatorExecutor

        return EmulatorExecutor(config.emulator, model_dir)
    raise ValueError(f"unknown engine kind {config.kind!r}")


class EngineCore:
    """Owns one Executor. `generate` forwards what the executor has ready, with no batching timer: while
    the stream is busy the executor's collector merges deltas, so items get larger under load, and after
    the first token it waits for `stream_interval_tokens` tokens (a count; `executors/base.py`).

    The accessors are coroutines so that `EngineCoreProcess`, which asks a child process, fits the same slot.
    """

    def __init__(self, config: EngineConfig, model_dir: str, replica_id: str) -> None:
        self._channel: ChannelServer | None = None
        self.channel_address: str | None = None
        self._stream_interval_tokens = config.stream_interval_tokens
        self._replica_id = replica_id
        self.executor = create_executor(config, model_dir)
        # What this replica was asked recently: lets operators and tests see prefix reuse and session routing.
        self._recent: deque[dict[str, Any]] = deque(maxlen=_NUM_RECENT_REQUESTS)

    @property
    def capabilities(self) -> EngineCapabilities:
        return self.executor.capabilities

    async def start(self, channel_host: str | None) -> None:
        """Starts the executor, then (with a host) the channel routers stream from."""
        await self.executor.start()
        if channel_host is not None:
            self._channel = ChannelServer(
                self.generate,
                queries={
                    "stats": self._stats_dict,
                    "check_health": self._health,
                    "recent_requests": self.recent_requests,
                    "channel_stats": self.channel_stats,
                },
            )
            self.channel_address = await self._channel.start(channel_host)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Yields TokenDelta items until one has a finish reason; cancelling the call cancels the request."""
        self._recent.append(
            {
                "request_id": request.request_id,
                "session_id": request.session_id,
                "prompt_token_ids": request.prompt_token_ids,
                "replica_id": self._replica_id,
            }
        )
        deltas = self.executor.generate(
            request, stream_interval_tokens=self._stream_interval_tokens
        )
        async with aclosing(deltas):  # a caller closing this generator must reach the executor's
            async for delta in deltas:
                yield delta

    async def stats(self) -> ExecutorStats:
        return self.executor.stats()

    async def check_health(self) -> None:
        self.executor.check_health()

    async def recent_requests(self) -> list[dict[str, Any]]:
        return list(self._recent)

    async def channel_stats(self) -> dict[str, Any]:
        channel = self._channel
        return {
            "address": self.channel_address,
            "pid": os.getpid(),
            "num_streams_served": 0 if channel is None else channel.num_streams_served,
            "num_active_streams": 0 if channel is None else channel.num_active_streams,
        }

    async def close(self, drain_timeout_s: float) -> None:
        """Lets running streams finish for up to `drain_timeout_s` (new ones are refused), then stops."""
        if self._channel is not None:
            await self._channel.close(drain_timeout_s=drain_timeout_s)
        await self.executor.shutdown()

    async def _stats_dict(self) -> dict[str, Any]:
        return asdict(self.executor.stats())

    async def _health(self) -> None:
        self.executor.check_health()


# ---- the child process ----------------------------------------------------------------------------------
async def _serve() -> None:
    stdin = asyncio.StreamReader(limit=64 << 20)
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    spec = json.loads(await stdin.readline())
    config = EngineConfig.model_validate(spec["config"])
    core = EngineCore(config, spec["model_dir"], spec["replica_id"])
    await core.start(spec["channel_host"])
    with os.fdopen(spec["ready_fd"], "w") as ready:
        ready.write(
            json.dumps({"address": core.channel_address, "capabilities": asdict(core.capabilities)})
            + "\n"
        )
    command = (await stdin.readline()).decode().split()
    drain_timeout_s = 0.0
    if command[:1] == [DRAIN_COMMAND]:
        drain_timeout_s = float(command[1])
    else:
        logger.warning("the Engine replica that started this engine core is gone: stopping now")
    await core.close(drain_timeout_s=drain_timeout_s)


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s engine-core %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(_serve())
    except Exception:
        logger.exception("the engine core failed")
        sys.exit(1)


if __name__ == "__main__":
    main()
