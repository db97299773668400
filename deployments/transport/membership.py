"""Which Engine replicas Serve runs, per process: written by the engine handle's request router
(`serve_router.py`), read by the Router's engine client (`client.py`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from deployments.transport.policy import RoutingConfig

if TYPE_CHECKING:
    from ray.serve.request_router import RunningReplica

logger = logging.getLogger(__name__)
CHANNEL_METADATA_KEY = "engine_channel"
WIRE_VERSION_METADATA_KEY = "engine_channel_wire"
# Routers act on a death as soon as they hear of it (`remove` notifies them), so only recent ids matter.
_MAX_DIED_IDS = 4096


def channel_metadata(address: str, wire_version: str) -> dict[str, Any]:
    """What an Engine replica tells Serve about its channel (`Engine.record_replica_metadata`)."""
    return {CHANNEL_METADATA_KEY: address, WIRE_VERSION_METADATA_KEY: wire_version}


def _replica_metadata(replica: RunningReplica) -> dict[str, Any]:
    """Ray 2.55 (the `tensorrt` extra's) has no replica metadata (nor `record_replica_metadata`): its
    replicas announce no channel, and the Router reaches them through Serve's handle path."""
    metadata = getattr(replica, "replica_metadata", None)
    return metadata if isinstance(metadata, dict) else {}


class ReplicaDirectory:
    """The Engine replicas Serve runs, as this process's request router last heard, and the routing settings
    of the deployment: Serve stays the one source of membership (starts, health checks, replacements), and
    the engine client (`client.py`) ranks the replicas with a policy of its own built from those settings.

    `channel_address` comes from each replica's `record_replica_metadata` (static, known once it is ready).
    """

    def __init__(self) -> None:
        self.replicas: dict[str, RunningReplica] = {}
        self.routing_config: RoutingConfig | None = None
        # Replicas whose actor died (their connections close at once), oldest first.
        self.died: dict[str, None] = {}
        self._listeners: list[Callable[[], None]] = []

    @staticmethod
    def channel_address(replica: RunningReplica) -> str | None:
        address = _replica_metadata(replica).get(CHANNEL_METADATA_KEY)
        return address if isinstance(address, str) else None

    @staticmethod
    def wire_version(replica: RunningReplica) -> str | None:
        """None from replicas of releases that announced no version."""
        version = _replica_metadata(replica).get(WIRE_VERSION_METADATA_KEY)
        return version if isinstance(version, str) else None

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def update(self, replicas: Iterable[RunningReplica], routing_config: RoutingConfig) -> None:
        self.replicas = {replica.replica_id.unique_id: replica for replica in replicas}
        self.routing_config = routing_config
        self._notify()

    def remove(self, replica_id: str) -> None:
        """Serve saw the replica's actor die."""
        self.died[replica_id] = None
        if len(self.died) > _MAX_DIED_IDS:
            del self.died[next(iter(self.died))]
        if self.replicas.pop(replica_id, None) is not None:
            self._notify()

    def _notify(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:  # never into Serve's request router, which called us
                logger.exception("a replica directory listener failed")


_DIRECTORIES: dict[tuple[str, str], ReplicaDirectory] = {}


def replica_directory(app_name: str, deployment_name: str) -> ReplicaDirectory:
    """This process's directory for one deployment (created empty until its request router reports)."""
    key = (app_name, deployment_name)
    directory = _DIRECTORIES.get(key)
    if directory is None:
        directory = _DIRECTORIES[key] = ReplicaDirectory()
    return directory
