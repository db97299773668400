"""Multi-turn sessions on a multi-node cluster of this machine (the emulator engine on simulated GPU nodes):
sessions/s and tokens/s at 1, 2 and 4 Engine replicas across nodes, then the turns that fail during a
rolling update (`serve deploy` of a new Engine version) and during the loss of an Engine node and of a Router
node, each under a live multi-turn load.

    flock /tmp/shepherd-ray.lock python -m benchmarks.bench_multinode --out /tmp/multinode.json

The cluster (`benchmarks/multinode.py`): a head (one Router, room for one Engine replica), a Router node, and
as many "GPU" nodes (one Engine replica each) as the most replicas measured, so that one slot is spare for
rollouts and replacements; Redis; every node a `ray start` of its own on this machine, so all of them share
its cores: on a small machine the Routers, not the emulated engines, set the ceiling.
The emulator runs `--batch` requests at a time per replica, `--itl-ms` per step (a GPU engine's shape).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

from benchmarks.loadgen import machine_info, write_json
from benchmarks.multinode import (
    EmulatorCluster,
    app_args,
    emulator_cluster,
    node_loss,
    rolling_update,
    throughput,
)


def engine_settings(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    return {
        "emulator": {"ttft_ms": 20, "itl_ms": args.itl_ms, "max_batch_size": args.batch},
        "max_ongoing_requests": 4 * args.batch,
        **extra,
    }


def redeploy(app: EmulatorCluster, args: argparse.Namespace, **engine: Any) -> None:
    app.deploy(app_args(app.redis_url, app.cache_dir, engine=engine_settings(args, **engine)))
    app.wait_app_running()
    app.wait_replicas("Engine", engine["num_replicas"])
    app.wait_replicas("Router", 2)


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    results: dict[str, Any] = {"throughput": [], "faults": {}}
    with emulator_cluster(
        num_engine_nodes=max(args.replicas),
        engine=engine_settings(args, num_replicas=max(args.replicas[0], 1)),
    ) as app:
        app.wait_replicas("Router", 2)
        for num_replicas in args.replicas:
            redeploy(app, args, num_replicas=num_replicas)
            result = asyncio.run(
                throughput(
                    app,
                    num_sessions=args.sessions,
                    num_turns=args.turns,
                    max_tokens=args.max_tokens,
                )
            )
            print(
                f"replicas {num_replicas}: {result.sessions_per_s:.2f} sessions/s "
                f"{result.tokens_per_s:.0f} tokens/s {result.statuses}",
                flush=True,
            )
            results["throughput"].append(
                {**dataclasses.asdict(result), "sessions_per_s": result.sessions_per_s}
                | {"tokens_per_s": result.tokens_per_s}
            )
        num_replicas = args.replicas[-1]
        new_version = engine_settings(args, num_replicas=num_replicas)
        new_version["emulator"]["itl_ms"] = args.itl_ms + 1
        new_version["max_surge_percent"] = 25
        rollout = asyncio.run(
            rolling_update(
                app,
                app_args(app.redis_url, app.cache_dir, engine=new_version),
                num_sessions=args.sessions,
                max_tokens=args.max_tokens,
            )
        )
        print(f"rolling update: during {rollout.during} after {rollout.after}", flush=True)
        results["faults"]["rolling_update"] = _without_turns(rollout)
        for deployment in ("Engine", "Router"):
            loss = asyncio.run(
                node_loss(app, deployment, num_sessions=args.sessions, max_tokens=args.max_tokens)
            )
            print(
                f"{deployment} node loss: in flight {loss.in_flight} later {loss.later}", flush=True
            )
            results["faults"][f"{deployment.lower()}_node_loss"] = _without_turns(loss)
    results["wall_s"] = round(time.monotonic() - started, 1)
    return results


def _without_turns(result: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(result).items() if k != "turns"}


def table(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"multi-turn sessions: {args.sessions} sessions x {args.turns} turns, {args.max_tokens} tokens "
        f"per reply; emulator batch {args.batch}, {args.itl_ms} ms per step",
        "| Engine replicas (nodes) | sessions/s | tokens/s | turns failed | TTFT p50 ms |",
        "|---|---|---|---|---|",
    ]
    for row in results["throughput"]:
        failed = sum(n for status, n in row["statuses"].items() if status != "ok")
        lines.append(
            f"| {row['num_engine_replicas']} | {row['sessions_per_s']:.2f} | "
            f"{row['tokens_per_s']:.0f} | {failed} | {row['ttft_ms_p50']:.1f} |"
        )
    faults = results["faults"]
    rollout = faults["rolling_update"]
    lines += [
        "",
        "| Under load | turns | failed | how |",
        "|---|---|---|---|",
        _fault_row("rolling update (new Engine version)", {**rollout["during"]}, rollout),
    ]
    for name in ("engine_node_loss", "router_node_loss"):
        loss = faults[name]
        statuses = dict(loss["in_flight"])
        for status, n in loss["later"].items():
            statuses[f"later {status}"] = statuses.get(f"later {status}", 0) + n
        lines.append(_fault_row(name.replace("_", " "), statuses, loss))
    return "\n".join(lines)


def _fault_row(label: str, statuses: dict[str, int], result: dict[str, Any]) -> str:
    total = sum(statuses.values())
    failed = {status: n for status, n in statuses.items() if not status.endswith("ok")}
    history = result["history"]
    exact = "history exact" if not history["mismatched"] else f"{len(history['mismatched'])} differ"
    return f"| {label} | {total} | {sum(failed.values())} | {failed or '-'}; {exact} |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", default="1,2,4", help="Engine replica counts to measure")
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="emulator max_batch_size per replica")
    parser.add_argument("--itl-ms", type=float, default=20.0, help="emulator time per decode step")
    parser.add_argument("--out", help="JSON results path")
    args = parser.parse_args()
    args.replicas = [int(n) for n in args.replicas.split(",")]
    results = run(args)
    print(table(results, args))
    if args.out:
        write_json(args.out, {"machine": machine_info(), "config": vars(args), **results})
        Path(args.out).with_suffix(".md").write_text(table(results, args) + "\n")


if __name__ == "__main__":
    main()
