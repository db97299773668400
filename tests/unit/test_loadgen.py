"""The load generator's arithmetic and scheduling (benchmarks/loadgen.py): TPOT, aggregates and goodput, the
closed loop's concurrency bound, sessions that carry their history, seeded Poisson arrivals, the in-process
backend, and the plots. The HTTP backend runs against the served app in tests/e2e/test_loadgen_e2e.py."""

from __future__ import annotations

import asyncio
import math
import random
import threading
from pathlib import Path
from typing import Any

import pytest

from benchmarks import loadgen
from benchmarks.loadgen import Job, RequestRecord, run_load, summarize
from deployments.config import EmulatorConfig
from deployments.executors.emulator import EmulatorExecutor

_pause = asyncio.sleep  # the fake backend's own waits: not the arrival gaps a test may record


def record(
    ttft: float, latency: float, num_output_tokens: int, *, turn: int = 0, error: str | None = None
) -> RequestRecord:
    return RequestRecord(
        start=0.0,
        ttft=ttft,
        latency=latency,
        num_output_tokens=num_output_tokens,
        num_prompt_tokens=10,
        num_chunks=num_output_tokens,
        turn=turn,
        error=error,
    )


def test_tpot_spreads_the_time_after_the_first_token_over_the_tokens_after_it() -> None:
    assert record(0.1, 1.0, 10).tpot == pytest.approx(0.1)
    assert math.isnan(record(0.1, 0.1, 1).tpot)


def test_the_summary_counts_throughput_percentiles_failures_and_goodput() -> None:
    records = [
        record(0.010, 0.110, 11),  # TPOT 10 ms
        record(0.020, 0.420, 21),  # TPOT 20 ms
        record(0.300, 0.500, 11),  # TTFT over the SLO
        record(math.nan, math.nan, 0, error="HTTP 503: busy"),
    ]
    summary = summarize(records, 2.0, ttft_slo_ms=100, tpot_slo_ms=15)
    assert (summary["num_completed"], summary["num_failed"]) == (3, 1)
    assert summary["errors"] == ["HTTP 503: busy"]
    assert summary["output_throughput"] == pytest.approx(43 / 2.0)
    assert summary["request_throughput"] == pytest.approx(1.5)
    assert summary["total_token_throughput"] == pytest.approx((43 + 30) / 2.0)
    assert summary["ttft_ms"]["p50"] == pytest.approx(20.0)
    assert summary["ttft_ms"]["mean"] == pytest.approx(110.0)
    assert summary["tpot_ms"]["p50"] == pytest.approx(20.0)
    # Only the first record meets both SLOs: one good request in 2 s.
    assert summary["goodput"]["request_goodput"] == pytest.approx(0.5)
    assert "ttft_ms_by_turn" not in summary


def test_multi_turn_summaries_report_ttft_per_turn() -> None:
    records = [record(0.010, 0.1, 5, turn=0), record(0.030, 0.1, 5, turn=1)]
    by_turn = summarize(records, 1.0)["ttft_ms_by_turn"]
    assert by_turn["0"]["p50"] == pytest.approx(10.0)
    assert by_turn["1"]["p50"] == pytest.approx(30.0)


class FakeBackend:
    """Answers after a short sleep, counting requests in flight and keeping what each request was sent."""

    def __init__(self, fail_turn: int | None = None) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.sent: list[tuple[str, list[dict[str, str]]]] = []
        self._fail_turn = fail_turn

    async def send(
        self,
        text: str,
        token_ids: list[int] | None,
        history: list[dict[str, str]],
        record: RequestRecord,
    ) -> None:
        self.sent.append((text, list(history)))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await _pause(0.002)
            if self._fail_turn is not None and len(history) // 2 == self._fail_turn:
                raise ConnectionError("server went away")
            record.ttft, record.latency = 0.001, 0.002
            record.num_output_tokens, record.num_chunks = 2, 2
            record.text = f"answer to {text}"
        finally:
            self.in_flight -= 1

    async def close(self) -> None:
        return None


def jobs(num_jobs: int, num_turns: int) -> list[Job]:
    return [Job([(f"q{j}.{t}", None) for t in range(num_turns)]) for j in range(num_jobs)]


def test_the_closed_loop_keeps_exactly_its_concurrency_busy_and_runs_every_job() -> None:
    backend = FakeBackend()
    records, duration = asyncio.run(run_load(backend, jobs(40, 1), concurrency=4))
    assert len(records) == 40 and all(r.ok for r in records)
    assert backend.max_in_flight == 4
    assert duration > 0


def test_a_session_sends_its_growing_history_and_stops_at_its_first_failure() -> None:
    backend = FakeBackend()
    records, _ = asyncio.run(run_load(backend, jobs(1, 3), concurrency=1))
    assert [r.turn for r in records] == [0, 1, 2]
    assert backend.sent[2] == (
        "q0.2",
        [
            {"role": "user", "content": "q0.0"},
            {"role": "assistant", "content": "answer to q0.0"},
            {"role": "user", "content": "q0.1"},
            {"role": "assistant", "content": "answer to q0.1"},
        ],
    )
    failing = FakeBackend(fail_turn=1)
    records, _ = asyncio.run(run_load(failing, jobs(1, 3), concurrency=1))
    assert [r.ok for r in records] == [True, False]
    assert records[1].error == "ConnectionError: server went away"


def test_poisson_arrivals_wait_the_seeded_exponential_gaps(monkeypatch: pytest.MonkeyPatch) -> None:
    gaps: list[float] = []
    real_sleep = asyncio.sleep
    test_thread = threading.get_ident()

    # `loadgen.asyncio` is the process-wide module: threads that earlier tests in this worker left
    # running (engine loops, Ray's) sleep through it too, so only this thread's waits are recorded.
    async def recorded_sleep(delay: float) -> None:
        if threading.get_ident() != test_thread:
            await real_sleep(delay)
            return
        gaps.append(delay)
        await _pause(0)

    monkeypatch.setattr(loadgen.asyncio, "sleep", recorded_sleep)
    backend = FakeBackend()
    asyncio.run(run_load(backend, jobs(20, 1), concurrency=None, rate=50.0, seed=7))
    expected = random.Random(7)
    assert gaps == [expected.expovariate(50.0) for _ in range(20)]
    assert len(backend.sent) == 20


def test_the_in_process_backend_times_the_emulator_and_counts_its_tokens(model_dir: Path) -> None:
    async def body() -> list[RequestRecord]:
        executor = EmulatorExecutor(
            EmulatorConfig(ttft_ms=20, itl_ms=2, max_batch_size=8), str(model_dir)
        )
        await executor.start()
        try:
            backend = loadgen.ExecutorBackend(executor, max_tokens=12)
            work = [Job([("", [5, 6, 7, 8])]) for _ in range(4)]
            records, _ = await run_load(backend, work, concurrency=4)
            return records
        finally:
            await executor.shutdown()

    records = asyncio.run(body())
    for r in records:
        assert r.ok and r.num_output_tokens == 12 and r.num_prompt_tokens == 4
        assert r.ttft >= 0.020  # the emulator's configured time to first token is a floor
        assert len(r.itl) == r.num_chunks - 1 and r.latency >= r.ttft


def test_the_plots_are_a_png_of_ttft_itl_and_throughput(tmp_path: Path) -> None:
    from benchmarks.plots import plot_levels

    def level(concurrency: int, ttft: float) -> dict[str, Any]:
        stats = {"mean": ttft, "p50": ttft, "p90": ttft, "p99": ttft * 2}
        return {
            "concurrency": concurrency,
            "ttft_ms": stats,
            "itl_ms": stats,
            "output_throughput": 100.0 * concurrency,
        }

    path = plot_levels(
        {"stack": [level(1, 20), level(8, 40)], "in-process": [level(1, 18), level(8, 30)]},
        tmp_path / "sweep.png",
        title="test",
    )
    assert Path(path).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
