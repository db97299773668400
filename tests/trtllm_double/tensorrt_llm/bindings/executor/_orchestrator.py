"""Orchestrator mode: spawn tp*pp*cp worker processes with MPI and talk to the leader over MPI.

As in executorImpl.cpp `initializeOrchestrator`: the orchestrator must be an MPI world of size 1, it
spawns the workers with `MPI_Comm_spawn` from COMM_SELF with info `bind_to=none`, broadcasts the
model path and config, and waits on a barrier. Requests and cancellations then go to the leader
worker, and responses and iteration stats come back, over the intercommunicator. The double's worker
binary is a Python script, so it runs as `sys.executable <worker_executable_path>`.
"""

from __future__ import annotations

import atexit
import copy
import os
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from ._engine import EngineSpec
from ._enums import ModelType
from ._request import Request, Response
from ._stats import IterationStats

TAG_TO_LEADER = 11
TAG_FROM_LEADER = 12

_live: weakref.WeakSet[OrchestratorBackend] = weakref.WeakSet()


@atexit.register
def _shutdown_live_backends() -> None:
    # Python atexit handlers run before mpi4py's C-level MPI_Finalize: finalizing while spawned
    # workers are still connected would hang the interpreter at exit.
    for backend in list(_live):
        backend.shutdown()


class OrchestratorBackend:
    def __init__(
        self,
        model_path: str,
        model_type: ModelType,
        config: Any,
        spec: EngineSpec,
        *,
        device_ids: list[int],
        on_responses: Callable[[list[Response]], None],
        on_fatal: Callable[[str], None],
        send_spec: bool = False,
    ) -> None:
        from mpi4py import MPI

        self._mpi = MPI
        if MPI.COMM_WORLD.Get_size() != 1:
            raise RuntimeError(
                "[TensorRT-LLM][ERROR] Assertion failed: expect MPI worldSize to be 1 in "
                "orchestrator mode with spawned processes"
            )
        orch = config.parallel_config.orchestrator_config
        self._on_responses = on_responses
        self._on_fatal = on_fatal
        self._poll_s = max(config.recv_poll_period_ms, 0.2) / 1000.0
        self._stats: list[IterationStats] = []
        self.events: list[Any] = []  # KV events shipped by the leader (read by the LLM API double)
        self._outbox: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()
        self._is_closed = False
        info = MPI.Info.Create()
        info.Set("bind_to", "none")  # else every spawned rank is bound to one core (nvbugs/4574329)
        self._intercomm = MPI.COMM_SELF.Spawn(
            sys.executable,
            args=[orch.worker_executable_path],
            maxprocs=spec.world_size,
            info=info,
        )
        info.Free()
        worker_config = copy.deepcopy(config)
        worker_config.parallel_config.orchestrator_config.is_orchestrator = False
        payload = {
            "model_path": model_path,
            "model_type": model_type,
            "executor_config": worker_config,
            "device_ids": list(device_ids),
            "orchestrator_pid": os.getpid(),
            "orchestrator_host": socket.gethostname(),
            "spec": spec if send_spec else None,
        }
        self._intercomm.bcast(payload, root=MPI.ROOT)
        self.worker_info: list[dict[str, Any]] = self._intercomm.gather(None, root=MPI.ROOT)
        self._intercomm.Barrier()
        self._thread = threading.Thread(target=self._run, name="trtllm-double-orch", daemon=True)
        self._thread.start()
        _live.add(self)

    def submit(self, request_id: int, request: Request) -> None:
        with self._lock:
            self._outbox.append(("enqueue", request_id, request))

    def cancel(self, request_id: int) -> None:
        with self._lock:
            self._outbox.append(("cancel", request_id))

    def iteration_stats(self) -> list[IterationStats]:
        with self._lock:
            stats, self._stats = self._stats, []
            return stats

    def drain_events(self) -> list[Any]:
        with self._lock:
            events, self.events = self.events, []
            return events

    def shutdown(self) -> None:
        """Tell the workers to stop, wait for their goodbye, then disconnect (collective)."""
        if self._is_closed:
            return
        self._is_closed = True
        with self._lock:
            self._outbox.append(("shutdown",))
        self._thread.join()
        self._intercomm.Disconnect()
        _live.discard(self)

    def _run(self) -> None:
        """Single MPI thread: sends queued messages, receives leader output until goodbye."""
        comm = self._intercomm
        while True:
            with self._lock:
                outbox, self._outbox = self._outbox, []
            for message in outbox:
                comm.send(message, dest=0, tag=TAG_TO_LEADER)
            while comm.Iprobe(source=0, tag=TAG_FROM_LEADER):
                message = comm.recv(source=0, tag=TAG_FROM_LEADER)
                if message[0] == "bye":
                    return
                if message[0] == "fatal":
                    self._on_fatal(message[1])
                    continue
                _, responses, stats, events = message
                if stats or events:
                    with self._lock:
                        self._stats.extend(stats)
                        self.events.extend(events)
                self._on_responses(responses)
            time.sleep(self._poll_s)
