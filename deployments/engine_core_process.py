"""The Engine replica's handle on an engine core running in its own child process
(`engine.executor_process: subprocess`; the child's side is `engine_core.py`).

Routers stream from the child's channel directly; the replica keeps what Serve needs (metadata, health,
routing stats, metrics, the handle path) and reaches the child over the same channel for it. The child
dies with the replica: it stops at once when its stdin closes without a "drain" command.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from deployments import errors
from deployments.config import EngineConfig
from deployments.engine_channel import ChannelConnection
from deployments.engine_core import DRAIN_COMMAND
from deployments.messages import EngineCapabilities, ExecutorStats, GenerateRequest, TokenDelta

logger = logging.getLogger(__name__)

_CONNECT_TIMEOUT_S = 5.0
# A core that cannot answer within this is as good as dead to Serve's health check (its own timeout is 30 s).
_QUERY_TIMEOUT_S = 10.0
# Where `deployments` lives, for a child started outside Ray's worker setup (a runtime_env working_dir).
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


class EngineCoreProcess:
    """Starts `python -m deployments.engine_core` and speaks to it; the same coroutines as `EngineCore`."""

    def __init__(self, config: EngineConfig, model_dir: str, replica_id: str) -> None:
        self._config = config
        self._model_dir = model_dir
        self._replica_id = replica_id
        self._process: asyncio.subprocess.Process | None = None
        self._connection: ChannelConnection | None = None
        self._capabilities = EngineCapabilities()
        self.channel_address: str | None = None
        self.is_channel_public = False

    @property
    def capabilities(self) -> EngineCapabilities:
        return self._capabilities

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    async def start(self, channel_host: str | None) -> None:
        """Starts the child and waits until it serves. Without a host for routers, its channel listens on
        loopback for this replica alone (`channel_address` stays None: nothing to announce)."""
        spec: dict[str, Any] = {
            "config": self._config.model_dump(mode="json"),
            "model_dir": self._model_dir,
            "replica_id": self._replica_id,
            "channel_host": channel_host or "127.0.0.1",
        }
        read_fd, write_fd = os.pipe()
        spec["ready_fd"] = write_fd
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "deployments.engine_core",
                stdin=asyncio.subprocess.PIPE,
                env=env,
                pass_fds=(write_fd,),
            )
        finally:
            os.close(write_fd)
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps(spec).encode() + b"\n")
        ready = await asyncio.to_thread(_read_line, read_fd)
        if not ready:
            code = await self._process.wait()
            raise errors.EngineDead(
                f"the engine core process exited with code {code} before serving (see this replica's log)"
            )
        announced = json.loads(ready)
        self._capabilities = EngineCapabilities(**announced["capabilities"])
        connection = ChannelConnection(announced["address"])
        await connection.connect(_CONNECT_TIMEOUT_S)
        self._connection = connection
        if channel_host is not None:
            self.channel_address = announced["address"]
        logger.info("engine core process %s serves at %s", self._process.pid, announced["address"])

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Serve's handle path: the replica relays the child's stream."""
        stream = self._require_connection().open(request, on_done=_nothing)
        try:
            async for delta in stream:
                yield delta
        finally:
            stream.cancel()  # nothing once the final delta arrived; else the child cancels the request

    async def stats(self) -> ExecutorStats:
        return ExecutorStats(**await self._query("stats"))

    async def check_health(self) -> None:
        await self._query("check_health")

    async def recent_requests(self) -> list[dict[str, Any]]:
        answer: list[dict[str, Any]] = await self._query("recent_requests")
        return answer

    async def channel_stats(self) -> dict[str, Any]:
        answer: dict[str, Any] = await self._query("channel_stats")
        return {**answer, "address": self.channel_address}

    async def close(self, drain_timeout_s: float) -> None:
        """Asks the child to drain its streams for up to `drain_timeout_s`, then waits for it to exit."""
        process = self._process
        if self._connection is not None:
            self._connection.close("the engine replica is stopping")
        if process is None or process.returncode is not None:
            return
        assert process.stdin is not None
        try:
            process.stdin.write(f"{DRAIN_COMMAND} {drain_timeout_s}\n".encode())
            await process.stdin.drain()
            process.stdin.close()
            await asyncio.wait_for(process.wait(), drain_timeout_s + 30.0)
        except (TimeoutError, ConnectionError):
            logger.warning("the engine core process %s did not stop: killing it", process.pid)
            process.kill()
            await process.wait()

    async def _query(self, name: str) -> Any:
        return await self._require_connection().query(name, _QUERY_TIMEOUT_S)

    def _require_connection(self) -> ChannelConnection:
        process = self._process
        if process is not None and process.returncode is not None:
            raise errors.EngineDead(
                f"the engine core process exited with code {process.returncode}"
            )
        if self._connection is None or self._connection.is_closed:
            raise errors.EngineDead("the engine core process is not reachable")
        return self._connection


def _nothing() -> None:
    pass


def _read_line(fd: int) -> str:
    """The child's ready line, or "" once it closed the pipe without one (it failed to start)."""
    with os.fdopen(fd, "rb") as pipe:
        return pipe.readline().decode()
