"""Tensor parallelism for the transformers engine: the replica is rank 0, and spawns ranks 1..N-1 through MPI.

Every rank loads its shard of the model (`DistributedConfig(tp_size=N)`) and runs the same continuous-batching
loop. At each step transformers' TP driver, rank 0, broadcasts new requests and cancellations to the others
over a gloo group, and a MAX all-reduce agrees on stopping (`generation/continuous_batching/distributed.py`).
So the replica alone meets the executor contract; the other ranks compute, drop their copies of the outputs,
and exit with the replica (`ranks.py` says how, however it ends). Run as `__main__` (the replica spawns it
so), this module is such a rank.

Collectives go over NCCL on GPUs and gloo on the CPU; the ranks meet at a TCPStore that rank 0 opens on
loopback, which is enough because a replica never spans nodes.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from deployments.config import TransformersEngineConfig
from deployments.errors import EngineError
from deployments.executors.ranks import ProcessWatch, SpawnedRanks, replica_device_ids

if TYPE_CHECKING:
    from transformers.generation.continuous_batching import ContinuousBatchingManager

logger = logging.getLogger(__name__)

RANK_MODULE = "deployments.executors.hf_tp"
_STORE_HOST = "127.0.0.1"
# Loading a large model's shards takes minutes on a slow disk; the ranks wait for each other that long.
_JOIN_TIMEOUT = timedelta(minutes=30)
_DRIVER_POLL_S = 0.2


@dataclass(frozen=True, slots=True)
class RankPlan:
    """What every rank needs to join its engine (sent to the spawned ranks through MPI)."""

    model_dir: str
    config: TransformersEngineConfig
    device: str
    device_ids: list[int]  # CUDA ordinal of each rank; empty on the CPU
    store_port: int
    num_threads: int  # torch CPU threads per rank


def check_model_splits(model_dir: str, tp_size: int) -> None:
    """Fails before any rank starts when the model cannot be split `tp_size` ways.

    Raises:
        EngineError: the model has no tensor-parallel plan, or its heads do not divide by `tp_size`.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir).get_text_config()
    if not getattr(config, "base_model_tp_plan", None):
        raise EngineError(
            f"{config.model_type} models have no tensor-parallel plan in transformers"
        )
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    if num_heads % tp_size or num_kv_heads % tp_size:
        # transformers loads such a split and fails in the first forward (transformers issue #48307)
        raise EngineError(
            f"tensor_parallel_size {tp_size} must divide the model's {num_heads} attention heads "
            f"and {num_kv_heads} key-value heads"
        )


def join_process_group(plan: RankPlan, rank: int, store: Any) -> None:
    """Joins torch.distributed as `rank` of the engine (collective: every rank calls it)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(plan.num_threads)
    tp_size = plan.config.tensor_parallel_size
    if plan.device == "cpu":
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=tp_size, timeout=_JOIN_TIMEOUT
        )
        return
    device = torch.device("cuda", plan.device_ids[rank])
    torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl", store=store, rank=rank, world_size=tp_size, timeout=_JOIN_TIMEOUT, device_id=device
    )


def _alive_key(rank: int) -> str:
    return f"shepherd-rank-{rank}-alive"


def _await_ranks(store: Any, ranks: SpawnedRanks, tp_size: int) -> None:
    """Waits until every spawned rank reached the store, failing fast when one died on the way (a bare
    rendezvous would wait out its whole timeout)."""
    keys = [_alive_key(rank) for rank in range(1, tp_size)]
    deadline = time.monotonic() + _JOIN_TIMEOUT.total_seconds()
    while not store.check(keys):
        if dead := ranks.dead_ranks():
            raise EngineError(f"tensor-parallel rank(s) {dead} exited while starting (see the log)")
        if time.monotonic() > deadline:
            raise EngineError(f"tensor-parallel ranks did not start within {_JOIN_TIMEOUT}")
        time.sleep(0.05)


def leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class TensorParallelGroup:
    """Rank 0's side of a tensor-parallel engine: the spawned ranks and this process's place among them.

    Threading: `start` and `close` block (call them off the event loop); `dead_ranks` is cheap.
    """

    def __init__(self, ranks: SpawnedRanks, device_ids: list[int], num_threads: int) -> None:
        self._ranks = ranks
        self.device_ids = device_ids
        self._num_threads = num_threads

    @classmethod
    def start(
        cls, model_dir: str, config: TransformersEngineConfig, device: str
    ) -> TensorParallelGroup:
        """Spawns ranks 1..N-1 and joins torch.distributed with them; every rank then loads its shard.

        Raises:
            EngineError: the model cannot be split; torch.distributed is already in use in this process;
                a CPU engine in a process that sees GPUs (transformers builds its device mesh on the host's
                accelerator, so CPU ranks would meet CUDA ones).
        """
        import torch
        import torch.distributed as dist

        tp_size = config.tensor_parallel_size
        check_model_splits(model_dir, tp_size)
        if dist.is_available() and dist.is_initialized():
            raise EngineError("torch.distributed is already initialized in this process")
        if device == "cpu" and torch.cuda.is_available():
            raise EngineError(
                "a tensor-parallel engine on the CPU needs a process that sees no GPU "
                "(CUDA_VISIBLE_DEVICES=''); on GPUs set num_gpus_per_replica to tensor_parallel_size"
            )
        device_ids = [] if device == "cpu" else replica_device_ids(tp_size)
        # The ranks share the replica's CPUs (Ray sets this process's thread count from num_cpus).
        previous_threads = torch.get_num_threads()
        num_threads = max(1, previous_threads // tp_size)
        store = dist.TCPStore(  # type: ignore[attr-defined]
            _STORE_HOST, 0, tp_size, is_master=True, timeout=_JOIN_TIMEOUT, wait_for_workers=False
        )
        plan = RankPlan(
            model_dir=model_dir,
            config=config,
            device=device,
            device_ids=device_ids,
            store_port=store.port,
            num_threads=num_threads,
        )
        # transformers' CB asks for this before any NCCL communicator exists (and warns on every rank without).
        os.environ.setdefault("NCCL_GRAPH_MIXING_SUPPORT", "0")
        env = {"OMP_NUM_THREADS": str(num_threads)}
        ranks = SpawnedRanks.spawn(RANK_MODULE, tp_size - 1, {"plan": plan}, env)
        try:
            _await_ranks(store, ranks, tp_size)
            join_process_group(plan, 0, store)
        except BaseException:
            ranks.kill()
            raise
        group = cls(ranks, device_ids, previous_threads)
        logger.info(
            "tensor-parallel group of %d ranks on %s (pids %s)",
            tp_size,
            device,
            [p.pid for p in ranks.processes],
        )
        return group

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._ranks.processes]

    def dead_ranks(self) -> list[int]:
        return self._ranks.dead_ranks()

    def close(self, *, is_clean: bool) -> None:
        """Ends the other ranks and leaves torch.distributed (so a later engine in this process can join one)."""
        import torch

        self._ranks.close(is_clean=is_clean)
        leave_process_group()
        torch.set_num_threads(self._num_threads)


# ---- ranks 1..N-1 -----------------------------------------------------------------------------------------
def _drain(outputs: queue.Queue[Any]) -> None:
    """Rank 0 answers every request; the copies the other ranks produce are dropped."""
    try:
        while True:
            outputs.get_nowait()
    except queue.Empty:
        pass


def follow(manager: ContinuousBatchingManager, driver: ProcessWatch) -> bool:
    """Runs while the CB thread runs. Returns False when the replica died (this rank must exit at once), True
    when the loop ended."""
    outputs = manager.output_router.output_queue
    while manager.is_running():
        if driver.has_exited(_DRIVER_POLL_S):
            return False
        _drain(outputs)
    return True


def _run_rank() -> bool:
    """This process's life as rank 1..N-1; True when it ended cleanly and disconnected from the replica."""
    import torch.distributed as dist

    from deployments.executors.hf_model import create_manager, load_model
    from deployments.executors.ranks import connect_to_driver

    intercomm, payload = connect_to_driver()
    plan: RankPlan = payload["plan"]
    rank: int = payload["rank"]
    driver = ProcessWatch(payload["driver_pid"])
    store = dist.TCPStore(  # type: ignore[attr-defined]
        _STORE_HOST,
        plan.store_port,
        plan.config.tensor_parallel_size,
        is_master=False,
        timeout=_JOIN_TIMEOUT,
    )
    store.set(_alive_key(rank), str(os.getpid()))
    join_process_group(plan, rank, store)
    model = load_model(
        plan.model_dir, plan.config, plan.device, rank=rank, device_ids=plan.device_ids
    )
    manager = create_manager(model, plan.config, plan.device)
    manager.start()
    logger.info("rank %d of %d running", rank, plan.config.tensor_parallel_size)
    if not follow(manager, driver):
        logger.error("rank %d: the replica (pid %d) is gone", rank, driver.pid)
        return False  # the CB thread may be blocked in a collective with the dead replica
    status = manager.background_thread_status
    if status.fatal_error is not None or status.tp_status != status.FLUSH_AND_STOP:
        logger.error("rank %d: the engine stopped on an error", rank)
        return False  # rank 0 kills ranks that do not disconnect
    leave_process_group()
    intercomm.Disconnect()
    return True


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank pid %(process)d: %(message)s")
    try:
        is_clean = _run_rank()
    except BaseException:
        logger.exception("engine rank failed")
        is_clean = False
    if not is_clean:
        sys.stderr.flush()
        os._exit(1)  # no MPI_Finalize: it would wait for the replica


if __name__ == "__main__":
    main()
