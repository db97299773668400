"""Serve's request router for the Engine deployment: `RoutingPolicy` behind Serve's `RequestRouter` hooks, and
the one place that tells this process's engine client which replicas Serve runs (`membership.py`)."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from deployments.transport.policy import (
    ReplicaLoad,
    RoutingConfig,
    RoutingPolicy,
    reported_num_requests,
)

if TYPE_CHECKING:
    from ray.serve._private.replica_result import ReplicaResult  # public, but not in `__all__`


def _request_keys(pending_request: PendingRequest | None) -> tuple[str | None, Sequence[int]]:
    """(session_id, prompt_token_ids) of a pending `Engine.generate(GenerateRequest)` call.

    The session comes from `handle.options(session_id=...)`, else from the GenerateRequest itself.
    Attributes are read duck-typed: this module is cloudpickled into every proxy and handle and should
    not need the rest of `deployments` there.
    """
    if pending_request is None:
        return None, ()
    request = pending_request.args[0] if pending_request.args else None
    prompt_token_ids = getattr(request, "prompt_token_ids", None)
    # Ray 2.55 (the `tensorrt` extra's) has no session id on a handle call: the GenerateRequest's decides.
    session_id = getattr(pending_request.metadata, "session_id", None) or getattr(
        request, "session_id", None
    )
    return (
        session_id if isinstance(session_id, str) and session_id else None,
        prompt_token_ids if isinstance(prompt_token_ids, list | tuple) else (),
    )


class SessionAffinityRouter(RequestRouter):
    """Serve's hooks around `RoutingPolicy`; replicas are keyed by `replica_id.unique_id`.

    No FIFOMixin on purpose: the base router hands a chosen replica to the request it was chosen for
    (matched by internal request id), never to an older queued request of another session.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._policy = RoutingPolicy()
        # Futures of requests already ranked once (see `RoutingPolicy.rank(is_first_pass=...)`); weak, so a
        # request that is cancelled before it is routed leaves nothing behind.
        self._ranked_futures: weakref.WeakSet[asyncio.Future[RunningReplica]] = weakref.WeakSet()

    def initialize_state(self, **kwargs: Any) -> None:
        self._policy = RoutingPolicy(RoutingConfig(**kwargs))

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        is_first_pass = False
        if pending_request is not None:
            # Back off between passes when every rank is full, instead of spinning.
            pending_request.routing_context.should_backoff = True
            is_first_pass = pending_request.future not in self._ranked_futures
            self._ranked_futures.add(pending_request.future)
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        for unique_id, replica in by_id.items():
            self._policy.observe(unique_id, replica.routing_stats)
        loads = [
            ReplicaLoad(
                unique_id, self._num_ongoing_requests(replica), replica.max_ongoing_requests
            )
            for unique_id, replica in by_id.items()
        ]
        session_id, prompt_token_ids = _request_keys(pending_request)
        ranks = self._policy.rank(
            loads,
            session_id=session_id,
            prompt_token_ids=prompt_token_ids,
            is_first_pass=is_first_pass,
        )
        return [[by_id[unique_id] for unique_id in rank] for rank in ranks]

    def _fulfill_next_pending_request(
        self, replica: RunningReplica, request_metadata: Any = None
    ) -> None:
        """Serve indexes pending requests by internal request id, once per id; but the engine calls of one HTTP
        request (n > 1 choices) share their parent's id, so only the first sibling is indexed and the others
        would wait forever. Hand the replica to the oldest unfulfilled sibling instead (Ray 2.60 internals)."""
        if request_metadata is None or self._get_pending_request_matching_internal_request_id(
            request_metadata
        ):
            super()._fulfill_next_pending_request(replica, request_metadata)
            return
        for pending in self._pending_requests_to_fulfill:
            if (
                not pending.future.done()
                and pending.metadata.internal_request_id == request_metadata.internal_request_id
            ):
                # Ray 2.56+ runs one routing task per pending request and stops it here; on 2.55 (the
                # `tensorrt` extra's Ray) routing tasks serve the queue and there is none to stop.
                cancel_routing_task = getattr(
                    self, "_cancel_routing_task_for_pending_request", None
                )
                if cancel_routing_task is not None:
                    cancel_routing_task(pending)
                self._record_queue_wait_time(pending)
                pending.future.set_result(replica)
                return

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        session_id, prompt_token_ids = _request_keys(pending_request)
        self._policy.record_routed(replica_id.unique_id, prompt_token_ids, session_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._policy.retain(replica.replica_id.unique_id for replica in replicas)
        self._publish(replicas=replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._policy.forget(replica_id.unique_id)
        self._publish(removed=replica_id.unique_id)

    def _publish(
        self, replicas: list[RunningReplica] | None = None, removed: str | None = None
    ) -> None:
        """Tells this process's engine client (`client.py`) what Serve told this router."""
        try:
            # Imported at call time, by name: this class travels by value (cloudpickle), and a registry
            # reached through its pickled globals would be a private copy no one else sees.
            from deployments.transport.membership import replica_directory
        except ImportError:  # a process without the `deployments` package has no direct channel
            return
        directory = replica_directory(self._deployment_id.app_name, self._deployment_id.name)
        if replicas is not None:
            directory.update(replicas, self._policy.config)
        if removed is not None:
            directory.remove(removed)

    def _num_ongoing_requests(self, replica: RunningReplica) -> int:
        """The router's live count (sends, completions, replica replies); else the replica's last stats."""
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        if cached is not None:
            return int(cached)
        return reported_num_requests(replica.routing_stats)


_DEFAULTS = RoutingConfig()


def engine_request_router_config(
    *,
    block_size: int = _DEFAULTS.block_size,
    virtual_nodes: int = _DEFAULTS.virtual_nodes,
    load_epsilon: float = _DEFAULTS.load_epsilon,
    imbalance_threshold: int = _DEFAULTS.imbalance_threshold,
    max_prefix_entries: int = _DEFAULTS.max_prefix_entries,
    request_routing_stats_period_s: float = 1.0,
    is_affinity: bool = _DEFAULTS.is_affinity,
    load_slack: int = _DEFAULTS.load_slack,
) -> RequestRouterConfig:
    """`request_router_config` for the Engine deployment; the kwargs are validated here, once, rather than
    in every proxy and handle that builds the router."""
    config = RoutingConfig(
        block_size=block_size,
        virtual_nodes=virtual_nodes,
        load_epsilon=load_epsilon,
        imbalance_threshold=imbalance_threshold,
        max_prefix_entries=max_prefix_entries,
        is_affinity=is_affinity,
        load_slack=load_slack,
    )
    options: dict[str, Any] = {
        "request_router_class": f"{__name__}:{SessionAffinityRouter.__name__}",
        "request_router_kwargs": {
            name: getattr(config, name) for name in RoutingConfig.__dataclass_fields__
        },
        "request_routing_stats_period_s": request_routing_stats_period_s,
    }
    return RequestRouterConfig(**options)
