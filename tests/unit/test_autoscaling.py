"""`engine.autoscaling` / `router.autoscaling`: validation, the options Serve gets, and the Engine's policy
run on Serve's own context, wrapper and (de)serialization."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from deployments.app import router_deployment_options
from deployments.autoscaling import (
    ENGINE_LOAD_METRIC,
    ENGINE_POLICY,
    engine_autoscaling_policy,
    serve_autoscaling_config,
)
from deployments.config import AppConfig, AutoscalingConfig, EngineConfig, RouterConfig
from deployments.engine import engine_deployment

SCALING = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}


@pytest.mark.parametrize("section", ["engine", "router"])
def test_num_replicas_and_autoscaling_are_mutually_exclusive(section: str) -> None:
    with pytest.raises(ValidationError, match=f"{section}.num_replicas and {section}.autoscaling"):
        AppConfig.model_validate({section: {"num_replicas": 2, "autoscaling": SCALING}})
    # Left at its default, num_replicas does not count as set.
    config = AppConfig.model_validate({section: {"autoscaling": SCALING}})
    assert getattr(config, section).autoscaling.max_replicas == 4


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"min_replicas": 3, "max_replicas": 2}, "max_replicas"),
        ({"min_replicas": 1, "max_replicas": 2, "initial_replicas": 3}, "initial_replicas"),
        ({"min_replicas": 0, "max_replicas": 2}, "min_replicas"),
        ({"min_replicas": 1}, "max_replicas"),
        ({"max_replicas": 2, "target_ongoing_requests": 0}, "target_ongoing_requests"),
        ({"max_replicas": 2, "upscale_delay": 1}, "upscale_delay"),
    ],
)
def test_bad_autoscaling_settings_are_rejected_naming_the_field(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        AppConfig.model_validate({"engine": {"autoscaling": fields}})


def test_serve_accepts_the_autoscaling_config_we_build() -> None:
    from ray.serve.config import AutoscalingConfig as ServeAutoscalingConfig

    settings = AutoscalingConfig(
        min_replicas=2, max_replicas=6, initial_replicas=3, upscale_delay_s=1, downscale_delay_s=5
    )
    config = serve_autoscaling_config(settings, policy_function=ENGINE_POLICY)
    assert "upscaling_factor" not in config  # unset: Serve's own default
    serve_config = ServeAutoscalingConfig(**config)
    assert (serve_config.min_replicas, serve_config.max_replicas) == (2, 6)
    assert serve_config.initial_replicas == 3
    assert (serve_config.upscale_delay_s, serve_config.downscale_delay_s) == (1, 5)
    assert serve_config.policy.policy_function == ENGINE_POLICY
    # Serve cloudpickles the policy by value into its controller: what comes back is our policy.
    assert serve_config.policy.get_policy().__name__ == engine_autoscaling_policy.__name__


def test_how_often_replicas_report_their_load_reaches_serve() -> None:
    from ray.serve.config import AutoscalingConfig as ServeAutoscalingConfig

    settings = AutoscalingConfig(max_replicas=3, look_back_period_s=2, metrics_interval_s=0.5)
    with pytest.warns(DeprecationWarning, match="metrics_interval_s"):
        serve_config = ServeAutoscalingConfig(**serve_autoscaling_config(settings))
    assert serve_config.metrics_interval_s == 0.5
    assert "metrics_interval_s" not in serve_autoscaling_config(AutoscalingConfig(max_replicas=3))


def test_engine_deployment_takes_autoscaling_instead_of_a_replica_count(tmp_path: Any) -> None:
    fixed = engine_deployment(EngineConfig(kind="emulator", num_replicas=3), str(tmp_path))
    assert fixed._deployment_config.num_replicas == 3
    assert fixed._deployment_config.autoscaling_config is None
    config = EngineConfig(kind="emulator", autoscaling=AutoscalingConfig(**SCALING))
    scaled = engine_deployment(config, str(tmp_path))
    autoscaling = scaled._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 4)
    assert autoscaling.target_ongoing_requests == 8
    assert autoscaling.policy.policy_function == ENGINE_POLICY


def test_router_keeps_serves_default_policy_and_its_custom_resources() -> None:
    options = router_deployment_options(
        RouterConfig(autoscaling=AutoscalingConfig(**SCALING), custom_resources={"cpu_node": 1})
    )
    assert "num_replicas" not in options
    assert "policy" not in options["autoscaling_config"]
    assert options["ray_actor_options"]["resources"] == {"cpu_node": 1}
    assert router_deployment_options(RouterConfig(num_replicas=2))["num_replicas"] == 2


def test_surge_replicas_reach_serve_only_when_set(tmp_path: Any) -> None:
    """0 is Serve's default; leaving the option out lets a Ray without it (2.55, the `tensorrt` extra's) deploy."""
    assert "max_surge_percent" not in router_deployment_options(RouterConfig())
    assert router_deployment_options(RouterConfig(max_surge_percent=50))["max_surge_percent"] == 50
    surged = engine_deployment(EngineConfig(kind="emulator", max_surge_percent=25), str(tmp_path))
    assert surged._deployment_config.max_surge_percent == 25
    plain = engine_deployment(EngineConfig(kind="emulator"), str(tmp_path))
    assert plain._deployment_config.max_surge_percent == 0


# ---- the Engine's policy, on Serve's context and inside Serve's wrapper (bounds, delays) ----------------
def _context(
    loads: dict[str, float] | None,
    *,
    current: int,
    target: int | None = None,
    queued: float = 0.0,
    settings: dict[str, Any] | None = None,
) -> Any:
    from ray.serve._private.common import DeploymentID
    from ray.serve.config import AutoscalingConfig as ServeAutoscalingConfig
    from ray.serve.config import AutoscalingContext

    config = ServeAutoscalingConfig(
        **{**SCALING, "upscale_delay_s": 0, "downscale_delay_s": 0, **(settings or {})}
    )
    return AutoscalingContext(
        deployment_id=DeploymentID(name="Engine", app_name="shepherd"),
        deployment_name="Engine",
        app_name="shepherd",
        current_num_replicas=current,
        target_num_replicas=current if target is None else target,
        running_replicas=[],
        total_num_requests=0.0,  # Serve's own count: the direct channel's streams are not in it
        total_queued_requests=queued,
        aggregated_metrics=None if loads is None else {ENGINE_LOAD_METRIC: loads},
        raw_metrics=None,
        capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=None,
        config=config,
    )


def test_engine_policy_scales_on_what_the_executors_hold() -> None:
    # 2 replicas holding 20 and 12 requests, 8 more queued in Serve's handles: 40 / 8 = 5 replicas.
    desired, _ = engine_autoscaling_policy(_context({"a": 20.0, "b": 12.0}, current=2, queued=8.0))
    assert desired == 5
    desired, _ = engine_autoscaling_policy(_context({"a": 1.0, "b": 2.0}, current=2))
    assert desired == pytest.approx(3 / 8)


def test_engine_policy_holds_the_target_until_replicas_report() -> None:
    assert engine_autoscaling_policy(_context(None, current=2, target=3))[0] == 3
    assert engine_autoscaling_policy(_context({}, current=2))[0] == 2


def test_serve_bounds_and_delays_wrap_the_engine_policy() -> None:
    from ray.serve.autoscaling_policy import _apply_autoscaling_config

    policy = _apply_autoscaling_config(engine_autoscaling_policy)
    # Wanting 5 now, with no delay: Serve asks for 5 (the bound to max_replicas is applied after).
    assert policy(_context({"a": 20.0, "b": 20.0}, current=2))[0] == 5
    # With an upscale delay, the first decision keeps the current count.
    delayed = _context({"a": 20.0, "b": 20.0}, current=2, settings={"upscale_delay_s": 30})
    assert policy(delayed)[0] == 2
