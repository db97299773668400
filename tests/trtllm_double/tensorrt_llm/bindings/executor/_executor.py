"""`Executor`: the bindings' entry point, with the real call conventions and failure modes.

Mirrors nanobind/executor/executor.cpp@f0c873f5 and executorImpl.cpp@b35ac1b6 (reference §1.1,
§4, §6):
- timeouts are `datetime.timedelta` or a float in *seconds*; an `int` is rejected with TypeError,
  as the nanobind chrono caster only accepts PyDelta/PyFloat. `await_responses(5)` therefore
  selects the *request-id* overload, exactly like the binding;
- every method raises RuntimeError("Shutdown called") after `shutdown()`;
- `get_kv_cache_event_manager()` is None in the orchestrator process (it holds no model);
- in orchestrator mode the workers are real processes started by MPI_Comm_spawn (_orchestrator).

Test hook (not in the real bindings): with `$SHEPHERD_TRTLLM_DOUBLE_RECORD` set to a file path,
every enqueued request, cancellation and final response is appended there as one JSON line, so
end-to-end tests can see what the engine was asked from outside the (Ray replica) process owning it.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ._engine import EngineCore, EngineSpec
from ._enums import CommunicationMode, ModelType
from ._guided import check_cpp_runtime
from ._request import Request, Response
from ._stats import IterationStats
from .kv_cache import KVCacheEventManager

_RECORD_ENV = "SHEPHERD_TRTLLM_DOUBLE_RECORD"


def _record(lines: list[dict[str, Any]]) -> None:
    """Appends JSON lines to $SHEPHERD_TRTLLM_DOUBLE_RECORD (one O_APPEND write per call, so
    processes may share the file)."""
    path = os.environ.get(_RECORD_ENV)
    if not path or not lines:
        return
    pid = os.getpid()
    data = "".join(json.dumps({**line, "pid": pid}) + "\n" for line in lines).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _describe(request_id: int, request: Request) -> dict[str, Any]:
    retention = request.kv_cache_retention_config
    return {
        "event": "enqueue",
        "request_id": request_id,
        "client_id": request.client_id,
        "input_token_ids": request.input_token_ids,
        "max_tokens": request.max_tokens,
        "streaming": request.streaming,
        "end_id": request.end_id,
        "guided_decoding": None
        if (guided := request.guided_decoding_params) is None
        else [guided.guide_type.name, guided.guide],
        "retention": None
        if retention is None
        else {
            "token_ranges": [
                [r.token_start, r.token_end, r.priority]
                for r in retention.token_range_retention_configs
            ],
            "decode_retention_priority": retention.decode_retention_priority,
        },
    }


def _describe_final(response: Response) -> dict[str, Any] | None:
    if response.has_error():
        return {"event": "error", "request_id": response.request_id, "message": response.error_msg}
    result = response.result
    if not result.is_final:
        return None
    return {
        "event": "final",
        "request_id": response.request_id,
        "client_id": response.client_id,
        "finish_reason": result.finish_reasons[0].name,
        "num_generated_tokens": result.decoding_iter,
    }


_AWAIT_SIGNATURES = """await_responses(): incompatible function arguments. The following argument \
types are supported:
    1. await_responses(self, timeout: datetime.timedelta | None = None) -> list[Response]
    2. await_responses(self, id: int, timeout: datetime.timedelta | None = None) -> list[Response]
    3. await_responses(self, ids: collections.abc.Sequence[int], \
timeout: datetime.timedelta | None = None) -> list[list[Response]]
"""


def _is_timeout(value: Any) -> bool:
    return value is None or isinstance(value, (datetime.timedelta, float))


def _timeout_s(value: datetime.timedelta | float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        return max(0.0, value.total_seconds())
    return max(0.0, float(value))  # a float is seconds (nanobind stl/chrono.h)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _resolve_await(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, Any, Any]:
    """Pick the overload like nanobind: first one whose arguments all convert."""
    names = ("timeout",), ("id", "timeout"), ("ids", "timeout")
    for kind, params in zip(("all", "id", "ids"), names, strict=True):
        if len(args) > len(params) or set(kwargs) - set(params):
            continue
        bound = dict(zip(params, args, strict=False))
        if set(bound) & set(kwargs):
            continue
        bound.update(kwargs)
        timeout = bound.get("timeout")
        if not _is_timeout(timeout):
            continue
        if kind == "all":
            return kind, None, timeout
        target = bound.get(params[0])
        if kind == "id" and _is_int(target):
            return kind, target, timeout
        if kind == "ids" and isinstance(target, (list, tuple)) and all(map(_is_int, target)):
            return kind, list(target), timeout
    arg_types = ", ".join(type(a).__name__ for a in args)
    kwarg_types = ", ".join(f"{k}: {type(v).__name__}" for k, v in kwargs.items())
    raise TypeError(
        f"{_AWAIT_SIGNATURES}\nInvoked with types: Executor, {arg_types}, "
        f"kwargs = {{ {kwarg_types} }}"
    )


class _ResponseStore:
    """Ready responses, drained by any await overload; remembers ids whose final was taken."""

    def __init__(self, is_shut_down: threading.Event) -> None:
        self._cond = threading.Condition()
        self._ready: list[Response] = []
        self._terminated: set[int] = set()
        self._is_shut_down = is_shut_down

    def push(self, responses: list[Response]) -> None:
        if responses and os.environ.get(_RECORD_ENV):
            _record([line for line in map(_describe_final, responses) if line is not None])
        if responses:
            with self._cond:
                self._ready.extend(responses)
                self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def num_ready(self, request_id: int | None) -> int:
        with self._cond:
            return sum(1 for r in self._ready if request_id in (None, r.request_id))

    def take(self, request_ids: list[int] | None, timeout_s: float | None) -> list[Response]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while True:
                taken = [
                    r for r in self._ready if request_ids is None or r.request_id in request_ids
                ]
                if taken or self._is_shut_down.is_set():
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._cond.wait(0.05 if remaining is None else min(remaining, 0.05))
            self._ready = [r for r in self._ready if r not in taken]
            for response in taken:
                if response.has_error() or response.result.is_final:
                    self._terminated.add(response.request_id)
            return taken

    def is_terminated(self, request_id: int) -> bool:
        with self._cond:
            return request_id in self._terminated


class _LocalBackend:
    """Leader mode with one rank: the engine runs on a thread of this process."""

    def __init__(
        self,
        spec: EngineSpec,
        config: Any,
        on_responses: Callable[[list[Response]], None],
        on_fatal: Callable[[str], None],
    ) -> None:
        self.core = EngineCore(spec, config)
        self._spec = spec
        self._on_responses = on_responses
        self._on_fatal = on_fatal
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trtllm-double-engine", daemon=True)
        self._thread.start()

    def submit(self, request_id: int, request: Request) -> None:
        self.core.enqueue(request_id, request)

    def cancel(self, request_id: int) -> None:
        self.core.cancel(request_id)

    def iteration_stats(self) -> list[IterationStats]:
        return self.core.drain_iteration_stats()

    def shutdown(self) -> None:
        self._stop.set()
        self.core.wake.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.core.has_work():
                    self.core.wake.wait(0.05)
                    self.core.wake.clear()
                    continue
                started = time.perf_counter()
                self._on_responses(self.core.step())
                time.sleep(max(0.0, self._spec.iter_latency_s - (time.perf_counter() - started)))
        except Exception as exc:  # the engine thread died: every later call fails with the cause
            self._on_fatal(str(exc))


class Executor:
    """Serves one `trtllm-build` engine directory (decoder-only in the double)."""

    def __init__(self, model_path: Any, model_type: ModelType, executor_config: Any) -> None:
        spec = EngineSpec.from_engine_dir(model_path)
        if model_type is not ModelType.DECODER_ONLY:
            raise RuntimeError("the double only serves ModelType.DECODER_ONLY engines")
        self._is_shut_down = threading.Event()
        self._shutdown_called = False
        self._fatal_error: str | None = None
        self._responses = _ResponseStore(self._is_shut_down)
        self._next_request_id = 1
        self._id_lock = threading.Lock()
        self._is_orchestrator = False
        parallel = executor_config.parallel_config
        mode = parallel.communication_mode if parallel is not None else CommunicationMode.LEADER
        if parallel is not None and parallel.device_ids is not None:
            num_nodes = parallel.num_nodes or 1
            if len(parallel.device_ids) * num_nodes != spec.world_size:
                raise RuntimeError(
                    "[TensorRT-LLM][ERROR] Assertion failed: deviceIds.size() * numNodes == "
                    f"tp * pp * cp ({len(parallel.device_ids)} * {num_nodes} != {spec.world_size})"
                )
        if executor_config.guided_decoding_config is not None:
            check_cpp_runtime(executor_config.guided_decoding_config)
        self._backend: Any
        if mode is CommunicationMode.ORCHESTRATOR:
            from ._orchestrator import OrchestratorBackend  # imports mpi4py

            orch = parallel.orchestrator_config
            if orch is None:
                raise RuntimeError("[TensorRT-LLM][ERROR] OrchestratorConfig is required")
            if orch.spawn_processes and parallel.participant_ids is not None:
                raise RuntimeError(
                    "[TensorRT-LLM][ERROR] participant_ids must not be set when spawning processes"
                )
            if not orch.spawn_processes:
                raise RuntimeError("the double does not simulate spawn_processes=False")
            self._is_orchestrator = True
            self._backend = OrchestratorBackend(
                str(model_path),
                model_type,
                executor_config,
                spec,
                device_ids=parallel.device_ids or list(range(spec.world_size)),
                on_responses=self._responses.push,
                on_fatal=self._set_fatal,
            )
        else:
            if spec.world_size != 1:
                raise RuntimeError(
                    "[TensorRT-LLM][ERROR] Assertion failed: MPI worldSize is expected to be equal "
                    f"to tp*pp*cp (1 != {spec.world_size}); launch with mpirun -n "
                    f"{spec.world_size} or use orchestrator mode"
                )
            self._backend = _LocalBackend(
                spec, executor_config, self._responses.push, self._set_fatal
            )

    # ---- requests --------------------------------------------------------------------------------
    def enqueue_request(self, request: Request) -> int:
        return self.enqueue_requests([request])[0]

    def enqueue_requests(self, requests: list[Request]) -> list[int]:
        self._check_usable()
        ids: list[int] = []
        for request in requests:
            if not isinstance(request, Request):
                raise TypeError("enqueue_request(): incompatible function arguments")
            with self._id_lock:
                request_id = self._next_request_id
                self._next_request_id += 1
            # Recorded before the engine sees it, so the record is in causal order.
            _record([_describe(request_id, request)] if os.environ.get(_RECORD_ENV) else [])
            try:
                self._backend.submit(request_id, request)
            except RuntimeError as exc:
                _record([{"event": "error", "request_id": request_id, "message": str(exc)}])
                raise
            ids.append(request_id)
        return ids

    def await_responses(self, *args: Any, **kwargs: Any) -> Any:
        """Overloads: `(timeout=None)`, `(id, timeout=None)`, `(ids, timeout=None)`."""
        kind, target, timeout = _resolve_await(args, kwargs)
        self._check_usable()
        timeout_s = _timeout_s(timeout)
        if kind == "all":
            return self._responses.take(None, timeout_s)
        if kind == "id":
            return self._await_one(target, timeout_s)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        out = []
        for request_id in target:  # the ids share one timeout budget
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            out.append(self._await_one(request_id, remaining))
        return out

    def get_num_responses_ready(self, id: int | None = None) -> int:
        self._check_usable()
        return self._responses.num_ready(id)

    def cancel_request(self, id: int | None = None) -> None:
        self._check_usable()
        if not _is_int(id):
            raise TypeError("cancel_request(): incompatible function arguments (id: int)")
        _record([{"event": "cancel", "request_id": id}])
        self._backend.cancel(id)

    def can_enqueue_requests(self) -> bool:
        return not self._shutdown_called

    # ---- introspection ---------------------------------------------------------------------------
    def get_latest_iteration_stats(self) -> list[IterationStats]:
        self._check_usable()
        return self._backend.iteration_stats()

    def get_latest_request_stats(self) -> list[Any]:
        self._check_usable()
        return []

    def get_latest_debug_tensors(self) -> list[Any]:
        self._check_usable()
        if self._is_orchestrator:
            raise RuntimeError(
                "[TensorRT-LLM][ERROR] getLatestDebugTensors is not supported in orchestrator mode"
            )
        return []

    def get_kv_cache_event_manager(self) -> KVCacheEventManager | None:
        self._check_usable()
        if self._is_orchestrator:
            return None  # no local model in the orchestrator process
        return KVCacheEventManager(self._backend.core.events, self._is_shut_down)

    # ---- lifetime --------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Blocking: stops the engine (and joins spawned workers); idempotent."""
        if self._shutdown_called:
            return
        self._shutdown_called = True
        self._backend.shutdown()
        self._is_shut_down.set()
        self._responses.wake()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        self.shutdown()

    # ---- internals ------------------------------------------------------------------------------
    def _await_one(self, request_id: int, timeout_s: float | None) -> list[Response]:
        if self._responses.is_terminated(request_id) or request_id >= self._next_request_id:
            message = f"ReqId {request_id} has already been processed and was terminated."
            return [Response(request_id, message)]
        return self._responses.take([request_id], timeout_s)

    def _set_fatal(self, message: str) -> None:
        self._fatal_error = message
        self._is_shut_down.set()  # wakes blocked awaiters; the next call raises the cause
        self._responses.wake()

    def _check_usable(self) -> None:
        if self._shutdown_called:
            raise RuntimeError("Shutdown called")
        if self._fatal_error is not None:
            raise RuntimeError(self._fatal_error)
