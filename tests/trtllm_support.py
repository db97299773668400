"""Test support for the TensorRT-LLM backend: real-or-double bindings, engine dirs, MPI, processes.

The bindings double (tests/trtllm_double) goes on sys.path only when `tensorrt_llm` does not import,
so the same tests run against a real engine when one is given:
    SHEPHERD_TRTLLM_ENGINE_DIR       a TP=1 trtllm-build engine dir (backend + conformance tests)
    SHEPHERD_TRTLLM_ENGINE_DIR_TP2   a TP=2 engine dir (MPI orchestrator tests)
With the real module but without the variable, those tests skip and name the variable.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from deployments.executors.base import Executor
from deployments.messages import GenerateRequest, SamplingParams, TokenDelta
from deployments.placement import mpi_env_vars

REPO_ROOT = Path(__file__).resolve().parents[1]
DOUBLE_DIR = REPO_ROOT / "tests" / "trtllm_double"
ENGINE_DIR_ENV = {1: "SHEPHERD_TRTLLM_ENGINE_DIR", 2: "SHEPHERD_TRTLLM_ENGINE_DIR_TP2"}
T = TypeVar("T")


def ensure_trtllm() -> bool:
    """Makes `tensorrt_llm.bindings.executor` importable; True when it is the real one."""
    try:
        importlib.import_module("tensorrt_llm.bindings.executor")
    except ImportError:
        sys.path.insert(0, str(DOUBLE_DIR))
        for name in [
            m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")
        ]:
            del sys.modules[name]
        importlib.import_module("tensorrt_llm.bindings.executor")
    return not getattr(importlib.import_module("tensorrt_llm"), "IS_SHEPHERD_DOUBLE", False)


IS_REAL = ensure_trtllm()


def require_double(why: str) -> None:
    if IS_REAL:
        pytest.skip(f"needs the bindings double ({why}); real tensorrt_llm is installed")


def require_mpi() -> None:
    try:
        importlib.import_module("mpi4py")
    except ImportError:
        pytest.skip(
            "mpi4py is not installed: CI must run `apt-get install -y openmpi-bin libopenmpi-dev` "
            "and `pip install mpi4py` (orchestrator mode spawns workers with MPI_Comm_spawn)"
        )


def write_double_engine(
    path: Path,
    *,
    tp_size: int = 1,
    pp_size: int = 1,
    vocab_size: int = 1000,
    tokens_per_block: int = 4,
    max_input_len: int = 256,
    max_seq_len: int = 512,
    max_batch_size: int = 8,
    num_kv_blocks: int = 256,
    iter_latency_ms: float = 1.0,
    poison_token_id: int | None = None,
) -> Path:
    """A config.json in the trtllm-build layout (no rank*.engine files: the double needs none)."""
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "version": "1.2.1",
        "pretrained_config": {
            "architecture": "LlamaForCausalLM",
            "dtype": "float16",
            "vocab_size": vocab_size,
            "mapping": {
                "world_size": tp_size * pp_size,
                "tp_size": tp_size,
                "pp_size": pp_size,
                "cp_size": 1,
            },
        },
        "build_config": {
            "max_input_len": max_input_len,
            "max_seq_len": max_seq_len,
            "max_batch_size": max_batch_size,
            "max_num_tokens": 2048,
            "plugin_config": {"tokens_per_block": tokens_per_block, "paged_kv_cache": True},
        },
        "shepherd_double": {
            "num_kv_blocks": num_kv_blocks,
            "iter_latency_ms": iter_latency_ms,
            "poison_token_id": poison_token_id,
        },
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


def engine_dir_or_skip(tmp_path: Path, *, tp_size: int = 1, **double_options: Any) -> Path:
    """The real engine named by the environment, or a double engine written under tmp_path."""
    if not IS_REAL:
        return write_double_engine(
            tmp_path / f"engine-tp{tp_size}", tp_size=tp_size, **double_options
        )
    variable = ENGINE_DIR_ENV[tp_size]
    engine_dir = os.environ.get(variable)
    if not engine_dir:
        pytest.skip(f"real tensorrt_llm is installed but {variable} is not set")
    return Path(engine_dir)


def set_mpi_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """What placement.py gives a replica, applied before MPI initializes in this process."""
    for key, value in mpi_env_vars(spawns_workers=True).items():
        monkeypatch.setenv(key, value)


# ---- running executors ---------------------------------------------------------------------------
def run(awaitable: Awaitable[T], timeout_s: float = 60.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(awaitable, timeout_s)

    return asyncio.run(bounded())


def greedy_request(
    request_id: str, prompt_token_ids: list[int], max_tokens: int, **fields: Any
) -> GenerateRequest:
    sampling = fields.pop("sampling", SamplingParams(temperature=0.0))
    return GenerateRequest(request_id, list(prompt_token_ids), max_tokens, sampling, **fields)


async def collect(executor: Executor, request: GenerateRequest) -> list[TokenDelta]:
    return [delta async for delta in executor.generate(request)]


def joined(deltas: Iterable[TokenDelta]) -> list[int]:
    return [token for delta in deltas for token in delta.token_ids]


async def eventually(predicate: Any, timeout_s: float = 5.0, period_s: float = 0.01) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(period_s)


class EngineSpy:
    """Wraps an engine object (real nanobind or double) to record calls the backend makes."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.cancelled_ids: list[int] = []
        self.timeout_types: set[type] = set()
        self.final_reasons: dict[int, str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def cancel_request(self, id: int) -> None:
        self.cancelled_ids.append(id)
        self._engine.cancel_request(id)

    def await_responses(self, *args: Any, **kwargs: Any) -> Any:
        self.timeout_types.add(type(kwargs.get("timeout", args[-1] if args else None)))
        responses = self._engine.await_responses(*args, **kwargs)
        for response in responses:
            if not response.has_error() and response.result.is_final:
                reason = response.result.finish_reasons[0].name
                self.final_reasons[response.request_id] = reason
        return responses


# ---- processes -----------------------------------------------------------------------------------
def _is_running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = next((line for line in status.splitlines() if line.startswith("State:")), "")
    return "Z" not in state.split()[1:2]  # a zombie has exited; only its parent has not reaped it


def running_pids(pids: Iterable[int]) -> list[int]:
    return [pid for pid in pids if _is_running(pid)]


def pids_with_cmdline(fragment: str) -> list[int]:
    """Running processes whose command line contains `fragment` (e.g. the executorWorker path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if fragment in cmdline and _is_running(int(entry.name)):
            found.append(int(entry.name))
    return found


def wait_until_gone(pids: Iterable[int], timeout_s: float = 10.0) -> list[int]:
    """Polls until none of `pids` runs; returns those still running at the deadline."""
    pids = list(pids)
    deadline = time.monotonic() + timeout_s
    while running_pids(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return running_pids(pids)


def worker_pythonpath() -> str:
    """PYTHONPATH for Ray workers: the repo (deployments, tests) and, without the real module, the
    double (MPI workers find it themselves, from their script's location)."""
    paths = [str(REPO_ROOT)] + ([] if IS_REAL else [str(DOUBLE_DIR)])
    existing = os.environ.get("PYTHONPATH")
    return os.pathsep.join(paths + ([existing] if existing else []))


class ReplicaProbe:
    """Stands in for the Engine replica inside a Ray actor (wrap with `ray.remote`): it owns one
    TrtllmExecutor, so the test sees what a replica process gets right or wrong about MPI."""

    def __init__(self, engine_dir: str) -> None:
        from deployments.config import TrtllmConfig
        from deployments.executors.trtllm import TrtllmExecutor

        self._executor = TrtllmExecutor(TrtllmConfig(engine_dir=engine_dir, stats_period_s=0.02))

    async def start(self) -> dict[str, Any]:
        import ray

        from deployments.executors.trtllm import default_worker_path

        await self._executor.start()
        engine = self._executor._engine
        return {
            "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "ray_gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
            "worker_pids": pids_with_cmdline(default_worker_path()),
            "worker_info": None if IS_REAL else engine._backend.worker_info,
        }

    async def generate(self, prompt_token_ids: list[int], max_tokens: int) -> list[int]:
        request = greedy_request("probe", prompt_token_ids, max_tokens)
        return joined(await collect(self._executor, request))

    async def shutdown(self) -> None:
        await self._executor.shutdown()


class PlacementProbe:
    """A Serve deployment body that reports where its replica landed (for placement tests)."""

    def __call__(self) -> dict[str, Any]:
        import ray

        context = ray.get_runtime_context()
        return {
            "replica": context.get_actor_id(),
            "node_id": context.get_node_id(),
            "gpu_ids": sorted(str(gpu) for gpu in ray.get_gpu_ids()),
            "env": {k: v for k, v in os.environ.items() if k.startswith("OMPI_")},
        }


# ---- the three TensorRT-LLM variants behind one executor contract ----------------------------------
VARIANTS = ["executor-tp1", "executor-tp2", "pytorch"]
HF_CHECKPOINT_ENV = "SHEPHERD_TRTLLM_HF_CHECKPOINT"


def write_double_checkpoint(
    path: Path,
    *,
    vocab_size: int = 1000,
    max_position_embeddings: int = 512,
    num_kv_blocks: int = 256,
    iter_latency_ms: float = 1.0,
    poison_token_id: int | None = None,
) -> Path:
    """A Hugging Face checkpoint's config.json (no weights: the LLM API double needs none)."""
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "shepherd_double": {
            "num_kv_blocks": num_kv_blocks,
            "iter_latency_ms": iter_latency_ms,
            "poison_token_id": poison_token_id,
        },
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


def make_variant_executor(
    variant: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    engine_options: dict[str, Any] | None = None,
    **config_fields: Any,
) -> tuple[Executor, int]:
    """(an unstarted executor of `variant`, its KV block size): a double engine/checkpoint, or the
    real one named by SHEPHERD_TRTLLM_ENGINE_DIR(_TP2) / SHEPHERD_TRTLLM_HF_CHECKPOINT."""
    from deployments.config import TrtllmConfig
    from deployments.executors.trtllm import TrtllmExecutor
    from deployments.executors.trtllm_config import read_engine_layout
    from deployments.executors.trtllm_llmapi import TrtllmLlmApiExecutor

    options = dict(engine_options or {})
    fields: dict[str, Any] = {"stats_period_s": 0.02, "kv_events_poll_period_ms": 2.0}
    fields |= config_fields
    if variant == "pytorch":
        tokens_per_block = int(options.pop("tokens_per_block", 4))
        if IS_REAL:
            checkpoint = os.environ.get(HF_CHECKPOINT_ENV)
            if not checkpoint:
                pytest.skip(f"real tensorrt_llm is installed but {HF_CHECKPOINT_ENV} is not set")
            model_dir = Path(checkpoint)
        else:
            options.pop("max_input_len", None)
            model_dir = write_double_checkpoint(tmp_path / "checkpoint", **options)
        config = TrtllmConfig(backend="pytorch", tokens_per_block=tokens_per_block, **fields)
        return TrtllmLlmApiExecutor(config, str(model_dir)), tokens_per_block
    tp_size = 2 if variant == "executor-tp2" else 1
    if tp_size == 2:
        require_mpi()
        set_mpi_env(monkeypatch)
    options.setdefault("tokens_per_block", 4)
    engine_dir = engine_dir_or_skip(tmp_path, tp_size=tp_size, **options)
    executor = TrtllmExecutor(TrtllmConfig(engine_dir=str(engine_dir), **fields))
    return executor, read_engine_layout(engine_dir).tokens_per_block
