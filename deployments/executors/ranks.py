"""How an engine replica starts, watches and ends the ranks it spawns through MPI (one way for every backend).

An Engine replica is rank 0 of its engine. A backend that needs more ranks spawns them from the replica with
`MPI_Comm_spawn`, as TensorRT-LLM's orchestrator mode spawns `executorWorker`; both use the Open MPI
environment of `placement.mpi_env_vars` and the device ids of `replica_device_ids`. The transformers engine
spawns processes that run a module of this package through `SpawnedRanks`; such a module calls
`connect_to_driver` first.

No rank outlives its replica, however the replica ends:
- a clean stop: the ranks leave their loop, disconnect, and exit; `SpawnedRanks.close` waits for that and
  kills whatever is left;
- the replica is SIGKILLed: Open MPI's daemon (`orted`, the spawned ranks' parent) kills them when it loses
  its singleton, and every rank also watches the replica's pid (`ProcessWatch`) and exits on its own.
  PR_SET_PDEATHSIG would not do: it fires on the death of the parent *thread*, and the parent is `orted`;
- the replica process exits without a stop: an atexit hook kills live ranks before MPI finalizes, which would
  otherwise wait for them.
Linux only: pids are watched and signalled through pidfds, so a recycled pid is never hit.
"""

from __future__ import annotations

import atexit
import logging
import os
import select
import signal
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deployments.placement import mpi_env_vars

logger = logging.getLogger(__name__)

# Variables a spawned rank takes from the replica as they are at spawn time. Open MPI starts ranks from its
# daemon, which copied the environment when MPI initialized; these may have been set since (and NCCL's
# NVLink-multicast switches must reach every rank).
_FORWARDED_PREFIXES = ("CUDA_", "NCCL_", "TORCH_", "NVSHMEM_", "GLOO_", "OMP_", "HF_", "PYTHON")

# What a spawned rank runs first: MPI_Init and its pid to the replica, before importing anything that can fail
# (MPI_Comm_spawn, and a collective with the replica, would wait forever for a rank that dies before that).
# A rank that fails exits at once: MPI_Finalize at a normal exit would wait for the replica.
_BOOTSTRAP = (
    "import os, runpy, sys, traceback\n"
    "from mpi4py import MPI\n"
    "MPI.Comm.Get_parent().gather(os.getpid(), root=0)\n"
    "try:\n"
    "    runpy.run_module(sys.argv[1], run_name='__main__', alter_sys=True)\n"
    "except BaseException:\n"
    "    traceback.print_exc()\n"
    "    sys.stderr.flush()\n"
    "    os._exit(1)\n"
)

_live: weakref.WeakSet[SpawnedRanks] = weakref.WeakSet()


@atexit.register
def _kill_live_ranks() -> None:
    # Python's atexit hooks run before mpi4py's MPI_Finalize, which would wait for connected ranks.
    for ranks in list(_live):
        ranks.kill()


def replica_device_ids(num_ranks: int) -> list[int]:
    """Local CUDA ordinals of an engine's ranks, rank order.

    Ray narrows CUDA_VISIBLE_DEVICES to the GPUs of the replica's placement-group bundle (one node,
    STRICT_PACK), and spawned ranks inherit it, so ordinals 0..N-1 are exactly the replica's GPUs.
    Raises:
        ValueError: the process sees fewer GPUs than the engine has ranks.
    """
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if visible and len(visible) < num_ranks:
        raise ValueError(
            f"the engine has {num_ranks} ranks but this process sees {len(visible)} GPUs "
            f"(CUDA_VISIBLE_DEVICES={','.join(visible)}): set the replica's num_gpus_per_replica "
            f"to {num_ranks}"
        )
    return list(range(num_ranks))


def detach_stdin() -> None:
    """Spawned ranks run under Open MPI's orted, which forwards this process's stdin to the first of them:
    a replica started from a terminal would hand its keystrokes to an engine rank."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


def prepare_mpi() -> None:
    """Before this process first initializes MPI: the environment a Serve replica gets from placement.py, for
    processes started another way (tests, scripts, benchmarks); a replica's own values win."""
    for key, value in mpi_env_vars(spawns_workers=True).items():
        os.environ.setdefault(key, value)
    detach_stdin()


def spawn_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment spawned ranks get on top of Open MPI's copy: the forwarded variables as they are now,
    this package's root first on PYTHONPATH (the ranks run the replica's code), and `extra`."""
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {
        k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_PREFIXES) and "\n" not in v
    }
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p
    )
    env.update(extra)
    return env


class ProcessWatch:
    """One process, watched through a pidfd: exit is seen without polling and a kill never hits a recycled pid."""

    __slots__ = ("_fd", "pid")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self._fd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._fd = None  # already gone

    def has_exited(self, timeout_s: float = 0.0) -> bool:
        """Waits up to `timeout_s` for the process to exit; True once it has."""
        if self._fd is None:
            return True
        readable, _, _ = select.select([self._fd], [], [], timeout_s)
        return bool(readable)

    def kill(self) -> None:
        if self._fd is not None and not self.has_exited():
            try:
                signal.pidfd_send_signal(self._fd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True, slots=True)
class RankProcess:
    rank: int  # in the engine; the replica is rank 0
    pid: int


class SpawnedRanks:
    """Ranks 1..N-1 of one engine, spawned by this process (rank 0) with `MPI_Comm_spawn`.

    Threading: `spawn` and `close` block for seconds (call them off the event loop); `dead_ranks` is cheap.
    """

    def __init__(self, intercomm: Any, processes: list[RankProcess]) -> None:
        self._intercomm = intercomm
        self.processes = processes
        self._watches = {p.rank: ProcessWatch(p.pid) for p in processes}
        self._is_closed = False
        _live.add(self)

    @classmethod
    def spawn(
        cls,
        module: str,
        num_ranks: int,
        payload: Mapping[str, Any],
        env: Mapping[str, str],
        *,
        timeout_s: float = 1800.0,
    ) -> SpawnedRanks:
        """Starts `num_ranks` processes that run `module` as `__main__`, and returns once each has received
        `payload` (plus `rank` and `driver_pid`; see `connect_to_driver`).

        Args:
            env: variables for the ranks on top of `spawn_env`'s.
            timeout_s: how long the ranks may take to import their module and take the payload.
        Raises:
            RuntimeError: MPI could not start the ranks, or one exited (or hung) before taking its payload.
        """
        prepare_mpi()
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise RuntimeError(
                "spawning engine ranks needs mpi4py and Open MPI: pip install 'shepherd-serve[tp]' "
                "and apt-get install openmpi-bin libopenmpi-dev"
            ) from exc

        info = MPI.Info.Create()
        # Without it Open MPI pins every spawned rank to one core (nvbugs/4574329).
        info.Set("bind_to", "none")
        # Open MPI's spawn key "env": one NAME=value per line, set in every spawned process.
        info.Set("env", "\n".join(f"{k}={v}" for k, v in spawn_env(env).items()))
        try:
            intercomm = MPI.COMM_SELF.Spawn(
                sys.executable, args=["-c", _BOOTSTRAP, module], maxprocs=num_ranks, info=info
            )
        except MPI.Exception as exc:
            raise RuntimeError(f"MPI could not spawn {num_ranks} ranks of {module}: {exc}") from exc
        finally:
            info.Free()
        pids = [int(pid) for pid in intercomm.gather(None, root=MPI.ROOT) or []]
        ranks = cls(intercomm, [RankProcess(rank=i + 1, pid=pid) for i, pid in enumerate(pids)])
        logger.info("spawned ranks of %s: %s", module, ranks.processes)
        message = {**payload, "driver_pid": os.getpid()}
        # Synchronous sends: complete once each rank has taken its payload, not once MPI buffered it.
        sends = [intercomm.issend(message, dest=i) for i in range(num_ranks)]
        deadline = time.monotonic() + timeout_s
        # A blocking send would wait forever for a rank that died while importing.
        while not MPI.Request.Testall(sends):
            dead = ranks.dead_ranks()
            if dead or time.monotonic() > deadline:
                ranks.kill()
                what = f"exited ({dead})" if dead else f"did not answer within {timeout_s:.0f} s"
                raise RuntimeError(f"ranks of {module} {what} before starting: see the log")
            time.sleep(0.05)
        return ranks

    def dead_ranks(self) -> list[int]:
        """Ranks whose process has exited."""
        return [rank for rank, watch in self._watches.items() if watch.has_exited()]

    def close(self, *, is_clean: bool, timeout_s: float = 10.0) -> None:
        """Ends the ranks; idempotent.

        Args:
            is_clean: the ranks' work ended normally and they are disconnecting (their side of the collective
                `MPI_Comm_disconnect`). Otherwise, or if they take longer than `timeout_s`, they are killed.
        """
        if self._is_closed:
            return
        self._is_closed = True
        _live.discard(self)
        if is_clean and not self.dead_ranks():
            # Disconnect waits for every rank; a rank that hangs must not hang the replica's shutdown.
            disconnect = threading.Thread(
                target=self._intercomm.Disconnect, name="ranks-disconnect", daemon=True
            )
            disconnect.start()
            disconnect.join(timeout_s)
            if disconnect.is_alive():
                logger.error("ranks did not disconnect within %.0f s: killing them", timeout_s)
        deadline = time.monotonic() + (timeout_s if is_clean else 0.0)
        for watch in self._watches.values():
            if not watch.has_exited(max(0.0, deadline - time.monotonic())):
                logger.warning("rank pid %d still runs: killing it", watch.pid)
                watch.kill()
        for watch in self._watches.values():
            watch.has_exited(2.0)
            watch.close()

    def kill(self) -> None:
        self.close(is_clean=False)


# ---- in a spawned rank ------------------------------------------------------------------------------------
def connect_to_driver() -> tuple[Any, dict[str, Any]]:
    """In a rank started by `SpawnedRanks.spawn`: receives the payload.

    Returns:
        (intercommunicator to the replica, payload with `rank` and `driver_pid`).
    Raises:
        SystemExit: this process was not spawned by a replica.
    """
    from mpi4py import MPI

    parent = MPI.Comm.Get_parent()
    if parent == MPI.COMM_NULL:
        raise SystemExit("an engine rank must be spawned by its replica (MPI_Comm_spawn)")
    payload: dict[str, Any] = parent.recv(source=0)
    return parent, {**payload, "rank": MPI.COMM_WORLD.Get_rank() + 1}
