"""What the serving stack (HTTP -> proxy -> Router replica -> Engine replica) costs over its executor.

Items (`--items`, comma-separated):
  ttft        TTFT at c=1 (p50, p99), emulator and transformers engines: stack minus the same executor called
              in-process, plus GET /v1/models (one proxy -> Router hop, no engine) as the floor of any request
  throughput  output-token throughput at c=64, transformers engine on the embedded model: stack / in-process
              (`--bracket`: in-process again after every tree, each ratio against the runs around it)
  ceiling     streamed tokens/s that one Router + one Engine replica sustain with the emulator engine, with the
              CPU seconds of every process; py-spy profiles of the Router, Engine and proxy for the last tree

Both sides get the same random token-id prompts (`/v1/completions` with a list of ids; in-process the same ids
in a GenerateRequest with the router's end id) and the same engine args. The stack runs from frozen code trees:
`--tree NAME=DIR` (prebuilt, e.g. by benchmarks.trees), else a snapshot of HEAD plus one per
`--patch NAME=a.diff[,b.diff]`; every tree is measured in the same run (before/after).

    SHEPHERD_CACHE_DIR=/tmp/shepcache python -m benchmarks.bench_overhead --items ttft --engines emulator \
        --tree default=.bench-tree/head --tree haproxy=.bench-tree/head \
        --tree-env 'haproxy={"RAY_SERVE_ENABLE_HA_PROXY": "1"}'
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import loadgen
from benchmarks.common import RESULTS, CpuMeter, app_args, in_process_executor, py_spy_top, snapshot
from benchmarks.models import no_eos_copy
from benchmarks.server import merge, serve_app

MODEL = "shepherd-tiny"
END_ID = 2  # the embedded tokenizer's eos (<|im_end|>), as the router sends it


def bench_model_dir() -> str:
    from deployments.embedded_model import ensure_embedded_model

    embedded = ensure_embedded_model()
    return str(no_eos_copy(embedded, embedded.parent / "bench-tiny-noeos"))


def engine_overrides(kind: str) -> dict[str, Any]:
    if kind == "transformers":
        # Room for 64 x (128 + 128) tokens, so the c=64 run measures batching, not KV-cache preemption.
        return {"transformers": {"device": "cpu", "num_blocks": 512}}
    return {}


def stack_args(kind: str, model_dir: str, engine: dict[str, Any] | None = None) -> dict[str, Any]:
    """App args of a stack run: the bench model, and engine settings of the kind plus a tree's own."""
    return {
        "model": {"path": model_dir, "served_model_name": MODEL},
        "engine": merge(engine_overrides(kind), engine or {}),
    }


def config_of(kind: str) -> str:
    return "serve_config.emulator.yaml" if kind == "emulator" else "serve_config.yaml"


async def run_in_process(
    kind: str,
    model_dir: str,
    jobs: list[loadgen.Job],
    concurrency: int,
    max_tokens: int,
    repo: Path,
) -> dict[str, Any]:
    engine = merge(app_args(config_of(kind), repo)["engine"], engine_overrides(kind))
    if kind == "transformers":
        import torch

        # A replica with num_cpus=N gets OMP_NUM_THREADS=N from Ray; give this process the same.
        torch.set_num_threads(max(1, int(engine.get("num_cpus_per_replica", 1))))
    async with in_process_executor(engine, model_dir) as executor:
        backend = loadgen.ExecutorBackend(executor, max_tokens, end_id=END_ID)
        await loadgen.run_load(backend, jobs[:4], concurrency=min(4, concurrency))  # warm-up
        records, duration = await loadgen.run_load(backend, jobs, concurrency=concurrency)
    return loadgen.summarize(records, duration)


async def run_stack(
    base_url: str, jobs: list[loadgen.Job], concurrency: int, max_tokens: int, pids: dict[str, int]
) -> dict[str, Any]:
    backend = loadgen.OpenAIBackend(base_url, MODEL, endpoint="completions", max_tokens=max_tokens)
    try:
        await loadgen.run_load(backend, jobs[:8], concurrency=min(8, concurrency))  # warm-up
        meter = CpuMeter(pids)
        records, duration = await loadgen.run_load(backend, jobs, concurrency=concurrency)
        cpu = meter.stop()
    finally:
        await backend.close()
    return {**loadgen.summarize(records, duration), "cpu": cpu}


async def models_latency_ms(base_url: str, n: int = 50) -> dict[str, float]:
    """GET /v1/models: HTTP -> proxy -> Router and back, no engine hop (the floor of any request)."""
    import aiohttp

    samples = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            started = time.perf_counter()
            async with session.get(f"{base_url}/v1/models") as response:
                await response.read()
            samples.append(time.perf_counter() - started)
    return loadgen._stats(samples)


def item_ttft(
    args: argparse.Namespace, trees: dict[str, str], model_dir: str, result: dict[str, Any]
) -> None:
    source = loadgen.PromptSource(model_dir, seed=0)
    for kind in args.engines.split(","):
        jobs = loadgen.make_jobs(source, args.ttft_requests, args.input_len, 1)
        entry: dict[str, Any] = {
            "engine": kind,
            "concurrency": 1,
            "input_len": args.input_len,
            "output_len": 32,
        }
        base_tree = Path(next(iter(trees.values())))
        entry["in_process"] = asyncio.run(run_in_process(kind, model_dir, jobs, 1, 32, base_tree))
        print(loadgen.one_line(f"ttft {kind} in-process", entry["in_process"]), flush=True)
        for name, tree in trees.items():
            overrides = stack_args(kind, model_dir, args.tree_engine.get(name))
            with serve_app(
                config_of(kind),
                port=args.port,
                args=overrides,
                repo=tree,
                env=args.tree_env.get(name),
            ) as app:
                stack = asyncio.run(run_stack(app.base_url, jobs, 1, 32, app.pids()))
                stack["get_models_ms"] = asyncio.run(models_latency_ms(app.base_url))
            entry[f"stack[{name}]"] = stack
            entry[f"added[{name}]"] = {
                "ttft_p50_ms": stack["ttft_ms"]["p50"] - entry["in_process"]["ttft_ms"]["p50"],
                "ttft_p99_ms": stack["ttft_ms"]["p99"] - entry["in_process"]["ttft_ms"]["p99"],
                "get_models_p50_ms": stack["get_models_ms"]["p50"],
            }
            print(
                loadgen.one_line(f"ttft {kind} stack[{name}]", stack),
                entry[f"added[{name}]"],
                flush=True,
            )
        result[f"ttft_c1_{kind}"] = entry
        loadgen.write_json(args.out, result)


def _throughput_in_process(model_dir: str, jobs: list[loadgen.Job], repo: Path) -> dict[str, Any]:
    return asyncio.run(run_in_process("transformers", model_dir, jobs, 64, 128, repo))


def item_throughput(
    args: argparse.Namespace, trees: dict[str, str], model_dir: str, result: dict[str, Any]
) -> None:
    source = loadgen.PromptSource(model_dir, seed=1)
    jobs = loadgen.make_jobs(source, args.throughput_requests, args.input_len, 1)
    entry: dict[str, Any] = {
        "engine": "transformers",
        "concurrency": 64,
        "input_len": args.input_len,
        "output_len": 128,
        "num_requests": args.throughput_requests,
    }
    base_tree = Path(next(iter(trees.values())))

    def in_process() -> dict[str, Any]:
        # In a fresh process every time, as every stack run gets a fresh Engine replica: a second executor
        # in a warm process ran 7-12 % faster than the first on the dev box (R5.2).
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            return pool.submit(_throughput_in_process, model_dir, jobs, base_tree).result()

    entry["in_process"] = before = in_process()
    print(loadgen.one_line("throughput c=64 in-process", before), flush=True)
    for name, tree in trees.items():
        overrides = stack_args("transformers", model_dir, args.tree_engine.get(name))
        with serve_app(
            "serve_config.yaml",
            port=args.port,
            args=overrides,
            repo=tree,
            env=args.tree_env.get(name),
        ) as app:
            stack = asyncio.run(run_stack(app.base_url, jobs, 64, 128, app.pids()))
        entry[f"stack[{name}]"] = stack
        reference = before["output_throughput"]
        if args.bracket:
            # The in-process figure drifts by up to 10 % within minutes on a shared machine: each stack
            # run is compared with the mean of the in-process runs just before and just after it.
            after = entry[f"in_process@{name}"] = in_process()
            print(loadgen.one_line(f"throughput c=64 in-process@{name}", after), flush=True)
            reference = (reference + after["output_throughput"]) / 2
            before = after
        entry[f"ratio[{name}]"] = stack["output_throughput"] / reference
        print(
            loadgen.one_line(f"throughput c=64 stack[{name}]", stack),
            f"ratio {entry[f'ratio[{name}]']:.2f}",
            flush=True,
        )
    result["throughput_c64_transformers"] = entry
    loadgen.write_json(args.out, result)


def item_ceiling(
    args: argparse.Namespace, trees: dict[str, str], model_dir: str, result: dict[str, Any]
) -> None:
    source = loadgen.PromptSource(model_dir, seed=2)
    levels = [int(c) for c in args.ceiling_levels.split(",")]
    entry: dict[str, Any] = {
        "engine": "emulator",
        "input_len": args.input_len,
        "output_len": args.ceiling_output_len,
        "emulator": app_args("serve_config.emulator.yaml", Path(next(iter(trees.values())))),
    }
    for index, (name, tree) in enumerate(trees.items()):
        runs = []
        overrides = stack_args("emulator", model_dir, args.tree_engine.get(name))
        with serve_app(
            config_of("emulator"),
            port=args.port,
            args=overrides,
            repo=tree,
            env=args.tree_env.get(name),
        ) as app:
            for concurrency in levels:
                jobs = loadgen.make_jobs(
                    source, max(64, concurrency * args.ceiling_waves), args.input_len, 1
                )
                summary = asyncio.run(
                    run_stack(app.base_url, jobs, concurrency, args.ceiling_output_len, app.pids())
                )
                runs.append({"concurrency": concurrency, **summary})
                print(
                    loadgen.one_line(f"ceiling[{name}] c={concurrency}", summary),
                    summary["cpu"]["cpu_s"],
                    flush=True,
                )
            if args.profile and index == len(trees) - 1:
                entry[f"profile[{name}]"] = profile(app, source, levels[-1], args)
        entry[f"stack[{name}]"] = runs
        result["ceiling_emulator"] = entry
        loadgen.write_json(args.out, result)


def profile(
    app: Any, source: loadgen.PromptSource, concurrency: int, args: argparse.Namespace
) -> dict[str, str]:
    """py-spy (200 Hz, 6 s each) of the Router, Engine and proxy processes under load at `concurrency`."""
    jobs = loadgen.make_jobs(source, concurrency * 3, args.input_len, 1)
    profiles: dict[str, str] = {}
    targets = {"router": app.pid_of("Router"), "engine": app.pid_of("Engine")}
    targets["proxy"] = next((pid for role, pid in app.pids().items() if "ProxyActor" in role), None)

    def sample() -> None:
        time.sleep(3)
        for role, pid in targets.items():
            if pid is not None:
                out = Path(tempfile.gettempdir()) / f"profile-{role}-{pid}.txt"
                profiles[role] = py_spy_top(pid, 6, out, top=25)

    sampler = threading.Thread(target=sample)
    sampler.start()
    asyncio.run(run_stack(app.base_url, jobs, concurrency, args.ceiling_output_len, app.pids()))
    sampler.join()
    return profiles


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", default="ttft,throughput,ceiling")
    parser.add_argument(
        "--tree", action="append", default=[], help="NAME=DIR: a prebuilt code tree"
    )
    parser.add_argument(
        "--patch", action="append", default=[], help="NAME=a.diff[,b.diff]: one more tree"
    )
    parser.add_argument(
        "--tree-engine",
        action="append",
        default=[],
        help='NAME={"stream_interval_tokens": 4}: engine args for one tree only',
    )
    parser.add_argument(
        "--tree-env",
        action="append",
        default=[],
        help='NAME={"RAY_SERVE_ENABLE_HA_PROXY": "1"}: environment of one tree\'s `serve run`',
    )
    parser.add_argument(
        "--engines", default="emulator,transformers", help="engines of the ttft item"
    )
    parser.add_argument("--ttft-requests", type=int, default=100)
    parser.add_argument("--throughput-requests", type=int, default=128)
    parser.add_argument(
        "--bracket",
        action="store_true",
        help="throughput: run in-process again after each tree; ratios use the runs around each tree",
    )
    parser.add_argument("--ceiling-levels", default="64,128,256")
    parser.add_argument(
        "--ceiling-waves", type=int, default=3, help="requests = waves x concurrency"
    )
    parser.add_argument("--ceiling-output-len", type=int, default=128)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--out", default=str(RESULTS / "overhead.json"))
    args = parser.parse_args()
    trees = dict(item.split("=", 1) for item in args.tree)
    args.tree_engine = {k: json.loads(v) for k, v in (i.split("=", 1) for i in args.tree_engine)}
    args.tree_env = {k: json.loads(v) for k, v in (i.split("=", 1) for i in args.tree_env)}
    if not trees:
        trees = {"base": str(snapshot())}
        for item in args.patch:
            name, _, diffs = item.partition("=")
            trees[name] = str(snapshot(diffs.split(",")))
    # In-process runs import the same frozen `deployments` as the first tree's replicas.
    sys.path.insert(0, str(Path(next(iter(trees.values()))).resolve()))
    model_dir = bench_model_dir()
    result: dict[str, Any] = {"machine": loadgen.machine_info(), "trees": trees, "args": vars(args)}
    items = args.items.split(",")
    if "ttft" in items:
        item_ttft(args, trees, model_dir, result)
    if "throughput" in items:
        item_throughput(args, trees, model_dir, result)
    if "ceiling" in items:
        item_ceiling(args, trees, model_dir, result)
    result["machine_after"] = {"loadavg": os.getloadavg()}
    loadgen.write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
