"""Shared fixtures: the embedded default model, built once per test session into a temporary cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from deployments.embedded_model import ensure_embedded_model

# Ray reads its auth mode once per process, at import. Every cluster the tests start (and every driver that
# joins one) runs without token auth, so tests never depend on a token file left by another cluster.
os.environ["RAY_AUTH_MODE"] = "disabled"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = Path(
        os.environ.get("SHEPHERD_TEST_CACHE_DIR") or tmp_path_factory.mktemp("shepherd-cache")
    )
    return ensure_embedded_model(cache)


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> Any:
    from deployments.tokenization import load_tokenizer

    return load_tokenizer(model_dir)
