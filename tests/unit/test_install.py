"""`pip install '.[tensorrt]'` must resolve against TensorRT-LLM's own pins.

The TensorRT-LLM wheel itself lives on NVIDIA's index (PyPI holds a stub), so the resolver dry run
takes this project's dependencies with TensorRT-LLM 1.2's requirements as constraints
(tests/constraints/tensorrt-llm-1.2.txt). Needs only a package registry, as CI has.

A dry run needs each candidate's metadata, not the wheel. pip reads it from the index's PEP 658 files
where the index announces them; where it does not, pip before 25.3 downloads every wheel it considers
(torch and its CUDA libraries: 4.2 GB and 3-5 min per run), and `fast-deps` has pip 25.3 or later read
just the metadata out of the wheel by HTTP range requests (about 50 MB and 25-35 s).
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.trtllm_support import REPO_ROOT

pytestmark = pytest.mark.slow


def _ray_requirement(requirements: list[str]) -> Requirement:
    (ray,) = [Requirement(r) for r in requirements if Requirement(r).name == "ray"]
    return ray


def test_this_project_resolves_with_tensorrt_llm_1_2_pins(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """TensorRT-LLM 1.2 pins fastapi<=0.121.3 and ray[serve] 2.56+ needs fastapi>=0.133, so the `tensorrt`
    extra caps Ray; the base dependency must not, so that `pip install .` keeps getting the newest Ray."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extra = project["optional-dependencies"]["tensorrt"]
    ray_cap = _ray_requirement(extra).specifier
    assert "2.56.0" not in ray_cap
    assert "2.56.0" in _ray_requirement(project["dependencies"]).specifier
    requirements = list(project["dependencies"]) + [
        r for r in extra if canonicalize_name(Requirement(r).name) != "tensorrt-llm"
    ]
    assert Version(version("pip")) >= Version("25.3"), "older pips download every wheel here"
    command = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
        "--use-feature=fast-deps", "--only-binary", ":all:", "--report", str(tmp_path / "report.json"),
        "-c", str(REPO_ROOT / "tests" / "constraints" / "tensorrt-llm-1.2.txt"),
        *requirements,
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.skip("LOUD SKIP: the package registry did not answer the resolver within 180 s")
    if done.returncode != 0 and any(
        marker in done.stderr for marker in ("NewConnectionError", "Temporary failure", "timed out")
    ):
        pytest.skip(f"LOUD SKIP: the package registry is unreachable: {done.stderr[-400:]}")
    assert done.returncode == 0, done.stderr[-3000:]

    installed = {
        item["metadata"]["name"].lower(): item["metadata"]["version"]
        for item in json.loads((tmp_path / "report.json").read_text())["install"]
    }
    assert installed["transformers"] == "4.57.3"
    assert installed["ray"] in ray_cap
    assert Version(installed["fastapi"]) <= Version("0.121.3")
    # Ray 2.55 reads FieldDescriptor.label, which protobuf 7 removed.
    assert Version(installed["protobuf"]) < Version("7")


def test_the_transformers_engine_names_its_own_minimum() -> None:
    from deployments.errors import EngineError
    from deployments.executors.hf import check_transformers_version

    with pytest.raises(EngineError, match=r"transformers>=5\.24.*4\.57\.3 is installed"):
        check_transformers_version("4.57.3")
    check_transformers_version("5.24.0")
