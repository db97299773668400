"""`build_app(args)`: the `import_path` target of serve_config.yaml; validates args and binds Engine + Router."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ray
from pydantic import ValidationError
from ray import serve
from ray.serve import Application

from deployments.config import AppConfig
from deployments.embedded_model import ensure_embedded_model
from deployments.engine import engine_deployment
from deployments.placement import SERVE_REPLICA_ENV, check_replica_fits
from deployments.router import Router

logger = logging.getLogger(__name__)
# Serve admits this many requests past `router.max_ongoing_requests`, so that the router itself refuses
# them with an OpenAI-shaped 503 and Retry-After instead of leaving them in the proxy's queue.
_REFUSAL_HEADROOM = 64


def resolve_model_dirs(config: AppConfig) -> tuple[str, str]:
    """(model_dir, tokenizer_dir); builds the embedded default model when no path is configured."""
    if config.model.path is None:
        cache_dir = Path(config.model.cache_dir) if config.model.cache_dir else None
        model_dir = str(ensure_embedded_model(cache_dir, seed=config.model.embedded_seed))
    else:
        model_dir = config.model.path
        if not Path(model_dir).is_dir():
            raise ValueError(f"model.path {model_dir!r} is not a directory")
    return model_dir, config.model.tokenizer_path or model_dir


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Validates `args` (see `AppConfig`) and returns the Router ingress bound to its Engine deployment."""
    try:
        config = AppConfig.model_validate(args or {})
    except ValidationError as error:
        raise ValueError(f"invalid serve_config args:\n{error}") from None
    model_dir, tokenizer_dir = resolve_model_dirs(config)
    if config.engine.check_fits_at_build and ray.is_initialized():
        check_replica_fits(
            num_gpus=config.engine.num_gpus_per_replica,
            num_cpus=config.engine.num_cpus_per_replica,
            nodes=ray.nodes(),
        )
    engine = engine_deployment(config.engine, model_dir).bind(config.engine, model_dir)
    router = serve.deployment(
        name="Router",
        num_replicas=config.router.num_replicas,
        max_ongoing_requests=config.router.max_ongoing_requests + _REFUSAL_HEADROOM,
        max_queued_requests=config.router.max_queued_requests,
        ray_actor_options={
            "num_cpus": config.router.num_cpus_per_replica,
            "runtime_env": {"env_vars": dict(SERVE_REPLICA_ENV)},
        },
    )(Router)
    return router.bind(config, engine, model_dir, tokenizer_dir)
