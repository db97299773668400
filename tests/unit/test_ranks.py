"""How a replica starts and watches the ranks it spawns: device ids, the ranks' environment, process watches,
and a rank that fails before it starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployments.executors.ranks import (
    ProcessWatch,
    SpawnedRanks,
    replica_device_ids,
    spawn_env,
)
from tests import trtllm_support as support


def test_device_ids_are_the_replicas_gpus_in_rank_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")  # what Ray sets for a replica's bundle
    assert replica_device_ids(2) == [0, 1]
    with pytest.raises(ValueError, match="sees 2 GPUs .* num_gpus_per_replica to 4"):
        replica_device_ids(4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert replica_device_ids(2) == [0, 1]


def test_ranks_get_the_replicas_code_and_its_nccl_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setenv("UNRELATED_SECRET", "x")
    env = spawn_env({"OMP_NUM_THREADS": "3"})
    assert env["NCCL_NVLS_ENABLE"] == "0"
    assert env["OMP_NUM_THREADS"] == "3"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(support.REPO_ROOT), "/elsewhere"]
    assert "UNRELATED_SECRET" not in env


def test_a_process_watch_sees_an_exit_and_kills_only_its_own_process() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    watch = ProcessWatch(sleeper.pid)
    try:
        assert not watch.has_exited(0.05)
        watch.kill()
        sleeper.wait(timeout=10)
        assert watch.has_exited(1.0)
    finally:
        watch.close()
        sleeper.kill()
    assert ProcessWatch(sleeper.pid).has_exited()  # reaped: nothing left to watch


@pytest.mark.mpi
def test_a_rank_that_fails_to_import_fails_the_spawn_at_once(tmp_path: Path) -> None:
    support.require_mpi()
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"exited \(\[1\]\) before starting"):
        SpawnedRanks.spawn("tests.unit.no_such_rank_module", 1, {}, {})
    assert time.monotonic() - started < 60  # not MPI's endless wait for a rank that never answers
