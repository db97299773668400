"""Shared fixtures: the embedded default model, built once per test session into a temporary cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from deployments.embedded_model import ensure_embedded_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = Path(os.environ.get("SHEPHERD_TEST_CACHE_DIR") or tmp_path_factory.mktemp("shepherd-cache"))
    return ensure_embedded_model(cache)


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> Any:
    from deployments.tokenization import load_tokenizer

    return load_tokenizer(model_dir)
