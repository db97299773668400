"""One real Ray Serve app for the e2e modules of a test session, started exactly as a user does: `serve run
CONFIG`, with the shepherd-tiny config of the token-exact tests (the real chat model joins that cluster in
test_real_model.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.local import REPO, ServeApp, joined_ray, port_is_free, serve_app
from deployments.ingress import serve_applies_controller_options

__all__ = ["REPO", "ServeApp"]  # what the e2e modules import from here

PORT = 8000
BASE_URL = f"http://127.0.0.1:{PORT}"
# The token-exact tests serve the random shepherd-tiny (the default config serves a real model).
TINY_CONFIG = "tests/e2e/serve_config.tiny.yaml"
SERVE_PROXY = {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
MODEL = "shepherd-tiny"
API_KEY, OTHER_API_KEY = "test-key-a", "test-key-b"
AUTH = {"authorization": f"Bearer {API_KEY}"}


def app_env(model_dir: Path) -> dict[str, str]:
    return {
        "SHEPHERD_CACHE_DIR": str(model_dir.parent),
        "SHEPHERD_API_KEYS": f"{API_KEY},{OTHER_API_KEY}",
    }


# Package scope: the app runs while this worker runs e2e modules (its group is one run of them, see
# tests/conftest.py) and stops when the worker turns to other tests, where its idle cluster would cost CPU.
@pytest.fixture(scope="package", name="serve_app")
def serve_app_fixture(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeApp]:
    """`serve run tests/e2e/serve_config.tiny.yaml`, as a user starts an app, for the e2e modules."""
    if not port_is_free(PORT):
        pytest.fail(f"port {PORT} is busy: stop the other server (serve_config.yaml listens there)")
    with serve_app(
        TINY_CONFIG,
        port=PORT,
        env=app_env(model_dir),
        ready_headers=AUTH,
        workdir=tmp_path_factory.mktemp("serve"),
        # A Ray without HAProxy ingress (2.55, the `tensorrt` extra's) serves the suite through Serve's proxy.
        controller_env=None if serve_applies_controller_options() else SERVE_PROXY,
    ) as app:
        yield app


@pytest.fixture(scope="module")
def ray_driver(serve_app: ServeApp) -> Iterator[None]:
    """This pytest process joins the app's Ray cluster as a driver (another Ray job), one module at a time,
    so that other tests may start Ray clusters of their own in this process afterwards."""
    with joined_ray(serve_app.ray_address):
        yield


@pytest.fixture(scope="module")
def engine_handle(ray_driver: None) -> Any:
    from ray import serve

    return serve.get_deployment_handle("Engine", app_name="shepherd")


@pytest.fixture(scope="package")
def base_url(serve_app: ServeApp) -> str:
    return serve_app.base_url


@pytest.fixture(scope="package")
def client(base_url: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
