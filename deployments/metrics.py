"""Prometheus metrics of one replica: recorded through Ray Serve's metrics API and mirrored for `/metrics`.

Every metric is written twice: to `ray.serve.metrics` (Ray's metrics agent exports it, with the deployment,
replica and application tags, on each node's Prometheus endpoint as `ray_<name>`), and to a registry private
to this process, which `render_summary()` prints in the Prometheus text format. So the ingress `/metrics`
route shows **this router replica's own** series only; the cluster-wide view is Ray's endpoint.

Metric objects are created lazily, on first use, inside the replica (Serve's tags need its replica context);
importing this module creates nothing. Labels are bounded: route templates, status codes, finish reasons.
Nothing here ever sees an API key or message text.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

logger = logging.getLogger(__name__)

MetricKind = Literal["counter", "gauge", "histogram"]
# Router latencies (TTFT, end to end) span 5 ms .. minutes; ITL spans 1 ms .. seconds (vLLM's buckets).
# fmt: off
LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
                     40.0, 80.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.5,
                 1.0, 2.5)
# fmt: on
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class MetricSpec:
    kind: MetricKind
    name: str
    description: str
    tag_keys: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


class Metric:
    """One metric, recorded both to Ray (cluster export) and to this process's registry (`/metrics`)."""

    def __init__(self, spec: MetricSpec) -> None:
        self.spec = spec
        self._local: Any = None
        self._ray: Any = None
        self._generation = -1

    def inc(self, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None:
        if value > 0:
            self._record("inc", value, tags)

    def set(self, value: float, tags: Mapping[str, str] | None = None) -> None:
        self._record("set", value, tags)

    def observe(self, value: float, tags: Mapping[str, str] | None = None) -> None:
        self._record("observe", value, tags)

    def _record(self, method: str, value: float, tags: Mapping[str, str] | None) -> None:
        tags = dict(tags or {})
        if self._generation != _registry.generation:
            self._create()
        local = self._local.labels(**tags) if self.spec.tag_keys else self._local
        getattr(local, method)(value)
        if self._ray is not None:
            try:
                getattr(self._ray, method)(value, tags=tags or None)
            except Exception:  # never fail a request over an export problem
                logger.exception(
                    "recording %s to Ray failed; exporting to Ray stops", self.spec.name
                )
                self._ray = None

    def _create(self) -> None:
        with _registry.lock:
            if self._generation == _registry.generation:
                return
            self._local = _registry.local_metric(self.spec)
            self._ray = _registry.ray_metric(self.spec)
            self._generation = _registry.generation


class _Registry:
    """The process's private prometheus_client registry, and whether Ray export is on (it is inside Ray)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.generation = 0
        # None: export when Ray is initialised (always, in a replica).
        self.export_to_ray: bool | None = None
        self._local: Any = None

    @property
    def local(self) -> Any:
        if self._local is None:
            import prometheus_client

            # `*_created` series only repeat process start times here; drop them (process-wide setting).
            prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
            self._local = prometheus_client.CollectorRegistry(auto_describe=True)
        return self._local

    def local_metric(self, spec: MetricSpec) -> Any:
        import prometheus_client

        cls = {"counter": prometheus_client.Counter, "gauge": prometheus_client.Gauge}.get(
            spec.kind
        )
        kwargs: dict[str, Any] = {"labelnames": spec.tag_keys, "registry": self.local}
        if cls is None:
            cls, kwargs["buckets"] = prometheus_client.Histogram, spec.buckets
        return cls(spec.name, spec.description, **kwargs)

    def ray_metric(self, spec: MetricSpec) -> Any:
        export = self.export_to_ray
        if export is None:
            import ray

            export = ray.is_initialized()
        if not export:
            return None
        try:
            from ray.serve import metrics as serve_metrics

            # Ray annotates tag_keys as `Tuple[str]` (one element) but takes any tuple of names.
            tag_keys = cast("tuple[str]", spec.tag_keys)
            if spec.kind == "histogram":
                return serve_metrics.Histogram(
                    spec.name,
                    description=spec.description,
                    boundaries=list(spec.buckets),
                    tag_keys=tag_keys,
                )
            cls = serve_metrics.Counter if spec.kind == "counter" else serve_metrics.Gauge
            return cls(spec.name, description=spec.description, tag_keys=tag_keys)
        except Exception:
            logger.exception("cannot create the Ray metric %s; it is only in /metrics", spec.name)
            return None

    def reset(self, *, export_to_ray: bool | None = None) -> None:
        """Forget every series (tests); metrics re-create themselves on next use."""
        with self.lock:
            self._local = None
            self.export_to_ray = export_to_ray
            self.generation += 1


_registry = _Registry()
reset = _registry.reset


def render_summary() -> tuple[bytes, str]:
    """This process's series in the Prometheus text format, and its content type (for `GET /metrics`)."""
    from prometheus_client import generate_latest

    return generate_latest(_registry.local), CONTENT_TYPE


def _counter(name: str, description: str, *tag_keys: str) -> Metric:
    return Metric(MetricSpec("counter", name, description, tag_keys))


def _gauge(name: str, description: str, *tag_keys: str) -> Metric:
    return Metric(MetricSpec("gauge", name, description, tag_keys))


def _histogram(name: str, description: str, buckets: tuple[float, ...], *tag_keys: str) -> Metric:
    return Metric(MetricSpec("histogram", name, description, tag_keys, buckets))


# ---- router: HTTP requests, generations, sessions --------------------------------------------------------
REQUESTS = _counter(
    "shepherd_requests_total", "HTTP requests by route template and status code.", "route", "status"
)
REJECTIONS = _counter(
    "shepherd_rejected_requests_total",
    "Requests refused: body_too_large, replica_full, key_limit, engine_full, engine_unavailable.",
    "reason",
)
FINISHES = _counter(
    "shepherd_request_finish_total",
    "Generations by how they ended (finish reason).",
    "route",
    "finish_reason",
)
TTFT = _histogram(
    "shepherd_time_to_first_token_seconds",
    "Arrival to first token (router side).",
    LATENCY_BUCKETS_S,
    "route",
)
ITL = _histogram(
    "shepherd_inter_token_latency_seconds",
    "Time per output token after the first.",
    ITL_BUCKETS_S,
    "route",
)
E2E = _histogram(
    "shepherd_e2e_latency_seconds",
    "Arrival to last token of a generation.",
    LATENCY_BUCKETS_S,
    "route",
)
PROMPT_TOKENS = _counter(
    "shepherd_prompt_tokens_total", "Prompt tokens of finished generations.", "route"
)
CACHED_PROMPT_TOKENS = _counter(
    "shepherd_cached_prompt_tokens_total",
    "Prompt tokens of finished generations whose KV the engine reused (its prefix cache).",
    "route",
)
COMPLETION_TOKENS = _counter("shepherd_completion_tokens_total", "Tokens generated.", "route")
IN_FLIGHT = _gauge(
    "shepherd_requests_in_flight", "HTTP requests this router replica is working on."
)
ACTIVE_SESSIONS = _gauge(
    "shepherd_active_sessions", "Sessions with a turn in progress on this router replica."
)
SESSION_TURNS = _counter(
    "shepherd_session_turns_total", "Session turns by outcome: committed, aborted.", "outcome"
)
EVICTED_MESSAGES = _counter(
    "shepherd_session_evicted_messages_total", "Messages evicted to fit the context window."
)
ENGINE_STREAMS = _counter(
    "shepherd_engine_streams_total",
    "Engine streams this router replica opened, by path: direct (the engine channel) or serve_handle.",
    "transport",
)
ENGINE_DIRECT_REPLICAS = _gauge(
    "shepherd_engine_direct_replicas",
    "Engine replicas this router replica reaches over their channel.",
)
TEMPLATE_BREAKS = _counter(
    "shepherd_session_template_breaks_total",
    "Turns whose re-rendered history no longer began with the stored prompt.",
)

# ---- engine: executor statistics ---------------------------------------------------------------------
ENGINE_ACTIVE = _gauge(
    "shepherd_engine_active_requests", "Requests the executor is running or holding."
)
ENGINE_QUEUED = _gauge(
    "shepherd_engine_queued_requests", "Requests waiting in the executor's queue."
)
ENGINE_KV_USAGE = _gauge(
    "shepherd_engine_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use."
)
ENGINE_PREFIX_HIT = _gauge(
    "shepherd_engine_prefix_cache_hit_rate", "Prefix (KV block reuse) hit rate."
)
ENGINE_REQUESTS = _counter(
    "shepherd_engine_requests_total",
    "Executor requests by event: submitted, finished, cancelled.",
    "event",
)
ENGINE_TOKENS = _counter("shepherd_engine_generated_tokens_total", "Tokens the executor generated.")
ENGINE_PROMPT_TOKENS = _counter(
    "shepherd_engine_prompt_tokens_total",
    "Prompt tokens the executor admitted, by whether their KV was reused from its prefix cache "
    "(cached) or computed (uncached).",
    "cache",
)


# Refusals by their error code, for `shepherd_rejected_requests_total{reason}`.
_REJECTION_REASONS = {
    "request_too_large": "body_too_large",
    "server_overloaded": "replica_full",
    "concurrency_limit_exceeded": "key_limit",
    "engine_overloaded": "engine_full",
}


def count_rejection(error: Any) -> None:
    """Counts a refused request (a `ServingError` about to be answered) by its reason, if it is one."""
    reason = _REJECTION_REASONS.get(str(error.code))
    if reason is None and error.status_code == 503:
        reason = "engine_unavailable"
    if reason is not None:
        REJECTIONS.inc(1, {"reason": reason})


# ---- per-request records -----------------------------------------------------------------------------
@dataclass(slots=True)
class RequestRecord:
    """What the access log line of one request says (`access_log.py`); filled by the generation too."""

    request_id: str
    method: str
    route: str
    started_at: float = field(default_factory=time.monotonic)
    status: int | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int | None = None
    num_completion_tokens: int | None = None
    ttft_s: float | None = None
    session_id: str | None = None


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "shepherd_request", default=None
)


def current_request() -> RequestRecord | None:
    """The request this task serves (set by the access log, for HTTP and handle calls), if any."""
    return _current.get()


def enter_request(record: RequestRecord) -> contextvars.Token[RequestRecord | None]:
    """Makes `record` the current request of this task (and of the tasks it starts)."""
    return _current.set(record)


def leave_request(token: contextvars.Token[RequestRecord | None]) -> None:
    try:
        _current.reset(token)
    except ValueError:  # an async generator closed from another context (garbage collection)
        _current.set(None)


class RequestMetrics:
    """One generation seen from the router: TTFT, ITL, end-to-end latency, tokens, and how it finished.

    The generation calls `on_tokens` for every delta it consumes and `on_finish` once (later calls are
    ignored, so "cancelled" from a close after a clean finish changes nothing). Times start at the
    request's arrival when there is a current request (queueing in the router counts), else at construction.
    """

    __slots__ = ("_finished", "_last_token_at", "_record", "route", "session_id", "started_at")

    def __init__(self, route: str, *, session_id: str | None = None) -> None:
        self.route = route
        self.session_id = session_id
        self._record = current_request()
        self.started_at = self._record.started_at if self._record is not None else time.monotonic()
        self._last_token_at: float | None = None
        self._finished = False
        if session_id is not None:
            _sessions_in_progress.add(1)
            if self._record is not None:
                self._record.session_id = session_id

    def on_tokens(self, num_tokens: int) -> None:
        if num_tokens <= 0 or self._finished:
            return
        now = time.monotonic()
        tags = {"route": self.route}
        if self._last_token_at is None:
            ttft_s = now - self.started_at
            TTFT.observe(ttft_s, tags)
            if self._record is not None:
                self._record.ttft_s = ttft_s
        else:
            # One observation per delta: the mean gap of the tokens it carries (a lagging consumer merges).
            ITL.observe((now - self._last_token_at) / num_tokens, tags)
        self._last_token_at = now

    def on_finish(
        self,
        finish_reason: str,
        *,
        num_prompt_tokens: int,
        num_completion_tokens: int,
        num_cached_tokens: int = 0,
    ) -> None:
        if self._finished:
            return
        self._finished = True
        tags = {"route": self.route}
        FINISHES.inc(1, {"route": self.route, "finish_reason": finish_reason})
        PROMPT_TOKENS.inc(num_prompt_tokens, tags)
        CACHED_PROMPT_TOKENS.inc(num_cached_tokens, tags)
        COMPLETION_TOKENS.inc(num_completion_tokens, tags)
        if finish_reason not in ("error", "cancelled"):
            E2E.observe(time.monotonic() - self.started_at, tags)
        if self.session_id is not None:
            _sessions_in_progress.add(-1)
        record = self._record
        if record is not None:
            record.finish_reason = finish_reason
            record.num_prompt_tokens = num_prompt_tokens
            record.num_completion_tokens = num_completion_tokens


class _UpDown:
    """A gauge this process owns the value of (Ray gauges are set, not incremented)."""

    def __init__(self, gauge: Metric) -> None:
        self._gauge = gauge
        self._value = 0
        self._lock = threading.Lock()

    def add(self, delta: int) -> None:
        with self._lock:
            self._value = max(self._value + delta, 0)
            self._gauge.set(self._value)


_sessions_in_progress = _UpDown(ACTIVE_SESSIONS)
requests_in_flight = _UpDown(IN_FLIGHT)


# ---- cumulative counters polled from elsewhere -------------------------------------------------------
class CounterDeltas:
    """Turns cumulative totals (executor or session counters) into counter increments."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def delta(self, name: str, total: float) -> float:
        previous = self._last.get(name, 0.0)
        self._last[name] = total
        # A total that went down belongs to a restarted source: count it from zero again.
        return total - previous if total >= previous else total


class EngineMetrics:
    """Executor statistics as gauges and counters; `update` takes an `ExecutorStats` snapshot."""

    def __init__(self) -> None:
        self._deltas = CounterDeltas()

    def update(self, stats: Any) -> None:
        ENGINE_ACTIVE.set(stats.num_active_requests)
        ENGINE_QUEUED.set(stats.num_queued_requests)
        if stats.kv_cache_usage is not None:
            ENGINE_KV_USAGE.set(stats.kv_cache_usage)
        if stats.prefix_cache_hit_rate is not None:
            ENGINE_PREFIX_HIT.set(stats.prefix_cache_hit_rate)
        for event, total in (
            ("submitted", stats.num_submitted_requests),
            ("finished", stats.num_finished_requests),
            ("cancelled", stats.num_cancelled_requests),
        ):
            ENGINE_REQUESTS.inc(self._deltas.delta(event, total), {"event": event})
        ENGINE_TOKENS.inc(self._deltas.delta("tokens", stats.num_generated_tokens))
        for cache, total in (
            ("cached", stats.num_cached_prompt_tokens),
            ("uncached", stats.num_uncached_prompt_tokens),
        ):
            if total is not None:
                ENGINE_PROMPT_TOKENS.inc(self._deltas.delta(cache, total), {"cache": cache})


class SessionMetrics:
    """The session manager's counters (`SessionCounters` as a dict) as Prometheus counters."""

    def __init__(self) -> None:
        self._deltas = CounterDeltas()

    def update(self, counters: Mapping[str, int]) -> None:
        d = self._deltas.delta
        SESSION_TURNS.inc(
            d("committed", counters.get("num_committed_turns", 0)), {"outcome": "committed"}
        )
        SESSION_TURNS.inc(
            d("aborted", counters.get("num_aborted_turns", 0)), {"outcome": "aborted"}
        )
        EVICTED_MESSAGES.inc(d("evicted", counters.get("num_evicted_messages", 0)))
        TEMPLATE_BREAKS.inc(d("breaks", counters.get("num_template_breaks", 0)))


class EngineStreamMetrics:
    """The engine client's counters (`EngineClient.stats()`) as Prometheus series."""

    def __init__(self) -> None:
        self._deltas = CounterDeltas()

    def update(self, stats: Mapping[str, int]) -> None:
        for transport, key in (
            ("direct", "num_direct_streams"),
            ("serve_handle", "num_handle_streams"),
        ):
            ENGINE_STREAMS.inc(self._deltas.delta(key, stats.get(key, 0)), {"transport": transport})
        ENGINE_DIRECT_REPLICAS.set(stats.get("num_direct_replicas", 0))


def start_polling(update: Callable[[], None], *, interval_s: float = 1.0) -> asyncio.Task[None]:
    """Calls `update()` every `interval_s` on the running loop until the task is cancelled (replica exit)."""

    async def poll() -> None:
        while True:
            try:
                update()
            except Exception:
                logger.exception("updating metrics failed")
            await asyncio.sleep(interval_s)

    return asyncio.get_running_loop().create_task(poll(), name="shepherd-metrics")
