"""Soak: many concurrent streaming sessions for minutes; reports errors, lost turns and replica memory.

Each of `--sessions` clients creates a server-side session and then streams turn after turn on it until
`--duration-s` has passed (a closed loop: one turn in flight per session). A turn counts as served when it
returned 200 and its stream ended with `[DONE]` and no error event. Afterwards every session is read back:
a turn the client saw served but the session lacks is **lost**; one the session kept although the client
saw it fail is **extra** (committed before the failure reached the client; harmless, but reported).
RSS of the Router, Engine and proxy processes is sampled from start (after a warm-up turn per session) to end.

    python -m benchmarks.bench_soak                      # emulator engine, 256 sessions, 5 minutes
    python -m benchmarks.bench_soak --duration-s 60 --config serve_config.yaml --max-tokens 8

It starts its own app (`serve run`, a fresh local Ray) on `--port`, prints one line and writes JSON to
benchmarks/results/. The server is open (no API keys): it is bound to 127.0.0.1 and lives only this long.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS
from benchmarks.loadgen import machine_info
from benchmarks.server import REPO, ServeApp, serve_app

MODEL = "shepherd-tiny"
WORDS = (
    "cache",
    "engine",
    "replica",
    "session",
    "token",
    "router",
    "stream",
    "turn",
    "prefix",
    "block",
)


@dataclass
class SessionTally:
    session_id: str
    num_served: int = 0
    num_failed: int = 0
    server_num_turns: int | None = None


@dataclass
class Tally:
    sessions: list[SessionTally] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    ttft_s: list[float] = field(default_factory=list)
    turn_s: list[float] = field(default_factory=list)


def _rss_mb(pid: int | None) -> float | None:
    import psutil

    if pid is None:
        return None
    try:
        return float(round(psutil.Process(pid).memory_info().rss / 2**20, 1))
    except psutil.Error:
        return None


def replica_rss(app: ServeApp) -> dict[str, float | None]:
    proxy = next(
        (pid for pid, args in _session_pids(app) if args.startswith("ray::ProxyActor")), None
    )
    return {
        "router_mb": _rss_mb(app.pid_of("Router")),
        "engine_mb": _rss_mb(app.pid_of("Engine")),
        "proxy_mb": _rss_mb(proxy),
    }


def _session_pids(app: ServeApp) -> list[tuple[int, str]]:
    from benchmarks.server import session_pids

    return session_pids(app.process.pid)


async def stream_turn(
    http: Any, url: str, session: SessionTally, text: str, max_tokens: int, tally: Tally
) -> bool:
    """One streamed turn; True when it was served cleanly."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "session_id": session.session_id,
    }
    started = time.perf_counter()
    first_at: float | None = None
    is_done = False
    try:
        async with http.post(f"{url}/v1/chat/completions", json=body) as response:
            if response.status != 200:
                tally.errors[f"http_{response.status}"] += 1
                await response.read()
                return False
            buffer = b""
            async for data in response.content.iter_any():
                buffer += data
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    if event == b"data: [DONE]":
                        is_done = True
                    elif event.startswith(b'data: {"error"'):
                        tally.errors["stream_error_event"] += 1
                        return False
                    elif first_at is None and event.startswith(b"data: "):
                        first_at = time.perf_counter()
    except Exception as error:  # aiohttp errors, timeouts, resets
        tally.errors[type(error).__name__] += 1
        return False
    if not is_done:
        tally.errors["no_done"] += 1
        return False
    if first_at is not None:
        tally.ttft_s.append(first_at - started)
    tally.turn_s.append(time.perf_counter() - started)
    return True


async def run_session(
    http: Any,
    url: str,
    session: SessionTally,
    deadline: float,
    max_tokens: int,
    rng: random.Random,
    tally: Tally,
) -> None:
    turn = 0
    while time.monotonic() < deadline:
        text = f"turn {turn}: " + " ".join(rng.choice(WORDS) for _ in range(8))
        if await stream_turn(http, url, session, text, max_tokens, tally):
            session.num_served += 1
        else:
            session.num_failed += 1
            await asyncio.sleep(0.5)  # do not spin on a failing server
        turn += 1


async def soak(app: ServeApp, args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    url = app.base_url
    rng = random.Random(args.seed)
    tally = Tally()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=args.turn_timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        # 1) Sessions, and one warm-up turn each (not counted in the latencies).
        for _ in range(args.sessions):
            async with http.post(
                f"{url}/v1/sessions", json={"system_prompt": "You are terse."}
            ) as response:
                response.raise_for_status()
                tally.sessions.append(SessionTally((await response.json())["id"]))
        warm = Tally()
        warmed = await asyncio.gather(
            *(stream_turn(http, url, s, "hello", args.max_tokens, warm) for s in tally.sessions)
        )
        for session, ok in zip(tally.sessions, warmed, strict=True):
            session.num_served += int(ok)
            session.num_failed += int(not ok)
        tally.errors.update({f"warmup_{k}": v for k, v in warm.errors.items()})
        rss_start = replica_rss(app)
        # 2) The soak, with an RSS timeline.
        started = time.monotonic()
        deadline = started + args.duration_s
        timeline: list[dict[str, Any]] = []
        workers = [
            asyncio.create_task(
                run_session(
                    http, url, s, deadline, args.max_tokens, random.Random(rng.random()), tally
                )
            )
            for s in tally.sessions
        ]
        while time.monotonic() < deadline:
            await asyncio.sleep(min(args.sample_every_s, max(deadline - time.monotonic(), 0)))
            timeline.append(
                {
                    "t_s": round(time.monotonic() - started, 1),
                    "turns": len(tally.turn_s),
                    **replica_rss(app),
                }
            )
        # Every worker finishes its last turn within the turn timeout.
        await asyncio.wait_for(asyncio.gather(*workers), timeout=args.turn_timeout_s + 30)
        elapsed_s = time.monotonic() - started
        rss_end = replica_rss(app)
        # 3) Read every session back.
        for session in tally.sessions:
            async with http.get(f"{url}/v1/sessions/{session.session_id}") as response:
                if response.status == 200:
                    session.server_num_turns = (await response.json())["num_turns"]
                else:
                    tally.errors[f"readback_http_{response.status}"] += 1
    return summarize(tally, args, elapsed_s, rss_start, rss_end, timeline)


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p99_ms": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(int(q * len(ordered)), len(ordered) - 1)] * 1000, 1)

    return {"p50_ms": at(0.5), "p99_ms": at(0.99)}


def summarize(
    tally: Tally,
    args: argparse.Namespace,
    elapsed_s: float,
    rss_start: dict[str, float | None],
    rss_end: dict[str, float | None],
    timeline: list[dict[str, Any]],
) -> dict[str, Any]:
    served = sum(s.num_served for s in tally.sessions)
    failed = sum(s.num_failed for s in tally.sessions)
    lost = sum(max(s.num_served - (s.server_num_turns or 0), 0) for s in tally.sessions)
    extra = sum(max((s.server_num_turns or 0) - s.num_served, 0) for s in tally.sessions)
    return {
        "config": args.config,
        "sessions": args.sessions,
        "duration_s": round(elapsed_s, 1),
        "max_tokens": args.max_tokens,
        "turns_served": served,
        "turns_failed": failed,
        "turns_per_s": round(len(tally.turn_s) / elapsed_s, 1) if elapsed_s else None,
        "errors": dict(tally.errors),
        "lost_turns": lost,
        "extra_turns": extra,
        "ttft": _percentiles(tally.ttft_s),
        "turn_latency": _percentiles(tally.turn_s),
        "rss_start": rss_start,
        "rss_end": rss_end,
        "rss_timeline": timeline,
        "machine": machine_info(),
    }


def one_line(result: dict[str, Any]) -> str:
    start, end = result["rss_start"], result["rss_end"]
    return (
        f"soak {result['sessions']} sessions x {result['duration_s']} s ({result['config']}): "
        f"{result['turns_served']} turns served ({result['turns_per_s']}/s), {result['turns_failed']} failed, "
        f"lost {result['lost_turns']}, errors {result['errors'] or 0}; TTFT p50/p99 {result['ttft']['p50_ms']}/"
        f"{result['ttft']['p99_ms']} ms; RSS router {start['router_mb']}->{end['router_mb']} MB, "
        f"engine {start['engine_mb']}->{end['engine_mb']} MB, proxy {start['proxy_mb']}->{end['proxy_mb']} MB"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="serve_config.emulator.yaml")
    parser.add_argument("--sessions", type=int, default=256)
    parser.add_argument("--duration-s", type=float, default=300.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--turn-timeout-s", type=float, default=120.0)
    parser.add_argument("--sample-every-s", type=float, default=15.0)
    parser.add_argument("--port", type=int, default=8190)
    parser.add_argument(
        "--repo", default=str(REPO), help="the tree to serve (e.g. a patched snapshot)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    store = Path(tempfile.mkdtemp(prefix="shepherd-soak-")) / "sessions.sqlite3"
    overrides = {"sessions": {"store": {"sqlite_path": str(store)}}}
    env = {"SHEPHERD_CACHE_DIR": os.environ.get("SHEPHERD_CACHE_DIR", "/tmp/shepcache")}
    with serve_app(args.config, port=args.port, args=overrides, repo=args.repo, env=env) as app:
        result = asyncio.run(soak(app, args))
    print(one_line(result), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
