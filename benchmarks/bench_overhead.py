"""What the serving stack (HTTP -> proxy -> Router replica -> Engine replica) adds over its executor in-process.

1. TTFT at c=1 (p50, p99), emulator and transformers engines: stack minus the same executor called in-process.
2. Output-token throughput at c=64, transformers engine on the embedded model: stack / in-process.

Both sides get the same random token-id prompts (`/v1/completions` with a list of ids; in-process the same ids
in a GenerateRequest with the router's end id) and the same engine args. The stack runs from a snapshot of the
commit `--ref` (plus this suite's files); each `--patch NAME=a.diff[,b.diff]` adds a variant with those patches,
measured in the same run, for before/after comparisons.

    SHEPHERD_CACHE_DIR=/tmp/shepcache python -m benchmarks.bench_overhead \
        --patch fast=benchmarks/proposed-patches/engine-coalesce.diff
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from benchmarks import loadgen
from benchmarks.common import (
    RESULTS,
    CpuMeter,
    app_args,
    commit_of,
    in_process_executor,
    snapshot,
    wait_for_quiet,
)
from benchmarks.models import no_eos_copy
from benchmarks.server import merge, serve_app

PORT = 8101
MODEL = "shepherd-tiny"


def bench_model_dir() -> str:
    from deployments.embedded_model import ensure_embedded_model

    embedded = ensure_embedded_model()
    return str(no_eos_copy(embedded, embedded.parent / "bench-tiny-noeos"))


def engine_overrides(kind: str) -> dict[str, Any]:
    if kind == "transformers":
        # Room for 64 x (128 + 128) tokens, so the c=64 run measures batching, not KV-cache preemption.
        return {"transformers": {"device": "cpu", "num_blocks": 512}}
    return {}


def stack_args(kind: str, model_dir: str) -> dict[str, Any]:
    return {"model": {"path": model_dir, "served_model_name": MODEL}, "engine": engine_overrides(kind)}


def config_of(kind: str) -> str:
    return "serve_config.emulator.yaml" if kind == "emulator" else "serve_config.yaml"


async def run_in_process(
    kind: str,
    model_dir: str,
    jobs: list[loadgen.Job],
    concurrency: int,
    max_tokens: int,
    end_id: int,
    repo: Path,
) -> dict[str, Any]:
    engine = merge(app_args(config_of(kind), repo)["engine"], engine_overrides(kind))
    if kind == "transformers":
        import torch

        # A replica with num_cpus=N gets OMP_NUM_THREADS=N from Ray; give this process the same.
        torch.set_num_threads(max(1, int(engine.get("num_cpus_per_replica", 1))))
    async with in_process_executor(engine, model_dir) as executor:
        backend = loadgen.ExecutorBackend(executor, max_tokens, end_id=end_id)
        await loadgen.run_load(backend, jobs[:4], concurrency=min(4, concurrency))  # warm-up
        records, duration = await loadgen.run_load(backend, jobs, concurrency=concurrency)
    return loadgen.summarize(records, duration)


async def run_stack(
    base_url: str, jobs: list[loadgen.Job], concurrency: int, max_tokens: int, pids: dict[str, int]
) -> dict[str, Any]:
    backend = loadgen.OpenAIBackend(base_url, MODEL, endpoint="completions", max_tokens=max_tokens)
    try:
        await loadgen.run_load(backend, jobs[:4], concurrency=min(4, concurrency))  # warm-up
        meter = CpuMeter(pids)
        records, duration = await loadgen.run_load(backend, jobs, concurrency=concurrency)
        cpu = meter.stop()
        models_ms = await _models_latency_ms(base_url)
    finally:
        await backend.close()
    return {**loadgen.summarize(records, duration), "cpu": cpu, "get_models_ms": models_ms}


async def _models_latency_ms(base_url: str, n: int = 50) -> dict[str, float]:
    """GET /v1/models: HTTP -> proxy -> Router and back, no engine hop (the floor of any request)."""
    import time

    import aiohttp

    samples = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            started = time.perf_counter()
            async with session.get(f"{base_url}/v1/models") as response:
                await response.read()
            samples.append(time.perf_counter() - started)
    return loadgen._stats(samples)


def engine_env(app: Any) -> dict[str, str]:
    pid = app.pid_of("Engine")
    if pid is None:
        return {}
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    wanted = ("OMP_NUM_THREADS", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD")
    return {k: v for k, _, v in (item.decode().partition("=") for item in raw) if k in wanted}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ref", default="HEAD", help="the commit to measure ('' = the working tree)")
    parser.add_argument("--patch", action="append", default=[], help="NAME=a.diff[,b.diff]: one more variant")
    parser.add_argument("--engines", default="emulator,transformers")
    parser.add_argument("--ttft-requests", type=int, default=100)
    parser.add_argument("--throughput-requests", type=int, default=128)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--out", default=str(RESULTS / "overhead.json"))
    args = parser.parse_args()
    ref = args.ref or None
    variants = {"base": str(snapshot(ref=ref))}
    for item in args.patch:
        name, _, diffs = item.partition("=")
        variants[name] = str(snapshot(diffs.split(","), ref=ref))
    # In-process runs import the same frozen `deployments` as the base variant's replicas.
    sys.path.insert(0, variants["base"])
    model_dir = bench_model_dir()
    source = loadgen.PromptSource(model_dir, seed=0)
    end_id = 2  # the embedded tokenizer's eos (<|im_end|>), as the router sends it
    result: dict[str, Any] = {
        "machine": loadgen.machine_info(),
        "code": {"ref": commit_of(ref) if ref else "working tree", "patches": args.patch},
        "model_dir": model_dir,
    }

    # Item 1: TTFT at c=1; item 2: throughput at c=64 (transformers only).
    plan = [("ttft_c1", kind, 1, args.ttft_requests, 32) for kind in args.engines.split(",")]
    if "transformers" in args.engines:
        plan.append(("throughput_c64", "transformers", 64, args.throughput_requests, 128))
    for name, kind, concurrency, num_requests, max_tokens in plan:
        jobs = loadgen.make_jobs(source, num_requests, args.input_len, 1)
        entry: dict[str, Any] = {
            "engine": kind,
            "concurrency": concurrency,
            "input_len": args.input_len,
            "output_len": max_tokens,
            "num_requests": num_requests,
        }
        entry["load_before"] = wait_for_quiet()
        entry["in_process"] = asyncio.run(
            run_in_process(kind, model_dir, jobs, concurrency, max_tokens, end_id, Path(variants["base"]))
        )
        print(loadgen.one_line(f"{name} {kind} in-process", entry["in_process"]), flush=True)
        for variant, repo in variants.items():
            with serve_app(config_of(kind), port=PORT, args=stack_args(kind, model_dir), repo=repo) as app:
                entry["load_before_" + variant] = wait_for_quiet()
                stack = asyncio.run(run_stack(app.base_url, jobs, concurrency, max_tokens, app.pids()))
                stack["engine_env"] = engine_env(app)
            entry[f"stack_{variant}"] = stack
            print(loadgen.one_line(f"{name} {kind} stack[{variant}]", stack), flush=True)
            base = entry["in_process"]
            entry[f"added_{variant}"] = {
                "ttft_p50_ms": stack["ttft_ms"]["p50"] - base["ttft_ms"]["p50"],
                "ttft_p99_ms": stack["ttft_ms"]["p99"] - base["ttft_ms"]["p99"],
                "tpot_p50_ms": stack["tpot_ms"]["p50"] - base["tpot_ms"]["p50"],
                "throughput_ratio": stack["output_throughput"] / base["output_throughput"],
            }
            print(f"    added[{variant}]: {entry[f'added_{variant}']}", flush=True)
        entry["load_after"] = os.getloadavg()[0]
        result[f"{name}_{kind}"] = entry
        loadgen.write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
