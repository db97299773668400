"""Serving load sweep: output tokens/s, TTFT and TPOT through the stack (`serve run`: HTTP -> ingress -> Router
-> Engine replica) against the same executor called in-process, at several concurrency levels.

Both sides get the same seeded random token-id prompts (`/v1/completions` with a list of ids; in-process the
same ids in a GenerateRequest) and the same engine args; the bench model never ends an answer early, so every
request yields exactly `--output-len` tokens. Every stack run is a fresh app (all levels in one app); every
in-process run a fresh Python process, as a fresh replica is. With `--in-process bracket` (the default) an
in-process run comes before the first stack run and after every one, and each stack figure is divided by the
mean of the two around it: the in-process figure itself drifts by up to 10 % within minutes on a shared
machine. With several `--repo NAME=DIR` (git worktrees of two commits), the stack runs alternate between
them for `--rounds` rounds; in-process runs always use the first tree's executor.

    python -m benchmarks.bench_serving --out /tmp/serving.json         # transformers, embedded model, CPU
    python -m benchmarks.bench_serving --levels 1 --min-requests 100 --output-len 16 --in-process once \
        --repo old=/tmp/before --repo new=. --rounds 5 --out /tmp/ttft-c1.json      # before/after TTFT
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks import loadgen
from benchmarks.common import (
    BENCH_MODEL,
    END_ID,
    Tree,
    add_run_args,
    app_args,
    bench_app,
    bench_model_dir,
    deployments_source,
    in_fresh_process,
    in_process_executor,
    json_arg,
    model_args,
    new_report,
    parse_trees,
    spread,
    stack_levels,
    write_report,
)
from cluster.local import ServeApp, merge

# Room for 64 x (128 + 128) tokens in the transformers engine's KV cache, so that c=64 measures batching,
# not preemption (the default config's 128 pages of 64 tokens hold 8,192).
TRANSFORMERS_ROOM = {"transformers": {"num_blocks": 512}}


def requests_at(concurrency: int, args: argparse.Namespace) -> int:
    return max(args.min_requests, args.waves * concurrency)


def engine_overrides(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    room = TRANSFORMERS_ROOM if kind == "transformers" else {}
    return merge(room, args.engine_json)


def in_process_levels(
    engine: dict[str, Any], model_dir: str, args: argparse.Namespace
) -> dict[str, Any]:
    """The executor alone (no HTTP, no Router, no Ray) at every level; runs in a fresh process."""
    if engine.get("kind", "transformers") == "transformers":
        import torch

        # A replica with num_cpus=N gets OMP_NUM_THREADS=N from Ray; this process gets the same.
        torch.set_num_threads(max(1, int(engine.get("num_cpus_per_replica", 1))))
    source = loadgen.PromptSource(model_dir, seed=args.seed)

    async def run() -> list[dict[str, Any]]:
        results = []
        async with in_process_executor(engine, model_dir) as executor:
            backend = loadgen.ExecutorBackend(executor, args.output_len, end_id=END_ID)
            # The same warm-up prompts as a stack run's, so both sides then draw the same measured prompts.
            warm = loadgen.make_jobs(source, min(8, max(args.levels)), args.input_len, 1)
            await loadgen.run_load(backend, warm, concurrency=len(warm))
            for concurrency in args.levels:
                jobs = loadgen.make_jobs(source, requests_at(concurrency, args), args.input_len, 1)
                records, duration = await loadgen.run_load(backend, jobs, concurrency=concurrency)
                results.append({"concurrency": concurrency, **loadgen.summarize(records, duration)})
        return results

    return {"deployments": deployments_source(), "levels": asyncio.run(run())}


def stack_run(tree: Tree, model_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    config_args = app_args(args.config, tree.path)
    kind = config_args["engine"].get("kind", "transformers")
    overrides = {"model": model_args(model_dir), "engine": engine_overrides(args, kind)}
    model = BENCH_MODEL
    started = time.perf_counter()
    with bench_app(tree, args, overrides) as app:
        startup_s = time.perf_counter() - started
        levels = app_levels(app, model, model_dir, args)
    return {"startup_s": startup_s, "levels": levels}


def app_levels(
    app: ServeApp, model: str, model_dir: str, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """The stack's closed loop at every level of `args`, on the same prompts as the in-process runs."""
    return asyncio.run(
        stack_levels(
            app.base_url,
            model,
            loadgen.PromptSource(model_dir, seed=args.seed),
            args.levels,
            num_requests=lambda c: requests_at(c, args),
            input_len=args.input_len,
            output_len=args.output_len,
            pids=app.pids(),
        )
    )


def timed_run(label: str, function: Any, *function_args: Any, **kwargs: Any) -> dict[str, Any]:
    """One run with the load average around it; a failure is recorded and the sweep goes on."""
    load_before = os.getloadavg()[0]
    try:
        result = function(*function_args, **kwargs)
    except Exception as error:
        print(f"{label}: FAILED {error!r}"[:600], flush=True)
        return {"error": repr(error)[:2000], "load_before": load_before}
    for level in result["levels"]:
        print(loadgen.one_line(f"{label} c={level['concurrency']}", level), flush=True)
    return {**result, "load_before": load_before, "load_after": os.getloadavg()[0]}


def level_of(run: dict[str, Any] | None, concurrency: int) -> dict[str, Any] | None:
    for level in (run or {}).get("levels", []):
        if level["concurrency"] == concurrency:
            return level  # type: ignore[no-any-return]
    return None


def compare(runs: list[dict[str, Any]], tree: str, concurrency: int) -> dict[str, list[float]]:
    """Per stack run of `tree` at `concurrency`: its figures, and its ratio to the in-process runs around it
    (the one before and the one after with `bracket`; the first with `once`)."""
    out: dict[str, list[float]] = {
        key: []
        for key in ("tok_s", "ttft_p50", "ttft_p99", "tpot_p50", "ref_tok_s", "ratio", "added")
    }
    for index, run in enumerate(runs):
        stack = level_of(run, concurrency) if run["kind"] == "stack" else None
        if run.get("tree") != tree or stack is None:
            continue
        out["tok_s"].append(stack["output_throughput"])
        out["ttft_p50"].append(stack["ttft_ms"]["p50"])
        out["ttft_p99"].append(stack["ttft_ms"]["p99"])
        out["tpot_p50"].append(stack["tpot_ms"]["p50"])
        before = next((r for r in reversed(runs[:index]) if r["kind"] == "in_process"), None)
        after = next((r for r in runs[index + 1 :] if r["kind"] == "in_process"), None)
        around = [
            level
            for level in (level_of(before, concurrency), level_of(after, concurrency))
            if level is not None
        ]
        if around:
            reference = statistics.fmean(level["output_throughput"] for level in around)
            out["ref_tok_s"].append(reference)
            out["ratio"].append(stack["output_throughput"] / reference)
            ttft = statistics.fmean(level["ttft_ms"]["p50"] for level in around)
            out["added"].append(stack["ttft_ms"]["p50"] - ttft)
    return out


def table(report: dict[str, Any], args: argparse.Namespace) -> list[list[str]]:
    rows = []
    for tree in report["trees"]:
        for concurrency in args.levels:
            got = compare(report["runs"], tree["name"], concurrency)
            rows.append(
                [
                    tree["name"],
                    str(tree["commit"]),
                    str(concurrency),
                    spread(got["tok_s"]),
                    spread(got["ref_tok_s"]),
                    spread(got["ratio"]),
                    spread(got["ttft_p50"]),
                    spread(got["added"]),
                    spread(got["ttft_p99"]),
                    spread(got["tpot_p50"]),
                ]
            )
    return rows


HEADERS = [
    "tree",
    "commit",
    "c",
    "stack tok/s",
    "in-process tok/s",
    "ratio",
    "TTFT p50 ms",
    "added p50 ms",
    "TTFT p99 ms",
    "TPOT p50 ms",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="serve_config.yaml", help="a serve config of the repo")
    parser.add_argument("--model-dir", help="default: the embedded model, special tokens silenced")
    parser.add_argument(
        "--engine-json", type=json_arg, default={}, help="engine args over the config's"
    )
    parser.add_argument(
        "--env", type=json_arg, default={}, help="`serve run`'s environment, e.g. HAProxy"
    )
    parser.add_argument("--num-cpus", type=int, help="logical CPUs of the app's local Ray")
    parser.add_argument("--levels", default="1,4,16,64", help="closed-loop concurrency levels")
    parser.add_argument("--waves", type=int, default=2, help="requests per level: waves x c ...")
    parser.add_argument("--min-requests", type=int, default=16, help="... but at least this many")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument(
        "--in-process",
        choices=["bracket", "once", "none"],
        default="bracket",
        help="in-process runs around every stack run, one at the start, or none",
    )
    add_run_args(parser, port=8101)
    args = parser.parse_args()
    args.levels = [int(c) for c in args.levels.split(",")]
    trees = parse_trees(args.repo)
    model_dir = args.model_dir or bench_model_dir()
    first = trees[0]
    config_engine = app_args(args.config, first.path)["engine"]
    engine = merge(config_engine, engine_overrides(args, config_engine.get("kind", "transformers")))
    report = new_report(args, trees, model_dir=model_dir, in_process_engine=engine)

    def in_process(label: str) -> None:
        result = timed_run(
            f"in-process[{label}]",
            in_fresh_process,
            in_process_levels,
            engine,
            model_dir,
            args,
            repo=first.path,
        )
        report["runs"].append({"kind": "in_process", "tree": first.name, "at": label, **result})
        loadgen.write_json(args.out, report)

    if args.in_process != "none":
        in_process("start")
    for round_index in range(args.rounds):
        for tree in trees:
            label = f"stack[{tree.name}] r{round_index}"
            result = timed_run(label, stack_run, tree, model_dir, args)
            report["runs"].append(
                {"kind": "stack", "tree": tree.name, "round": round_index, **result}
            )
            loadgen.write_json(args.out, report)
            if args.in_process == "bracket":
                in_process(f"after {tree.name} r{round_index}")
    rows = table(report, args)
    title = (
        f"{Path(args.config).name}, {args.input_len} in / {args.output_len} out, "
        f"{args.rounds} round(s): median [min-max] over the rounds"
    )
    write_report(report, args.out, title, HEADERS, rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
