"""Our stack against `transformers serve --continuous-batching` (transformers' own OpenAI server, the same
engine library) on the same machine, model, settings and load: chat, streaming, greedy.

Servers, one at a time on the same cores, alternating for `--rounds` rounds:
  shepherd   `serve run serve_config.yaml` from `--repo`, with the KV-cache, dtype, attention and CUDA-graph
             settings below
  tf-serve   `transformers serve --continuous-batching` with the same settings, with `--threads` torch
             threads (1: what Ray gives our Engine replica with num_cpus 1)
Loads: single-turn random prompts at each `--levels`; with `--ttft-requests N`, N answers of
`--ttft-output-len` tokens one at a time (TTFT at c=1 from more samples); and `--sessions` multi-turn
conversations whose history (sent by the client, as both servers accept) grows by each answer. The model
never ends an answer early, so every answer has exactly the tokens asked for on both servers.

    python -m benchmarks.bench_peer --out /tmp/peer.json                    # embedded model, CPU
    python -m benchmarks.bench_peer --device cuda --dtype bfloat16 --cuda-graph --max-batch-tokens 2048 \
        --model-dir /tmp/llama-1b-shaped --levels 1,16,64 --out /tmp/peer.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks import loadgen
from benchmarks.common import (
    BENCH_ENV,
    BENCH_MODEL,
    bench_model_dir,
    json_arg,
    model_args,
    new_report,
    parse_trees,
    spread,
    write_report,
)
from cluster.local import kill_session, merge, port_is_free, serve_app

SERVERS = ("shepherd", "tf-serve")


@contextlib.contextmanager
def external_server(
    command: list[str], base_url: str, env: dict[str, str] | None = None
) -> Iterator[None]:
    """An OpenAI server started from a command line; ready once GET /v1/models answers; always stopped."""
    if not port_is_free(int(base_url.rsplit(":", 1)[1])):
        raise RuntimeError(f"{base_url} is busy")
    log = tempfile.NamedTemporaryFile("w", prefix="peer-", suffix=".log", delete=False)
    process = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[:3]} exited: {Path(log.name).read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{base_url}/v1/models", timeout=2) as response:
                    if response.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[:3]} not ready: {Path(log.name).read_text()[-3000:]}")
            time.sleep(0.5)
        yield
    finally:
        process.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=15)
        kill_session(process.pid)


@contextlib.contextmanager
def start(name: str, args: argparse.Namespace, model_dir: str) -> Iterator[tuple[str, str]]:
    """(base URL, model name to send) of server `name`, running until the block ends."""
    base_url = f"http://127.0.0.1:{args.port}"
    if name == "shepherd":
        tree = args.trees[0]
        overrides = {
            "model": model_args(model_dir),
            "engine": merge(
                {
                    "num_gpus_per_replica": 1 if args.device == "cuda" else 0,
                    "transformers": {
                        "device": args.device,
                        "dtype": args.dtype,
                        "attn_implementation": "sdpa",
                        "num_blocks": args.num_blocks,
                        "page_size": args.page_size,
                        "max_batch_tokens": args.max_batch_tokens,
                        "use_cuda_graph": args.cuda_graph,
                    },
                },
                args.engine_json,
            ),
        }
        with serve_app(
            "serve_config.yaml",
            port=args.port,
            args=overrides,
            repo=tree.path,
            env={**BENCH_ENV, **args.env},
        ):
            yield base_url, BENCH_MODEL
    elif name == "tf-serve":
        command = [
            args.peer_python,
            "-c",
            "from transformers.cli.transformers import main; main()",
            "serve",
            "--continuous-batching",
            *("--device", args.device, "--dtype", args.dtype, "--attn-implementation", "sdpa"),
            "--cb-use-cuda-graph" if args.cuda_graph else "--no-cb-use-cuda-graph",
            *("--cb-num-blocks", str(args.num_blocks), "--cb-block-size", str(args.page_size)),
            *("--cb-max-batch-tokens", str(args.max_batch_tokens)),
            *("--host", "127.0.0.1", "--port", str(args.port)),
            model_dir,
        ]
        with external_server(command, base_url, env={"OMP_NUM_THREADS": str(args.threads)}):
            yield base_url, model_dir
    else:
        raise ValueError(f"unknown server {name!r}")


async def measure(
    base_url: str, model: str, model_dir: str, args: argparse.Namespace
) -> dict[str, Any]:
    source = loadgen.PromptSource(model_dir, seed=args.seed)
    results: dict[str, Any] = {}
    backend = loadgen.OpenAIBackend(base_url, model, endpoint="chat", max_tokens=args.output_len)
    short = loadgen.OpenAIBackend(base_url, model, endpoint="chat", max_tokens=args.ttft_output_len)
    try:
        warm = loadgen.make_jobs(source, 4, args.input_len, 1)
        await loadgen.run_load(backend, warm, concurrency=4, source=source)
        for concurrency in args.levels:
            jobs = loadgen.make_jobs(
                source, max(args.min_requests, 2 * concurrency), args.input_len, 1
            )
            records, duration = await loadgen.run_load(
                backend, jobs, concurrency=concurrency, source=source
            )
            results[f"c={concurrency}"] = loadgen.summarize(records, duration)
        if args.ttft_requests:
            # The time to the first token does not depend on the answer's length: short answers, more samples.
            jobs = loadgen.make_jobs(source, args.ttft_requests, args.input_len, 1)
            records, duration = await loadgen.run_load(short, jobs, concurrency=1, source=source)
            results["c=1 TTFT"] = loadgen.summarize(records, duration)
        if args.sessions:
            jobs = loadgen.make_jobs(source, 2 * args.sessions, args.turn_len, args.turns)
            records, duration = await loadgen.run_load(
                backend, jobs, concurrency=args.sessions, source=source
            )
            results[f"{args.sessions} sessions x {args.turns} turns"] = loadgen.summarize(
                records, duration
            )
    finally:
        await backend.close()
        await short.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", help="our code tree (another checkout); default: here")
    parser.add_argument("--model-dir", help="default: the embedded model, special tokens silenced")
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument(
        "--peer-python",
        default=sys.executable,
        help="a Python with transformers and its serving extras",
    )
    parser.add_argument("--threads", type=int, default=1, help="tf-serve's torch threads")
    parser.add_argument(
        "--engine-json", type=json_arg, default={}, help="our engine args, over the shared ones"
    )
    parser.add_argument("--env", type=json_arg, default={}, help="our `serve run`'s environment")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per server)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cuda-graph", action="store_true", help="CUDA graphs in both servers")
    parser.add_argument("--num-blocks", type=int, default=512)
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--max-batch-tokens", type=int, default=512)
    parser.add_argument("--levels", default="1,16", help="single-turn closed-loop levels")
    parser.add_argument("--min-requests", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--ttft-requests", type=int, default=0, help="a TTFT load at c=1")
    parser.add_argument("--ttft-output-len", type=int, default=4)
    parser.add_argument("--sessions", type=int, default=8, help="0: no multi-turn load")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--turn-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="alternate the servers this often")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--port", type=int, default=8121)
    parser.add_argument("--out", required=True, help="JSON results path")
    args = parser.parse_args()
    args.levels = [int(c) for c in args.levels.split(",")]
    args.trees = parse_trees([args.repo] if args.repo else [])
    servers = args.servers.split(",")
    model_dir = args.model_dir or bench_model_dir()
    report = new_report(args, args.trees, model_dir=model_dir)
    for round_index in range(args.rounds):
        for name in servers:
            load_before = os.getloadavg()[0]
            try:
                with start(name, args, model_dir) as (base_url, model):
                    results = asyncio.run(measure(base_url, model, model_dir, args))
            except Exception as error:  # one failed server must not lose the others' numbers
                print(f"{name}: FAILED {error!r}"[:600], flush=True)
                report["runs"].append({"server": name, "round": round_index, "error": repr(error)})
                continue
            for load, summary in results.items():
                print(loadgen.one_line(f"r{round_index} {name} {load}", summary), flush=True)
            report["runs"].append(
                {
                    "server": name,
                    "round": round_index,
                    "load_before": load_before,
                    "load_after": os.getloadavg()[0],
                    "results": results,
                }
            )
            loadgen.write_json(args.out, report)
    headers, rows = comparison(report["runs"], servers)
    title = (
        f"{args.device}, {args.dtype}, {args.input_len} in / {args.output_len} out (TTFT load: "
        f"{args.ttft_output_len} out); median [min-max] over {args.rounds} round(s); ratios of medians, "
        "above 1: shepherd ahead"
    )
    write_report(report, args.out, title, headers, rows)
    print(f"wrote {args.out}")


def comparison(runs: list[dict[str, Any]], servers: list[str]) -> tuple[list[str], list[list[str]]]:
    """Per load: each server's output tokens/s and TTFT p50, and shepherd's lead on both."""
    loads = list(dict.fromkeys(load for run in runs for load in run.get("results", {})))

    def values(server: str, load: str, field: str) -> list[float]:
        out = []
        for run in runs:
            summary = run.get("results", {}).get(load) if run["server"] == server else None
            if summary:
                out.append(summary[field]["p50"] if field == "ttft_ms" else summary[field])
        return out

    headers = ["load"]
    for server in servers:
        headers += [f"{server} tok/s", f"{server} TTFT p50 ms"]
    peers = [s for s in servers if s != "shepherd"]
    headers += [f"vs {p}: tok/s, TTFT" for p in peers]
    rows = []
    for load in loads:
        row = [load]
        for server in servers:
            row += [
                spread(values(server, load, "output_throughput")),
                spread(values(server, load, "ttft_ms")),
            ]
        for peer in peers:
            ours_tok, theirs_tok = (
                values(s, load, "output_throughput") for s in ("shepherd", peer)
            )
            ours_ttft, theirs_ttft = (values(s, load, "ttft_ms") for s in ("shepherd", peer))
            if ours_tok and theirs_tok and ours_ttft and theirs_ttft:
                throughput = statistics.median(ours_tok) / statistics.median(theirs_tok)
                ttft = statistics.median(theirs_ttft) / statistics.median(ours_ttft)
                row.append(f"{throughput:.2f}x, {ttft:.2f}x")
            else:
                row.append("-")
        rows.append(row)
    return headers, rows


if __name__ == "__main__":
    main()
