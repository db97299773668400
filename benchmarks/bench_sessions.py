"""Multi-turn sessions: time to first token per turn with the session-affinity router against Ray Serve's
power of two choices, over several Engine replicas.

Each of `--sessions` concurrent clients creates a server-side session with a system prompt of about
`--system-tokens` tokens and then streams `--turns` turns of about `--turn-tokens` new tokens each, one after
the other (each turn is committed before the next starts), so every session's history grows turn by turn.
With affinity each turn lands on the replica that already holds the session's prefix in its KV cache, and only
the new suffix is prefilled; with power of two it lands on either replica. Both policies run in one
invocation, one fresh app each, alternating for `--rounds` rounds. Where the server reports
`usage.prompt_tokens_details.cached_tokens`, the hit rate (cached / prompt tokens) is printed too.

    python -m benchmarks.bench_sessions --out /tmp/sessions.json           # embedded model, 2 replicas, CPU
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any

import numpy as np

from benchmarks import loadgen
from benchmarks.common import (
    BENCH_MODEL,
    Tree,
    add_run_args,
    bench_app,
    bench_model_dir,
    json_arg,
    model_args,
    new_report,
    parse_trees,
    print_table,
    spread,
)
from cluster.local import merge

ROUTERS = ("session_affinity", "power_of_two")
LATE_TURN = 3  # turns from here on have a history worth reusing


async def one_session(
    base_url: str,
    model: str,
    system_prompt: str,
    turns: list[str],
    args: argparse.Namespace,
    index: int,
) -> list[loadgen.RequestRecord]:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{base_url}/v1/sessions", json={"system_prompt": system_prompt}
        ) as response:
            response.raise_for_status()
            session_id = (await response.json())["id"]
    backend = loadgen.OpenAIBackend(
        base_url,
        model,
        endpoint="chat",
        max_tokens=args.output_len,
        extra_body={"session_id": session_id, "ignore_eos": True},
    )
    records = []
    try:
        for turn, text in enumerate(turns):
            record = loadgen.RequestRecord(start=time.perf_counter(), turn=turn)
            try:
                # The session holds the history: each turn sends only its new message.
                await backend.send(text, None, [], record)
            except Exception as error:
                record.error = f"{type(error).__name__}: {error}"[:200]
            records.append(record)
            if not record.ok:
                print(f"session {index} turn {turn}: {record.error}", flush=True)
                break
    finally:
        await backend.close()
    return records


def workload(model_dir: str, args: argparse.Namespace) -> tuple[list[str], list[list[str]]]:
    """The system prompts and turns of every session, the same for every policy (seeded)."""
    source = loadgen.PromptSource(model_dir, seed=args.seed)
    systems = [source.prompt(args.system_tokens)[0] for _ in range(args.sessions)]
    turns = [
        [source.prompt(args.turn_tokens)[0] for _ in range(args.turns)]
        for _ in range(args.sessions)
    ]
    return systems, turns


def policy_run(tree: Tree, router: str, model_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    overrides = {
        "model": merge(model_args(model_dir), args.model_json),
        "engine": merge(
            {"num_replicas": args.replicas, "request_router": router}, args.engine_json
        ),
    }
    model = BENCH_MODEL
    systems, turns = workload(model_dir, args)
    with bench_app(tree, args, overrides) as app:

        async def run() -> list[list[loadgen.RequestRecord]]:
            # Warm-up: one short session-less request per replica's worth, on prompts not used later.
            warm = loadgen.OpenAIBackend(app.base_url, model, endpoint="chat", max_tokens=4)
            try:
                jobs = loadgen.make_jobs(
                    loadgen.PromptSource(model_dir, seed=args.seed + 1), 2 * args.replicas, 32, 1
                )
                await loadgen.run_load(warm, jobs, concurrency=args.replicas)
            finally:
                await warm.close()
            return list(
                await asyncio.gather(
                    *(
                        one_session(app.base_url, model, systems[i], turns[i], args, i)
                        for i in range(args.sessions)
                    )
                )
            )

        sessions = asyncio.run(run())
    records = [record for session in sessions for record in session]
    return {
        "summary": loadgen.summarize(records, 1.0),
        "ttft_ms": [[r.ttft * 1000 for r in session if r.ok] for session in sessions],
        "prompt_tokens": [[r.num_prompt_tokens for r in session] for session in sessions],
        "cached_tokens": [[r.num_cached_tokens for r in session] for session in sessions],
    }


def late_ttfts(run: dict[str, Any]) -> list[float]:
    return [t for session in run.get("ttft_ms", []) for t in session[LATE_TURN - 1 :]]


def hit_rate(run: dict[str, Any], turns: slice) -> float:
    """Cached / prompt tokens over `turns` of every session, or NaN where the server reports no cached tokens."""
    cached = [c for session in run.get("cached_tokens", []) for c in session[turns]]
    prompt = [p for session in run.get("prompt_tokens", []) for p in session[turns]]
    if not cached or any(c is None for c in cached):
        return float("nan")
    return sum(cached) / max(1, sum(prompt))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="serve_config.yaml")
    parser.add_argument("--model-dir", help="default: the embedded model, special tokens silenced")
    parser.add_argument("--replicas", type=int, default=2, help="Engine replicas")
    parser.add_argument(
        "--engine-json", type=json_arg, default={}, help="engine args over the config's"
    )
    parser.add_argument(
        "--model-json",
        type=json_arg,
        default={},
        help="model args over the bench's, e.g. '{\"max_model_len\": 16384}' for long histories",
    )
    parser.add_argument(
        "--env", type=json_arg, default={}, help="`serve run`'s environment, e.g. HAProxy"
    )
    parser.add_argument(
        "--num-cpus", type=int, default=4, help="logical CPUs of the app's local Ray"
    )
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--turn-tokens", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument(
        "--routers", default=",".join(ROUTERS), help="engine.request_router values to compare"
    )
    add_run_args(parser, port=8105)
    args = parser.parse_args()
    trees = parse_trees(args.repo)
    routers = args.routers.split(",")
    model_dir = args.model_dir or bench_model_dir()
    report = new_report(args, trees, model_dir=model_dir)
    for round_index in range(args.rounds):
        for tree in trees:
            for router in routers:
                label = f"{tree.name} {router} r{round_index}"
                load_before = os.getloadavg()[0]
                try:
                    result = policy_run(tree, router, model_dir, args)
                    print(loadgen.one_line(label, result["summary"]), flush=True)
                except Exception as error:
                    print(f"{label}: FAILED {error!r}"[:600], flush=True)
                    result = {"error": repr(error)[:2000]}
                report["runs"].append(
                    {
                        "tree": tree.name,
                        "router": router,
                        "round": round_index,
                        "load_before": load_before,
                        "load_after": os.getloadavg()[0],
                        **result,
                    }
                )
                loadgen.write_json(args.out, report)

    def runs_of(tree: str, router: str) -> list[dict[str, Any]]:
        return [r for r in report["runs"] if r["tree"] == tree and r["router"] == router]

    headers = [
        "tree",
        "turn",
        *(f"{r} TTFT p50 ms" for r in routers),
        *(f"{r} hit" for r in routers),
    ]
    rows = []
    for tree in trees:
        for turn in range(args.turns):
            medians = [
                spread(
                    [
                        statistics.median(s[turn] for s in run["ttft_ms"] if len(s) > turn)
                        for run in runs_of(tree.name, router)
                        if any(len(s) > turn for s in run.get("ttft_ms", []))
                    ]
                )
                for router in routers
            ]
            hits = [
                spread([hit_rate(run, slice(turn, turn + 1)) for run in runs_of(tree.name, r)])
                for r in routers
            ]
            rows.append([tree.name, str(turn + 1), *medians, *hits])
    print(
        f"\n{args.sessions} sessions x {args.turns} turns, {args.replicas} replicas, ~{args.system_tokens}-token "
        f"system prompts, ~{args.turn_tokens} new tokens a turn, {args.output_len} out; TTFT median over "
        f"sessions, then median [min-max] over {args.rounds} round(s)"
    )
    print_table(headers, rows)
    summary = {}
    for tree in trees:
        late = {r: [t for run in runs_of(tree.name, r) for t in late_ttfts(run)] for r in routers}
        if len(routers) != 2 or not all(late.values()):
            continue
        first, second = (np.asarray(late[r]) for r in routers)
        summary[tree.name] = {
            "ratio_median": float(np.median(second) / np.median(first)),
            "ratio_mean": float(second.mean() / first.mean()),
            "ratio_p90": float(np.percentile(second, 90) / np.percentile(first, 90)),
            "ttft_median_ms": {r: float(np.median(late[r])) for r in routers},
            "hit_rate": {
                r: [hit_rate(run, slice(LATE_TURN - 1, None)) for run in runs_of(tree.name, r)]
                for r in routers
            },
        }
        got = summary[tree.name]
        print(
            f"{tree.name}, turns >= {LATE_TURN}: TTFT {routers[1]} / {routers[0]}: median "
            f"{got['ratio_median']:.2f}x, mean {got['ratio_mean']:.2f}x, p90 {got['ratio_p90']:.2f}x "
            f"({routers[0]} median {got['ttft_median_ms'][routers[0]]:.1f} ms); hit rate "
            + ", ".join(f"{r} {spread(got['hit_rate'][r])}" for r in routers)
        )
    report["summary"] = summary
    report["table"] = [dict(zip(headers, row, strict=True)) for row in rows]
    loadgen.write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
