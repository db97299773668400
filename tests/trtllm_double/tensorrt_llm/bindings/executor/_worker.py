"""The double's `executorWorker`: one process per rank, started by the orchestrator's MPI spawn.

Every rank receives the model path, config and its device id (device_ids[rank]) from the broadcast,
reports who it is, and joins the barrier. Rank 0 (the leader) runs the engine core; at every
iteration it steps the other ranks (standing in for the tensor-parallel collectives) and waits for
their acknowledgements, then ships responses and stats to the orchestrator. All ranks leave on
"shutdown".

As in TensorRT-LLM 1.2 (cpp/tensorrt_llm/executor/executorImpl.cpp @ b35ac1b6, `leaderRecvReqThread`):
a request that finds the queue full is answered with `Response(reqWithId.id, err)`, an error
response with NO client id, and `enqueue_request` in the orchestrator never raises for it.
`executorWorker.cpp` has no try/catch around loading the engine, so a rank that fails to load never
reaches the barrier and the orchestrator waits there forever; "hang_worker_rank" simulates that rank.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

from ._engine import EngineCore, EngineSpec
from ._orchestrator import TAG_FROM_LEADER, TAG_TO_LEADER
from ._request import Response

TAG_STEP = 21
TAG_ACK = 22
_IDLE_S = 0.0005
_NEVER = threading.Event()


def _wait_for(comm: Any, source: int, tag: int) -> Any:
    """Receive without MPI's busy-wait, so idle ranks leave the CPU to the others."""
    while not comm.Iprobe(source=source, tag=tag):
        time.sleep(_IDLE_S)
    return comm.recv(source=source, tag=tag)


def _spec(payload: dict[str, Any]) -> EngineSpec:
    spec = payload.get("spec")  # the LLM API double passes a spec read from a HF checkpoint
    return spec if spec is not None else EngineSpec.from_engine_dir(payload["model_path"])


def _drain_events(core: EngineCore) -> list[Any]:
    return [] if core.events is None else core.events.drain(0.0, _NEVER)


def _lead(parent: Any, world: Any, payload: dict[str, Any]) -> None:
    spec = _spec(payload)
    core = EngineCore(spec, payload["executor_config"])
    followers = range(1, world.Get_size())
    is_dead = False
    while True:
        errors: list[Response] = []
        is_stopping = False
        while parent.Iprobe(source=0, tag=TAG_TO_LEADER):
            message = parent.recv(source=0, tag=TAG_TO_LEADER)
            if message[0] == "enqueue":
                _, request_id, request = message
                try:
                    core.enqueue(request_id, request)
                except RuntimeError as exc:  # queue full: an error response without client id
                    errors.append(Response(request_id, str(exc)))
            elif message[0] == "cancel":
                core.cancel(message[1])
            else:
                is_stopping = True
        if is_stopping:
            for rank in followers:
                world.send(("shutdown",), dest=rank, tag=TAG_STEP)
            parent.send(("bye",), dest=0, tag=TAG_FROM_LEADER)
            return
        if is_dead or not core.has_work():
            if errors:
                parent.send(("out", errors, [], []), dest=0, tag=TAG_FROM_LEADER)
            time.sleep(_IDLE_S)
            continue
        started = time.perf_counter()
        try:
            responses = errors + core.step()
        except RuntimeError as exc:
            is_dead = True
            parent.send(("fatal", str(exc)), dest=0, tag=TAG_FROM_LEADER)
            continue
        for rank in followers:
            world.send(("step", core.blocks.tick), dest=rank, tag=TAG_STEP)
        for rank in followers:
            _wait_for(world, rank, TAG_ACK)
        out = ("out", responses, core.drain_iteration_stats(), _drain_events(core))
        parent.send(out, dest=0, tag=TAG_FROM_LEADER)
        time.sleep(max(0.0, spec.iter_latency_s - (time.perf_counter() - started)))


def _follow(world: Any) -> None:
    while True:
        message = _wait_for(world, 0, TAG_STEP)
        if message[0] == "shutdown":
            return
        world.send(("ack", message[1]), dest=0, tag=TAG_ACK)


def _hang_until_orphaned(orchestrator_pid: int) -> None:
    """A rank stuck loading its engine: it never reaches the barrier. It leaves once the
    orchestrator is gone, so a test never strands it."""
    while True:
        try:
            os.kill(orchestrator_pid, 0)
        except ProcessLookupError:
            os._exit(1)
        time.sleep(0.1)


def main() -> None:
    from mpi4py import MPI

    parent = MPI.Comm.Get_parent()
    if parent == MPI.COMM_NULL:
        raise SystemExit("executorWorker must be started by an orchestrator (MPI_Comm_spawn)")
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    payload = parent.bcast(None, root=0)
    device_id = payload["device_ids"][rank]
    parent.gather(
        {
            "rank": rank,
            "world_size": world.Get_size(),
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "device_id": device_id,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        },
        root=0,
    )
    if _spec(payload).hang_worker_rank == rank:
        _hang_until_orphaned(payload["orchestrator_pid"])
        return
    parent.Barrier()
    try:
        if rank == 0:
            _lead(parent, world, payload)
        else:
            _follow(world)
    finally:
        parent.Disconnect()
