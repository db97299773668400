"""`build_app(args)`: the `import_path` target of serve_config.yaml; validates args and binds Engine + Router."""

from __future__ import annotations

import logging
from typing import Any

import ray
from pydantic import ValidationError
from ray import serve
from ray.serve import Application

from deployments.autoscaling import serve_autoscaling_config, surge_option
from deployments.config import AppConfig, RouterConfig
from deployments.engine import engine_deployment
from deployments.model_source import resolve_model_source
from deployments.placement import SERVE_REPLICA_ENV, check_replica_fits
from deployments.router import Router

logger = logging.getLogger(__name__)
# Serve admits this many requests past `router.max_ongoing_requests`, so that the router itself refuses
# them with an OpenAI-shaped 503 and Retry-After instead of leaving them in the proxy's queue.
_REFUSAL_HEADROOM = 64


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Validates `args` (see `AppConfig`) and returns the Router ingress bound to its Engine deployment."""
    try:
        config = AppConfig.model_validate(args or {})
    except ValidationError as error:
        raise ValueError(f"invalid serve_config args:\n{error}") from None
    source = resolve_model_source(config.model)
    model_dir, tokenizer_dir = source.model_dir, source.tokenizer_dir
    model = config.model.model_copy(update={"served_model_name": source.served_model_name})
    config = config.model_copy(update={"model": model})
    if config.engine.check_fits_at_build and ray.is_initialized():
        check_replica_fits(
            num_gpus=config.engine.num_gpus_per_replica,
            num_cpus=config.engine.num_cpus_per_replica,
            nodes=ray.nodes(),
            custom_resources=config.engine.custom_resources,
        )
    engine = engine_deployment(config.engine, model_dir).bind(config.engine, model_dir)
    router = serve.deployment(
        name="Router",
        max_ongoing_requests=config.router.max_ongoing_requests + _REFUSAL_HEADROOM,
        max_queued_requests=config.router.max_queued_requests,
        graceful_shutdown_timeout_s=config.router.graceful_shutdown_timeout_s,
        # Serve checks for the last request every this often while stopping (its default is 2 s).
        graceful_shutdown_wait_loop_s=0.5,
        **router_deployment_options(config.router),
    )(Router)
    return router.bind(config, engine, model_dir, tokenizer_dir)


def router_deployment_options(config: RouterConfig) -> dict[str, Any]:
    """Replica count (fixed, or Serve's default autoscaling on HTTP requests) and resources of the Router."""
    actor_options: dict[str, Any] = {
        "num_cpus": config.num_cpus_per_replica,
        "runtime_env": {"env_vars": dict(SERVE_REPLICA_ENV)},
    }
    if config.custom_resources:
        actor_options["resources"] = dict(config.custom_resources)
    options: dict[str, Any] = {"ray_actor_options": actor_options, **surge_option(config)}
    if config.autoscaling is None:
        options["num_replicas"] = config.num_replicas
    else:
        options["autoscaling_config"] = serve_autoscaling_config(config.autoscaling)
    return options
