"""Where the stack's TTFT goes (R2.1): one request at a time, timestamps from the client and from every process.

A copy of the code tree gets trace points (the client's send, the Router's handler, the engine call, the
Engine replica's entry and first item, the first item back in the Router, the first SSE chunk) that append
`tag id unix-time` lines to /tmp/ttft-trace-PID.log; the frozen tree is patched, never the working tree.
Each request's events are matched by time (one request in flight), and the median of every segment is
reported. A second part sends bursts of `--burst` concurrent requests and compares their TTFT with the
same executor called in-process. Modes (`--mode NAME=JSON env`, optionally `--mode-engine NAME=JSON engine
args`) run one after the other.

    python -m benchmarks.bench_ttft_trace --tree .bench-tree/head --mode proxy='{}' \
        --mode haproxy='{"RAY_SERVE_ENABLE_HA_PROXY": "1"}' --mode handle='{}' \
        --mode-engine handle='{"transport": "serve_handle"}'
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import loadgen
from benchmarks.bench_overhead import bench_model_dir, run_in_process, stack_args
from benchmarks.common import RESULTS
from benchmarks.server import serve_app

TRACE_GLOB = "/tmp/ttft-trace-*.log"
_TRACER = (
    "import os as _os, time as _time\n"
    "def _trace(tag, request_id):\n"
    '    with open(f"/tmp/ttft-trace-{_os.getpid()}.log", "a") as _f:\n'
    '        _f.write(f"{tag} {request_id} {_time.time():.6f}\\n")\n'
)
# (file, text to find, text to put instead): each must match exactly once, or the tree has moved on.
TRACE_POINTS = [
    ("deployments/generation.py", "\nOpenAIFinish =", "\n" + _TRACER + "\nOpenAIFinish ="),
    (
        "deployments/generation.py",
        "        try:\n"
        "            self._stream = await self._engine.open(self.request)\n"
        "            self._first = await self._stream.__anext__()\n",
        '        _trace("call", self.request.request_id)\n'
        "        try:\n"
        "            self._stream = await self._engine.open(self.request)\n"
        "            self._first = await self._stream.__anext__()\n"
        '            _trace("first", self.request.request_id)\n',
    ),
    ("deployments/engine.py", "\nclass Engine:", "\n" + _TRACER + "\nclass Engine:"),
    (
        "deployments/engine.py",
        "        self._recent.append(\n",
        '        _trace("eng_in", request.request_id)\n        self._recent.append(\n',
    ),
    (
        "deployments/engine.py",
        "            async for delta in deltas:\n                yield delta\n",
        '            async for delta in deltas:\n                _trace("eng_out", request.request_id)\n'
        "                yield delta\n",
    ),
    (
        "deployments/router.py",
        "\n\n@serve.ingress(api)\n",
        "\n\n" + _TRACER + "\n\n@serve.ingress(api)\n",
    ),
    (
        "deployments/router.py",
        "    async def http_completions(self, request: Request) -> Response:\n",
        "    async def http_completions(self, request: Request) -> Response:\n"
        '        _trace("http_in", "-")\n',
    ),
    (
        "deployments/router.py",
        "            async for chunk in chunks:\n                yield sse.encode_chunk(chunk)\n",
        "            async for chunk in chunks:\n                data = sse.encode_chunk(chunk)\n"
        '                _trace("sse", "-")\n                yield data\n',
    ),
]
SEGMENTS = ["send", "http_in", "call", "eng_in", "eng_out", "first", "sse", "recv"]


def traced_copy(tree: Path) -> Path:
    target = Path(tempfile.mkdtemp(prefix="shepherd-trace-tree-")) / "tree"
    shutil.copytree(tree, target, ignore=shutil.ignore_patterns("__pycache__"))
    for name, find, put in TRACE_POINTS:
        path = target / name
        text = path.read_text()
        if text.count(find) != 1:
            raise SystemExit(f"trace point not found once in {name}: {find[:60]!r}")
        path.write_text(text.replace(find, put))
    return target


def read_events() -> list[tuple[float, str]]:
    events = []
    for path in glob.glob(TRACE_GLOB):
        for line in Path(path).read_text().splitlines():
            tag, _, stamp = line.split()
            events.append((float(stamp), tag))
    return sorted(events)


def clear_events() -> None:
    for path in glob.glob(TRACE_GLOB):
        os.remove(path)


async def sequential(base_url: str, jobs: list[loadgen.Job]) -> list[tuple[float, float]]:
    """(send, first text chunk) client times of one streamed completion after another."""
    import aiohttp

    times = []
    async with aiohttp.ClientSession() as session:
        for job in jobs:
            body = {
                "model": "shepherd-tiny",
                "prompt": job.turns[0][1],
                "max_tokens": 4,
                "stream": True,
            }
            sent = time.time()
            first = None
            async with session.post(f"{base_url}/v1/completions", json=body) as response:
                async for line in response.content:
                    if first is None and line.startswith(b'data: {"'):
                        first = time.time()
            assert first is not None, "no chunk"
            times.append((sent, first))
    return times


def breakdown(times: list[tuple[float, float]], events: list[tuple[float, str]]) -> dict[str, Any]:
    rows = []
    for sent, received in times:
        row = {"send": sent, "recv": received}
        for stamp, tag in events:
            if sent <= stamp <= received + 0.005 and tag not in row:
                row[tag] = stamp
        if all(name in row for name in SEGMENTS):
            rows.append(row)
    segments = {
        f"{a}->{b}": statistics.median((row[b] - row[a]) * 1e3 for row in rows)
        for a, b in zip(SEGMENTS, SEGMENTS[1:], strict=False)
    }
    total = statistics.median((row["recv"] - row["send"]) * 1e3 for row in rows)
    return {"num_requests": len(rows), "median_ms": segments, "total_median_ms": total}


async def bursts(base_url: str, jobs: list[loadgen.Job], concurrency: int) -> dict[str, Any]:
    backend = loadgen.OpenAIBackend(
        base_url, "shepherd-tiny", endpoint="completions", max_tokens=32
    )
    try:
        await loadgen.run_load(backend, jobs[:concurrency], concurrency=concurrency)  # warm-up
        records, duration = await loadgen.run_load(backend, jobs, concurrency=concurrency)
    finally:
        await backend.close()
    return loadgen.summarize(records, duration)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", required=True, help="a frozen tree (benchmarks.trees)")
    parser.add_argument("--mode", action="append", required=True, help="NAME=JSON serve-run env")
    parser.add_argument(
        "--mode-engine", action="append", default=[], help="NAME=JSON engine args of one mode"
    )
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--burst", type=int, default=16)
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--out", default=str(RESULTS / "ttft-trace.json"))
    args = parser.parse_args()
    modes = {k: json.loads(v) for k, v in (m.split("=", 1) for m in args.mode)}
    mode_engine = {k: json.loads(v) for k, v in (m.split("=", 1) for m in args.mode_engine)}
    model_dir = bench_model_dir()
    source = loadgen.PromptSource(model_dir, seed=5)
    sequence = loadgen.make_jobs(source, args.requests, 128, 1)
    burst_jobs = loadgen.make_jobs(source, args.burst * 4, 128, 1)
    tree = traced_copy(Path(args.tree))
    result: dict[str, Any] = {"machine": loadgen.machine_info(), "tree": args.tree, "modes": {}}
    in_process = asyncio.run(
        run_in_process("emulator", model_dir, burst_jobs, args.burst, 32, Path(args.tree))
    )
    result["burst_in_process"] = in_process
    print(loadgen.one_line(f"c={args.burst} in-process", in_process), flush=True)
    for name, env in modes.items():
        overrides = stack_args("emulator", model_dir, mode_engine.get(name))
        with serve_app(
            "serve_config.emulator.yaml", port=args.port, args=overrides, repo=tree, env=env
        ) as app:
            asyncio.run(sequential(app.base_url, sequence[:10]))  # warm-up
            clear_events()
            times = asyncio.run(sequential(app.base_url, sequence))
            trace = breakdown(times, read_events())
            burst = asyncio.run(bursts(app.base_url, burst_jobs, args.burst))
        result["modes"][name] = {
            "env": env,
            "engine": mode_engine.get(name, {}),
            "c1_breakdown": trace,
            "burst": burst,
        }
        print(name, json.dumps(trace["median_ms"]), f"total {trace['total_median_ms']:.2f} ms")
        print(loadgen.one_line(f"c={args.burst} {name}", burst), flush=True)
        loadgen.write_json(args.out, result)
    clear_events()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
