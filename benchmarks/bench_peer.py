"""Item 5: our stack against peers on the same machine, model and load (OpenAI chat, streaming, greedy).

Servers, one at a time on the same cores:
  shepherd   `serve run serve_config.yaml` (transformers continuous-batching engine) from `--tree`
  tf-serve   `transformers serve --continuous-batching` (transformers' own OpenAI server, same engine library)
             with one torch thread, as Ray gives our engine replica (num_cpus 1: OMP_NUM_THREADS=1)
  tf-serve-default-threads   the same with torch's default thread count
  llama.cpp  llama-cpp-python's OpenAI server on the same weights converted to GGUF (`--gguf`), if given,
             one thread (`--n_threads 1`); it decodes one sequence at a time
Loads: single-turn random prompts at each `--concurrency`, and multi-turn sessions whose history grows by each
answer (`--turns`); with `--ttft-requests N`, also N answers of `--ttft-output-len` tokens one at a time, for
TTFT at c=1 from more samples. The model is the embedded one with special tokens silenced, so every answer has
exactly the requested number of tokens on every server. KV-cache, dtype, attention and CUDA-graph settings are
the same for both transformers servers (`--device cuda` runs both on one GPU, one at a time).

    python -m benchmarks.bench_peer --tree .bench-tree/fixed --peer-python /tmp/peer-venv/bin/python \
        --gguf /tmp/shepcache/bench-tiny-noeos.gguf --out benchmarks/results/peer.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks import loadgen
from benchmarks.server import kill_session, port_is_free, serve_app

NUM_BLOCKS, PAGE_SIZE = 512, 64


@contextlib.contextmanager
def external_server(
    command: list[str], base_url: str, *, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Any OpenAI server started by a command line; ready once GET /v1/models answers."""
    port = int(base_url.rsplit(":", 1)[1])
    if not port_is_free(port):
        raise RuntimeError(f"port {port} is busy")
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
            try:
                with urllib.request.urlopen(f"{base_url}/v1/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[:3]} not ready: {Path(log.name).read_text()[-3000:]}")
            time.sleep(0.5)
        yield base_url
    finally:
        process.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=15)
        kill_session(process.pid)


@contextlib.contextmanager
def start(name: str, args: argparse.Namespace, port: int) -> Iterator[tuple[str, str]]:
    """(base_url, model name to send) of server `name`."""
    base_url = f"http://127.0.0.1:{port}"
    if name == "shepherd":
        gpu = args.device == "cuda"
        overrides = {
            "model": {"path": args.model_dir, "served_model_name": "shepherd-tiny"},
            "engine": {
                "num_gpus_per_replica": 1 if gpu else 0,
                **json.loads(args.shepherd_engine),
                "transformers": {
                    "device": args.device,
                    "dtype": args.dtype,
                    "attn_implementation": "sdpa",
                    "num_blocks": NUM_BLOCKS,
                    "page_size": PAGE_SIZE,
                    "max_batch_tokens": args.max_batch_tokens,
                    "use_cuda_graph": args.cuda_graph,
                    **json.loads(args.shepherd_engine).get("transformers", {}),
                },
            },
        }
        env = json.loads(args.shepherd_env)
        with serve_app(
            "serve_config.yaml", port=port, args=overrides, repo=args.tree, env=env
        ) as app:
            yield app.base_url, "shepherd-tiny"
    elif name.startswith("tf-serve"):
        command = [
            args.peer_python,
            "-c",
            "from transformers.cli.transformers import main; main()",
            "serve",
            "--continuous-batching",
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--attn-implementation",
            "sdpa",
            "--cb-use-cuda-graph" if args.cuda_graph else "--no-cb-use-cuda-graph",
            "--cb-num-blocks",
            str(NUM_BLOCKS),
            "--cb-block-size",
            str(PAGE_SIZE),
            "--cb-max-batch-tokens",
            str(args.max_batch_tokens),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            args.model_dir,
        ]
        env = {} if name == "tf-serve-default-threads" else {"OMP_NUM_THREADS": "1"}
        with external_server(command, base_url, env=env):
            yield base_url, args.model_dir
    elif name == "llama.cpp":
        command = [
            args.peer_python,
            "-m",
            "llama_cpp.server",
            "--model",
            args.gguf,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "4096",
            "--n_threads",
            "1",
            "--interrupt_requests",
            "False",
        ]
        with external_server(command, base_url):
            yield base_url, "tiny"
    else:
        raise ValueError(name)


async def measure(base_url: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    source = loadgen.PromptSource(args.model_dir, seed=7)
    results: dict[str, Any] = {}
    backend = loadgen.OpenAIBackend(base_url, model, endpoint="chat", max_tokens=args.output_len)
    try:
        await loadgen.run_load(
            backend, loadgen.make_jobs(source, 4, args.input_len, 1), concurrency=4
        )
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            jobs = loadgen.make_jobs(
                source, max(args.min_requests, 2 * concurrency), args.input_len, 1
            )
            records, duration = await loadgen.run_load(
                backend, jobs, concurrency=concurrency, source=source
            )
            results[f"single_c{concurrency}"] = {
                "concurrency": concurrency,
                **loadgen.summarize(records, duration),
            }
        if args.ttft_requests:
            # TTFT at c=1 with many more samples than the throughput loads give: answers are cut at
            # `--ttft-output-len` tokens, which leaves the time to the first one unchanged.
            short = loadgen.OpenAIBackend(
                base_url, model, endpoint="chat", max_tokens=args.ttft_output_len
            )
            try:
                jobs = loadgen.make_jobs(source, args.ttft_requests, args.input_len, 1)
                records, duration = await loadgen.run_load(
                    short, jobs, concurrency=1, source=source
                )
            finally:
                await short.close()
            results["ttft_c1"] = {"concurrency": 1, **loadgen.summarize(records, duration)}
        if args.sessions:
            jobs = loadgen.make_jobs(source, args.sessions * 2, args.turn_len, args.turns)
            records, duration = await loadgen.run_load(
                backend, jobs, concurrency=args.sessions, source=source
            )
            results["multi_turn"] = {
                "concurrency": args.sessions,
                "turns": args.turns,
                **loadgen.summarize(records, duration),
            }
    finally:
        await backend.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", default=".", help="the code tree of our stack")
    parser.add_argument(
        "--model-dir", required=True, help="a no-EOS model directory (benchmarks.models)"
    )
    parser.add_argument(
        "--peer-python", default=sys.executable, help="a Python with transformers[serving]"
    )
    parser.add_argument("--gguf", help="the same weights as GGUF, for llama-cpp-python's server")
    parser.add_argument("--servers", default="shepherd,tf-serve,tf-serve-default-threads,llama.cpp")
    parser.add_argument("--shepherd-engine", default="{}", help="JSON engine args of our stack")
    parser.add_argument(
        "--shepherd-env", default="{}", help="JSON env of its `serve run`, e.g. HAProxy ingress"
    )
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per server)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--cuda-graph", action="store_true", help="CUDA graphs in both transformers servers"
    )
    parser.add_argument("--max-batch-tokens", type=int, default=512)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--min-requests", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument(
        "--ttft-requests", type=int, default=0, help="a TTFT-only load: this many requests at c=1"
    )
    parser.add_argument("--ttft-output-len", type=int, default=4)
    parser.add_argument("--sessions", type=int, default=8, help="0: no multi-turn load")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--turn-len", type=int, default=64)
    parser.add_argument(
        "--rounds", type=int, default=1, help="alternate the servers this many times"
    )
    parser.add_argument("--port", type=int, default=8121)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    servers = [s for s in args.servers.split(",") if s != "llama.cpp" or args.gguf]
    report: dict[str, Any] = {"machine": loadgen.machine_info(), "config": vars(args), "runs": []}
    for round_index in range(args.rounds):
        for name in servers:
            load_before = os.getloadavg()[0]
            try:
                with start(name, args, args.port) as (base_url, model):
                    results = asyncio.run(measure(base_url, model, args))
            except Exception as error:  # one failed server must not lose the others' numbers
                report["runs"].append(
                    {"server": name, "round": round_index, "error": repr(error)[:2000]}
                )
                print(f"{name}: FAILED {error!r}"[:400], flush=True)
                continue
            report["runs"].append(
                {
                    "server": name,
                    "round": round_index,
                    "load_before": load_before,
                    "load_after": os.getloadavg()[0],
                    "results": results,
                }
            )
            for key, summary in results.items():
                print(loadgen.one_line(f"r{round_index} {name} {key}", summary), flush=True)
            loadgen.write_json(args.out, report)
    report["ratios"] = ratios(report["runs"])
    loadgen.write_json(args.out, report)
    for line in report["ratios"]:
        print(line)


def ratios(runs: list[dict[str, Any]]) -> list[str]:
    """shepherd / peer output throughput and peer / shepherd TTFT p50 (above 1: we are ahead), per load."""
    import statistics

    def pooled(server: str, key: str, field: str) -> float | None:
        values = []
        for run in runs:
            summary = run.get("results", {}).get(key) if run["server"] == server else None
            if summary:
                values.append(summary[field]["p50"] if field == "ttft_ms" else summary[field])
        return statistics.median(values) if values else None

    lines = []
    keys = sorted({key for run in runs for key in run.get("results", {})})
    for peer in sorted({run["server"] for run in runs} - {"shepherd"}):
        for key in keys:
            ours_tput, peer_tput = (
                pooled("shepherd", key, "output_throughput"),
                pooled(peer, key, "output_throughput"),
            )
            ours_ttft, peer_ttft = pooled("shepherd", key, "ttft_ms"), pooled(peer, key, "ttft_ms")
            if None in (ours_tput, peer_tput, ours_ttft, peer_ttft):
                continue
            lines.append(
                f"vs {peer:<10} {key:<12} throughput x{ours_tput / peer_tput:.2f} "
                f"({ours_tput:.0f} vs {peer_tput:.0f} tok/s)  TTFT p50 x{peer_ttft / ours_ttft:.2f} "
                f"({ours_ttft:.1f} vs {peer_ttft:.1f} ms)"
            )
    return lines


if __name__ == "__main__":
    main()
