"""Orchestrator mode for real: a TP=2 engine whose ranks are MPI processes spawned by the replica.

With the double, each rank is a Python process started by MPI_Comm_spawn (exactly how TensorRT-LLM
starts `executorWorker`), told its device id, and driven over the intercommunicator. These tests
check what a replica must get right: the Open MPI environment from placement.py, device ids, GPU
visibility inherited from Ray, and that no worker outlives the executor or the replica process.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deployments.config import TrtllmConfig
from deployments.errors import OverloadedError
from deployments.executors.trtllm import TrtllmExecutor, default_worker_path
from deployments.messages import FinishReason
from deployments.placement import engine_deployment_options, mpi_env_vars
from tests import trtllm_support as support

pytestmark = pytest.mark.mpi
PROMPT = [21, 22, 23, 24, 25, 26, 27]


@pytest.fixture
def engine_dir_tp2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    support.require_mpi()
    support.set_mpi_env(monkeypatch)
    return support.engine_dir_or_skip(tmp_path, tp_size=2)


def test_tp2_engine_runs_in_spawned_workers_that_exit_with_it(engine_dir_tp2: Path) -> None:
    config = TrtllmConfig(engine_dir=str(engine_dir_tp2), stats_period_s=0.02)

    async def scenario() -> dict[str, Any]:
        executor = TrtllmExecutor(config, device_ids=[0, 1])
        await executor.start()
        try:
            workers = support.pids_with_cmdline(default_worker_path())
            manager = executor._engine.get_kv_cache_event_manager()
            deltas = await support.collect(executor, support.greedy_request("a", PROMPT, 8))
            await support.eventually(lambda: executor.stats().kv_cache_usage is not None)
            info = None if support.IS_REAL else executor._engine._backend.worker_info
            return {
                "mode": executor.communication_mode,
                "workers": workers,
                "tokens": support.joined(deltas),
                "routing": executor.routing_stats(),
                "manager": manager,
                "info": info,
            }
        finally:
            await executor.shutdown()

    result = support.run(scenario())
    assert result["mode"] == "orchestrator"
    assert len(result["workers"]) == 2 and os.getpid() not in result["workers"]
    assert len(result["tokens"]) == 8
    # the engine lives in the workers: no KV event manager here, the router must predict
    assert result["manager"] is None
    assert result["routing"]["has_kv_events"] is False
    assert support.wait_until_gone(result["workers"]) == []
    if result["info"] is not None:
        assert [w["rank"] for w in result["info"]] == [0, 1]
        assert [w["device_id"] for w in result["info"]] == [0, 1]
        assert sorted(w["pid"] for w in result["info"]) == sorted(result["workers"])


def test_tp2_output_matches_tp1_for_the_same_model(engine_dir_tp2: Path, tmp_path: Path) -> None:
    support.require_double("the double's model does not depend on the TP size")
    engine_dir_tp1 = support.write_double_engine(tmp_path / "tp1")

    async def tokens(engine_dir: Path) -> list[int]:
        executor = TrtllmExecutor(TrtllmConfig(engine_dir=str(engine_dir)))
        await executor.start()
        try:
            request = support.greedy_request("a", PROMPT, 12)
            return support.joined(await support.collect(executor, request))
        finally:
            await executor.shutdown()

    assert support.run(tokens(engine_dir_tp2)) == support.run(tokens(engine_dir_tp1))


@pytest.mark.slow
def test_tp2_replica_inside_a_ray_actor(engine_dir_tp2: Path) -> None:
    ray = pytest.importorskip("ray")
    options = engine_deployment_options(
        num_gpus=2, num_cpus=1, tensor_parallel_size=2, uses_mpi=True
    )["ray_actor_options"]
    options["runtime_env"]["env_vars"]["PYTHONPATH"] = support.worker_pythonpath()
    probe_class = ray.remote(support.ReplicaProbe)
    # `address="local"`: a Ray of its own, never the cluster another test (or run) last started on this machine.
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # 1) a clean shutdown: workers saw the replica's GPUs and exit with the executor
        probe = probe_class.options(**options).remote(str(engine_dir_tp2))
        started = ray.get(probe.start.remote(), timeout=60)
        assert len(ray.get(probe.generate.remote(PROMPT, 6), timeout=30)) == 6
        ray.get(probe.shutdown.remote(), timeout=30)
        ray.kill(probe)  # frees its two GPUs for the next replica
        assert started["pid"] != os.getpid()
        assert len(started["worker_pids"]) == 2
        assert support.wait_until_gone(started["worker_pids"]) == []
        assert sorted(started["ray_gpu_ids"]) == ["0", "1"]
        if started["worker_info"] is not None:
            for worker in started["worker_info"]:
                assert worker["cuda_visible_devices"] == started["cuda_visible_devices"]
            assert [w["device_id"] for w in started["worker_info"]] == [0, 1]
        # 2) Ray kills a replica abruptly (failed health check, scale-down): no orphans either
        doomed = probe_class.options(**options).remote(str(engine_dir_tp2))
        workers = ray.get(doomed.start.remote(), timeout=60)["worker_pids"]
        assert len(workers) == 2
        ray.kill(doomed)
        assert support.wait_until_gone(workers, timeout_s=20) == []
    finally:
        ray.shutdown()


def test_tp2_full_queue_is_a_503_not_a_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In orchestrator mode `enqueue_request` never raises for a full queue: the leader's
    `leaderRecvReqThread` answers with `Response(reqWithId.id, err)`, an error response with no
    client id (executorImpl.cpp @ b35ac1b6 = v1.2.0rc2). Matched by client id only, it was dropped
    and the request hung."""
    support.require_double("steps slow enough to keep a request queued")
    support.require_mpi()
    support.set_mpi_env(monkeypatch)
    engine_dir = support.write_double_engine(tmp_path / "tp2", tp_size=2, iter_latency_ms=50.0)
    config = TrtllmConfig(engine_dir=str(engine_dir), max_batch_size=1, max_queue_size=1)

    async def scenario() -> None:
        executor = TrtllmExecutor(config, device_ids=[0, 1])
        await executor.start()
        try:
            running = executor.generate(support.greedy_request("running", PROMPT, 300))
            await anext(running)
            queued = asyncio.ensure_future(
                support.collect(executor, support.greedy_request("queued", PROMPT, 2))
            )
            await asyncio.sleep(0.3)
            with pytest.raises(OverloadedError, match="Maximum queue size"):
                await support.collect(executor, support.greedy_request("rejected", PROMPT, 2))
            executor.check_health()
            await running.aclose()
            assert (await queued)[-1].finish_reason is FinishReason.LENGTH
        finally:
            await executor.shutdown()

    support.run(scenario(), timeout_s=30.0)


_HUNG_START = """
import asyncio, json, os, sys, time
from tests import trtllm_support
from deployments.executors.trtllm import TrtllmExecutor, default_worker_path
from deployments.config import TrtllmConfig

async def main():
    executor = TrtllmExecutor(TrtllmConfig(engine_dir=sys.argv[1], engine_start_timeout_s=3.0))
    started = time.monotonic()
    try:
        await executor.start()
        outcome = "started"
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"outcome": outcome, "elapsed_s": time.monotonic() - started,
                      "workers": trtllm_support.pids_with_cmdline(default_worker_path())}),
          flush=True)

asyncio.run(main())
os._exit(0)  # a thread is still inside the engine's constructor (MPI_Barrier): skip MPI_Finalize
"""


def test_a_worker_that_never_reaches_the_barrier_fails_start_within_the_timeout(
    tmp_path: Path,
) -> None:
    """executorWorker.cpp has no try/catch around loading the engine: a rank that fails never
    reaches the `MPI_Barrier` the orchestrator waits on in its constructor (executorImpl.cpp
    `initializeOrchestrator` @ b35ac1b6), which blocked `start()` forever. Run in a subprocess,
    since the orchestrator thread stays stuck in MPI until its process exits."""
    support.require_double("a worker rank that hangs before the barrier")
    support.require_mpi()
    engine_dir = support.write_double_engine(tmp_path / "tp2", tp_size=2)
    config = json.loads((engine_dir / "config.json").read_text())
    config["shepherd_double"]["hang_worker_rank"] = 1
    (engine_dir / "config.json").write_text(json.dumps(config))
    env = {**os.environ, **mpi_env_vars(spawns_workers=True)}
    env["PYTHONPATH"] = support.worker_pythonpath()
    finished = subprocess.run(
        [sys.executable, "-c", _HUNG_START, str(engine_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=support.REPO_ROOT,
    )
    report = json.loads(finished.stdout.strip().splitlines()[-1])
    assert report["outcome"].startswith("EngineError: ")
    assert "did not start within 3 s" in report["outcome"]
    assert "engine_start_timeout_s" in report["outcome"]
    assert 3.0 <= report["elapsed_s"] < 10.0
    assert len(report["workers"]) == 2
    assert support.wait_until_gone(report["workers"], timeout_s=20) == []
