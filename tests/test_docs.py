"""The docs build with `mkdocs build --strict`, and their generated reference matches the code.

`docs/hooks.py` renders the configuration reference, the route list and the handle methods from the code at
build time, so a strict build also catches a hook that no longer understands the code it documents.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip(
            "DOCS NOT BUILT: mkdocs-material is not installed (pip install mkdocs-material)"
        )
    site_dir = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--clean"]
        + ["--config-file", str(REPO / "mkdocs.yml"), "--site-dir", str(site_dir)],
        cwd=REPO,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # Material's end-of-life banner
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    )
    return site_dir


def _text(site: Path, page: str) -> str:
    html = (site / page / "index.html").read_text()
    return re.sub(r"<[^>]+>", "", html)


def test_docs_build_strict(site: Path) -> None:
    assert (site / "index.html").exists()
    assert not (site / "hooks.py").exists() and not (site / "patches").exists()


def test_configuration_reference_lists_every_field_with_its_default(site: Path) -> None:
    from pydantic import BaseModel

    from deployments.config import AppConfig

    text = _text(site, "configuration")
    assert "<!-- generated:" not in text

    def check(model: type[BaseModel]) -> None:
        for name, field in model.model_fields.items():
            assert name in text, (
                f"{model.__name__}.{name} is missing from the configuration reference"
            )
            # Optional models (`engine.autoscaling`) are documented too.
            for nested in (field.annotation, *typing.get_args(field.annotation)):
                if isinstance(nested, type) and issubclass(nested, BaseModel):
                    check(nested)

    check(AppConfig)


def test_http_api_page_lists_every_route(site: Path) -> None:
    from deployments.router import api

    text = _text(site, "http-api")
    for path in api.openapi()["paths"]:
        assert path in text, f"route {path} is missing from the HTTP API page"


def test_examples_are_included_not_copied(site: Path) -> None:
    text = _text(site, "agent-loop")
    assert "def run_agent(" in text and "def turn_sender(" in text
