"""Multi-turn sessions: TTFT per turn with the session-affinity router vs Ray Serve's default router.

Both apps run in this one invocation (same machine, same minute), each with 2 engine replicas. Every session
grows its history turn by turn; with affinity, each turn lands on the replica that already caches the
session's prefix (transformers CB prefix sharing), so only the new suffix is prefilled.

    python -m benchmarks.bench_sessions --sessions 8 --turns 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx

from benchmarks.server import REPO, serve_app

MODEL = "shepherd-tiny"
WORDS = (
    "token cache engine replica session prefix stream batch router tensor parallel serve".split()
)


def _text(seed: int, num_words: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(num_words))


async def _turn(
    client: httpx.AsyncClient, base_url: str, session_id: str, text: str, max_tokens: int
) -> float:
    body = {
        "model": MODEL,
        "session_id": session_id,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    start = time.perf_counter()
    ttft: float | None = None
    async with client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        # Read to the end: the next turn may only start once this one is committed.
        async for line in response.aiter_lines():
            is_content = (
                line.startswith("data: {") and '"content":"' in line and '"content":""' not in line
            )
            if ttft is None and is_content:
                ttft = time.perf_counter() - start
    if ttft is None:
        raise RuntimeError("the stream carried no content")
    return ttft


async def _session(
    client: httpx.AsyncClient, base_url: str, index: int, args: argparse.Namespace
) -> list[float]:
    created = await client.post(
        f"{base_url}/v1/sessions", json={"system_prompt": _text(index, args.system_words)}
    )
    session_id = created.json()["id"]
    return [
        await _turn(
            client, base_url, session_id, _text(index * 31 + turn, args.turn_words), args.max_tokens
        )
        for turn in range(args.turns)
    ]


async def _workload(base_url: str, args: argparse.Namespace) -> list[list[float]]:
    async with httpx.AsyncClient(timeout=300) as client:
        return list(
            await asyncio.gather(
                *(_session(client, base_url, i, args) for i in range(args.sessions))
            )
        )


def _measure(router: str, port: int, args: argparse.Namespace) -> list[list[float]]:
    overrides = {
        "engine": {"num_replicas": 2, "num_cpus_per_replica": 0.5, "request_router": router},
        "router": {"num_cpus_per_replica": 0.25},
    }
    with serve_app("serve_config.yaml", port=port, args=overrides, num_cpus=4) as app:
        asyncio.run(
            _workload(app.base_url, argparse.Namespace(**{**vars(args), "turns": 1}))
        )  # warm-up
        return asyncio.run(_workload(app.base_url, args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--system-words", type=int, default=300)
    parser.add_argument("--turn-words", type=int, default=120)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--port", type=int, default=8310)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sessions.json"))
    args = parser.parse_args()

    results = {
        router: _measure(router, args.port, args) for router in ("session_affinity", "power_of_two")
    }
    table = []
    for turn in range(args.turns):
        row = {"turn": turn + 1}
        for router, per_session in results.items():
            row[router] = statistics.median(ttfts[turn] for ttfts in per_session) * 1000
        row["ratio"] = row["power_of_two"] / row["session_affinity"]
        table.append(row)
    late = [r for r in table if r["turn"] >= 3]
    summary = {
        "median_ttft_ms_turns_3_plus": {
            router: statistics.median(t[turn] for t in per for turn in range(2, args.turns)) * 1000
            for router, per in results.items()
        },
    }
    summary["ratio_turns_3_plus"] = (
        summary["median_ttft_ms_turns_3_plus"]["power_of_two"]
        / summary["median_ttft_ms_turns_3_plus"]["session_affinity"]
    )
    print(f"{'turn':>4} {'affinity ms':>12} {'default ms':>11} {'ratio':>6}")
    for row in table:
        print(
            f"{row['turn']:>4} {row['session_affinity']:>12.1f} {row['power_of_two']:>11.1f} {row['ratio']:>6.2f}"
        )
    print(
        f"turns >= 3: default/affinity median TTFT = {summary['ratio_turns_3_plus']:.2f} ({len(late)} turns)"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {"args": vars(args), "per_turn": table, "summary": summary, "raw_s": results}, indent=1
        )
    )


if __name__ == "__main__":
    main()
