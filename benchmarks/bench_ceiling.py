"""Streaming ceiling: the output tokens/s one Router replica and one Engine replica stream to clients when the
engine costs nothing, with the CPU seconds each process spends on it.

The emulator engine (`serve_config.emulator.yaml`) does no compute: it streams token ids on a fixed clock
(20 ms to the first token, one token per running request every 8 ms, up to 256 requests at once), so it
could stream 256 x 1000 / 8 = 32,000 tokens/s. Whatever keeps the stack below that is the serving path:
HTTP, the ingress, the Router (detokenizing, SSE) and the Router -> Engine transport. With several `--repo
NAME=DIR` (git worktrees of two commits) the trees alternate for `--rounds` rounds, one fresh app per run;
`--profile` adds py-spy profiles of the Router, Engine and proxy processes of the last run.

    python -m benchmarks.bench_ceiling --out /tmp/ceiling.json
    python -m benchmarks.bench_ceiling --repo old=/tmp/before --repo new=. --rounds 5 --out /tmp/c.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
from typing import Any

from benchmarks import loadgen
from benchmarks.common import (
    BENCH_MODEL,
    Tree,
    add_run_args,
    app_args,
    bench_app,
    bench_model_dir,
    json_arg,
    model_args,
    new_report,
    parse_trees,
    py_spy_top,
    spread,
    stack_levels,
    write_report,
)
from cluster.local import ServeApp

CPU_GROUPS = ("router", "proxy", "haproxy", "engine", "loadgen")


def engine_limit(emulator: dict[str, Any], concurrency: int) -> str:
    """Tokens/s the emulator's own clock allows at `concurrency`: one token per running request a step."""
    if not emulator.get("itl_ms"):
        return "-"
    running = min(concurrency, emulator.get("max_batch_size", concurrency))
    return f"{running * 1000 / emulator['itl_ms']:,.0f}"


def requests_at(concurrency: int, args: argparse.Namespace) -> int:
    return args.waves * concurrency


def stack_run(
    tree: Tree, model_dir: str, args: argparse.Namespace, profile: bool
) -> dict[str, Any]:
    model = BENCH_MODEL
    overrides = {"model": model_args(model_dir), "engine": args.engine_json}
    with bench_app(tree, args, overrides) as app:
        source = loadgen.PromptSource(model_dir, seed=args.seed)
        levels = asyncio.run(
            stack_levels(
                app.base_url,
                model,
                source,
                args.levels,
                num_requests=lambda c: requests_at(c, args),
                input_len=args.input_len,
                output_len=args.output_len,
                pids=app.pids(),
            )
        )
        profiles = profile_under_load(app, model, source, args) if profile else None
    return {"levels": levels, **({"profiles": profiles} if profiles else {})}


def profile_under_load(
    app: ServeApp, model: str, source: loadgen.PromptSource, args: argparse.Namespace
) -> dict[str, str]:
    """py-spy (6 s each, one after the other) of the Router, Engine and proxy under the top level's load."""
    targets = {"router": app.pid_of("Router"), "engine": app.pid_of("Engine")}
    targets["proxy"] = next((pid for role, pid in app.pids().items() if "ProxyActor" in role), None)
    profiles: dict[str, str] = {}

    def sample() -> None:
        time.sleep(2)
        for role, pid in targets.items():
            if pid is not None:
                profiles[role] = py_spy_top(pid, 6)

    sampler = threading.Thread(target=sample)
    sampler.start()
    top = max(args.levels)
    while sampler.is_alive():  # keep the load up until every profile is taken
        asyncio.run(
            stack_levels(
                app.base_url,
                model,
                source,
                [top],
                num_requests=lambda c: c,
                input_len=args.input_len,
                output_len=args.output_len,
                pids={},
            )
        )
    sampler.join()
    return profiles


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="serve_config.emulator.yaml")
    parser.add_argument(
        "--engine-json",
        type=json_arg,
        default={},
        help='engine args, e.g. {"stream_interval_tokens": 4}',
    )
    parser.add_argument(
        "--env", type=json_arg, default={}, help="`serve run`'s environment, e.g. HAProxy"
    )
    parser.add_argument("--levels", default="256", help="closed-loop concurrency levels")
    parser.add_argument("--waves", type=int, default=2, help="requests per level: waves x c")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=512)
    parser.add_argument("--profile", action="store_true", help="py-spy the last run's processes")
    add_run_args(parser, port=8103, seed=2)
    args = parser.parse_args()
    args.levels = [int(c) for c in args.levels.split(",")]
    trees = parse_trees(args.repo)
    model_dir = bench_model_dir()
    report = new_report(
        args, trees, emulator=app_args(args.config, trees[0].path)["engine"].get("emulator")
    )
    for round_index in range(args.rounds):
        for index, tree in enumerate(trees):
            is_last = round_index == args.rounds - 1 and index == len(trees) - 1
            label = f"ceiling[{tree.name}] r{round_index}"
            load_before = os.getloadavg()[0]
            try:
                result = stack_run(tree, model_dir, args, profile=args.profile and is_last)
            except Exception as error:
                print(f"{label}: FAILED {error!r}"[:600], flush=True)
                result = {"error": repr(error)[:2000]}
            for level in result.get("levels", []):
                print(
                    loadgen.one_line(f"{label} c={level['concurrency']}", level),
                    level["cpu"]["cpu_s"],
                    flush=True,
                )
            report["runs"].append(
                {
                    "tree": tree.name,
                    "round": round_index,
                    "load_before": load_before,
                    "load_after": os.getloadavg()[0],
                    **result,
                }
            )
            loadgen.write_json(args.out, report)
    emulator = report["emulator"] or {}
    headers = ["tree", "commit", "c", "engine limit", "tok/s", "tok/chunk", "TPOT p50 ms"]
    headers += [f"CPU s {group}" for group in CPU_GROUPS]
    rows = []
    for tree in report["trees"]:
        for concurrency in args.levels:
            levels = [
                level
                for run in report["runs"]
                if run["tree"] == tree["name"]
                for level in run.get("levels", [])
                if level["concurrency"] == concurrency
            ]
            cpu = [
                spread([level["cpu"]["cpu_s"].get(group, 0.0) for level in levels])
                for group in CPU_GROUPS
            ]
            rows.append(
                [
                    tree["name"],
                    str(tree["commit"]),
                    str(concurrency),
                    engine_limit(emulator, concurrency),
                    spread([level["output_throughput"] for level in levels]),
                    spread([level["tokens_per_chunk"] for level in levels]),
                    spread([level["tpot_ms"]["p50"] for level in levels]),
                    *cpu,
                ]
            )
    title = (
        f"{args.config}, {args.input_len} in / {args.output_len} out, {args.waves} waves, "
        f"{args.rounds} round(s): median [min-max] over the rounds"
    )
    write_report(report, args.out, title, headers, rows)
    for role, text in next(
        (r["profiles"] for r in reversed(report["runs"]) if "profiles" in r), {}
    ).items():
        print(f"\n--- {role} ---\n{text[:3000]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
