"""TTFT each HTTP ingress adds over the executor in-process: HAProxy (serve_config.yaml's default) and Serve's proxy.

Rounds alternate in one process session: the executor in-process (in a fresh process, as every stack run gets a
fresh Engine replica), then `serve run` of serve_config.yaml with each ingress (the order swaps every round), each
at every concurrency level; the next round's in-process run closes a round. A stack run's added TTFT is its p50
(p99) minus the mean p50 (p99) of the two in-process runs around its round, so slow drift of the shared machine
cancels. Both sides get the same token-id prompts (`/v1/completions`) and the same engine args; the
ingress is the only setting that differs from serve_config.yaml. Prints medians over rounds with (min-max).

    SHEPHERD_CACHE_DIR=/tmp/shepcache flock /tmp/shepherd-ray.lock python -m benchmarks.bench_ingress \\
        --rounds 3 --out benchmarks/results/ingress-2core.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import urllib.request
from typing import Any

from benchmarks import loadgen
from benchmarks.bench_serving import app_levels, engine_overrides, in_process_levels
from benchmarks.common import (
    BENCH_ENV,
    BENCH_MODEL,
    REPO,
    app_args,
    bench_model_dir,
    in_fresh_process,
    model_args,
    spread,
)
from cluster.local import free_port, merge, serve_app

CONFIG = "serve_config.yaml"
# serve_config.yaml's RAY_SERVE_ENABLE_HA_PROXY per ingress
INGRESSES = {"haproxy": "1", "serve_proxy": "0"}


def wait_for_haproxy_backend(stats_port: int, timeout_s: float = 60) -> None:
    """Until HAProxy lists a Router replica UP: before that it sends requests to Serve's fallback proxy."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{stats_port}/stats;csv", timeout=2) as r:
                rows = [line.split(",") for line in r.read().decode().splitlines()]
            if any(row[1].startswith("SERVE_REPLICA") and row[17] == "UP" for row in rows[1:]):
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"HAProxy listed no Router replica UP within {timeout_s:.0f} s")


async def models_latency_ms(base_url: str, n: int = 50) -> dict[str, float]:
    """GET /v1/models: HTTP -> ingress -> Router and back, no engine hop (the floor of any request)."""
    import aiohttp

    samples = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            started = time.perf_counter()
            async with session.get(f"{base_url}/v1/models") as response:
                await response.read()
            samples.append(time.perf_counter() - started)
    return loadgen._stats(samples)


def by_level(levels: list[dict[str, Any]]) -> dict[str, Any]:
    return {str(level["concurrency"]): level for level in levels}


def in_process(engine: dict[str, Any], model_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    run = in_fresh_process(in_process_levels, engine, model_dir, args, repo=REPO)
    return by_level(run["levels"])


def stack(name: str, model_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    """`serve run` of serve_config.yaml with the ingress `name` and the bench model; everything else as the
    user gets it."""
    stats_port = free_port()
    controller_env = {
        "RAY_SERVE_ENABLE_HA_PROXY": INGRESSES[name],
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
    }
    overrides = {"model": model_args(model_dir), "engine": engine_overrides(args, "transformers")}
    with serve_app(
        CONFIG, port=args.port, args=overrides, env=BENCH_ENV, controller_env=controller_env
    ) as app:
        if name == "haproxy":
            wait_for_haproxy_backend(stats_port)
        levels = app_levels(app, BENCH_MODEL, model_dir, args)
        get_models_ms = asyncio.run(models_latency_ms(app.base_url))
        stopping_since = time.monotonic()
    return {
        "levels": by_level(levels),
        "get_models_ms": get_models_ms,
        "stop_s": time.monotonic() - stopping_since,
    }


def added(run: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Per level: the stack's TTFT p50/p99 minus the mean of the in-process runs around it (ms)."""
    out = {}
    for level, summary in run["levels"].items():
        reference = {
            q: (before[level]["ttft_ms"][q] + after[level]["ttft_ms"][q]) / 2
            for q in ("p50", "p99")
        }
        out[level] = {f"ttft_{q}_ms": summary["ttft_ms"][q] - reference[q] for q in reference}
    return out


def table(result: dict[str, Any]) -> str:
    lines = [
        "ingress      c   added TTFT p50 ms         added TTFT p99 ms         stack p50  in-process p50",
    ]
    in_process_runs = result["in_process"]
    for name in INGRESSES:
        runs = [r for r in result["rounds"] if r["ingress"] == name]
        for level in result["levels"]:
            key = str(level)
            p50 = [r["added"][key]["ttft_p50_ms"] for r in runs]
            p99 = [r["added"][key]["ttft_p99_ms"] for r in runs]
            stack_p50 = spread([r["levels"][key]["ttft_ms"]["p50"] for r in runs])
            own_p50 = spread([run[key]["ttft_ms"]["p50"] for run in in_process_runs])
            lines.append(
                f"{name:<11} {level:>3}   {spread(p50):<24}  {spread(p99):<24}  "
                f"{stack_p50:>9}  {own_p50:>14}"
            )
    for name in INGRESSES:
        runs = [r for r in result["rounds"] if r["ingress"] == name]
        lines.append(
            f"{name}: GET /v1/models p50 {spread([r['get_models_ms']['p50'] for r in runs])} ms; "
            f"Ctrl-C to stopped {spread([r['stop_s'] for r in runs])} s"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--levels", default="1,16,64", help="concurrency levels")
    parser.add_argument("--waves", type=int, default=3, help="requests per level: waves x c ...")
    parser.add_argument("--min-requests", type=int, default=60, help="... but at least this many")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8102)
    parser.add_argument("--out", required=True, help="JSON results path")
    parser.set_defaults(engine_json={})
    args = parser.parse_args()
    args.levels = [int(c) for c in args.levels.split(",")]
    model_dir = bench_model_dir()
    engine = merge(app_args(CONFIG)["engine"], engine_overrides(args, "transformers"))
    result: dict[str, Any] = {
        "machine": loadgen.machine_info(),
        "args": vars(args),
        "levels": args.levels,
        "in_process": [],
        "rounds": [],
    }

    def measure_in_process() -> dict[str, Any]:
        load = os.getloadavg()[0]
        runs = in_process(engine, model_dir, args)
        for level, summary in runs.items():
            print(loadgen.one_line(f"in-process c={level} (load {load:.1f})", summary), flush=True)
        result["in_process"].append(runs)
        return runs

    before = measure_in_process()
    for index in range(args.rounds):
        names = list(INGRESSES) if index % 2 == 0 else list(reversed(INGRESSES))
        pending = []
        for name in names:
            load = os.getloadavg()[0]
            run = stack(name, model_dir, args)
            for level, summary in run["levels"].items():
                print(loadgen.one_line(f"{name} c={level} (load {load:.1f})", summary), flush=True)
            pending.append((name, run, load))
        after = measure_in_process()
        for name, run, load in pending:
            result["rounds"].append(
                {
                    "round": index,
                    "ingress": name,
                    "load_before": load,
                    "levels": run["levels"],
                    "added": added(run, before, after),
                    "get_models_ms": run["get_models_ms"],
                    "stop_s": run["stop_s"],
                }
            )
        before = after
        loadgen.write_json(args.out, result)
    result["machine_after"] = {"loadavg": os.getloadavg()}
    result["table"] = table(result)
    loadgen.write_json(args.out, result)
    print(result["table"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
