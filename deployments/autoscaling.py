"""Serve autoscaling for the two deployments: `AutoscalingConfig` to Serve's `autoscaling_config`, and the
Engine's policy, which counts what its executors hold rather than what Serve's handles sent.

Serve's default policy scales on the requests that pass through its handles and replicas. Most Engine streams
do not (`engine.transport: direct`: the Router opens them on each replica's own channel), so the Engine
replicas report their executor's running and queued requests (`Engine.record_autoscaling_stats`, pushed by
Serve's replica metrics pusher) and `engine_autoscaling_policy` scales on those. The Router's HTTP requests
all pass through Serve's proxy, so the Router keeps Serve's default policy.

This module is cloudpickled by value into Serve's controller: it imports nothing from `deployments`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.serve.config import AutoscalingContext

    from deployments.config import AutoscalingConfig, EngineConfig, RouterConfig

# The custom autoscaling metric each Engine replica reports: requests its executor holds, running or queued.
ENGINE_LOAD_METRIC = "shepherd_engine_requests"
ENGINE_POLICY = f"{__name__}:engine_autoscaling_policy"


def serve_autoscaling_config(
    settings: AutoscalingConfig, *, policy_function: str | None = None
) -> dict[str, Any]:
    """Serve's `autoscaling_config` for a deployment; `policy_function` replaces Serve's default policy."""
    config: dict[str, Any] = settings.model_dump(exclude_none=True)
    if policy_function is not None:
        config["policy"] = {"policy_function": policy_function}
    return config


def engine_autoscaling_policy(ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
    """Serve's queue-length rule on the executors' own counts: as many replicas as hold
    `target_ongoing_requests` each, the requests still queued in Serve's handles included.

    Serve applies the bounds, the delays and the scaling factors around it. Until a replica has reported
    (the first moments after a deploy) the target stays where it is.

    Args:
        ctx: Serve's context; `aggregated_metrics[ENGINE_LOAD_METRIC]` maps each running replica to its load
            averaged over `look_back_period_s`.
    Returns:
        (desired replicas, policy state), as Serve's policies return them.
    """
    loads = (ctx.aggregated_metrics or {}).get(ENGINE_LOAD_METRIC) or {}
    if ctx.current_num_replicas == 0 or not loads or ctx.config is None:
        return ctx.target_num_replicas, {}
    total = sum(loads.values()) + (ctx.total_queued_requests or 0.0)
    return total / ctx.config.get_target_ongoing_requests(), {}


def surge_option(config: EngineConfig | RouterConfig) -> dict[str, int]:
    """Serve's `max_surge_percent` for a deployment, only when set: 0 is Serve's own default, and Ray 2.55 (the
    Ray of the `tensorrt` extra) has no such option, so a config that leaves it alone deploys there too."""
    return {"max_surge_percent": config.max_surge_percent} if config.max_surge_percent else {}
