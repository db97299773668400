"""What the bench_* scripts share: code trees to compare, the bench model, stack and in-process runs, CPU
accounting, profiles and the printed table."""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from benchmarks import loadgen
from cluster.local import ServeApp, serve_app

REPO = Path(__file__).resolve().parents[1]
END_ID = 2  # the embedded tokenizer's eos (<|im_end|>), as the Router sends it
# Serve keeps an HAProxy-mode ingress replica draining 30 s before it stops, for load balancers to notice; a
# benchmark's app has none in front of it, so it stops in seconds.
BENCH_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}

# The `model` clients send to a bench app: every script serves its own model directory under this name, whatever
# model and name the tree's serve config gives (serve_config.yaml serves a real GGUF model by default).
BENCH_MODEL = "bench-model"

T = TypeVar("T")


# ---- code trees ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tree:
    """A checkout whose `deployments` a run serves: this one, or a git worktree of another commit."""

    name: str
    path: Path
    commit: str | None


def commit_of(path: Path) -> str | None:
    """The short commit of a checkout (None where there is no git, as on a lent GPU machine)."""
    with contextlib.suppress(OSError):
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        )
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(path),
                "status",
                "--porcelain",
                "--untracked-files=no",
                "deployments",
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    return None


def parse_trees(items: Sequence[str]) -> list[Tree]:
    """`--repo DIR` or `--repo NAME=DIR`, repeatable (before/after: two worktrees); none: this checkout."""
    trees = []
    for item in items or [str(REPO)]:
        name, _, path_text = item.rpartition("=")
        path = Path(path_text).resolve()
        if not (path / "deployments").is_dir():
            raise SystemExit(f"--repo {item}: {path} holds no deployments/ package")
        commit = commit_of(path)
        trees.append(Tree(name or commit or path.name, path, commit))
    if len({tree.name for tree in trees}) != len(trees):
        raise SystemExit("--repo: give each tree its own NAME (NAME=DIR)")
    return trees


def app_args(config: str | Path, repo: Path = REPO) -> dict[str, Any]:
    """The `args` of a serve config's first application (what the deployments receive)."""
    spec = yaml.safe_load((repo / config).read_text())
    args: dict[str, Any] = spec["applications"][0]["args"]
    return args


def add_run_args(parser: argparse.ArgumentParser, *, port: int, seed: int = 0) -> None:
    """What every before/after script takes: the checkouts (`--repo`), rounds, seed, port and output."""
    parser.add_argument(
        "--repo", action="append", default=[], help="[NAME=]DIR, repeatable; default: here"
    )
    parser.add_argument("--rounds", type=int, default=1, help="alternate the runs this many times")
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--out", required=True, help="JSON results path")


def json_arg(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise SystemExit(f"expected a JSON object, got {text!r}")
    return value


def new_report(args: Any, trees: Sequence[Tree], **extra: Any) -> dict[str, Any]:
    """The head of every results file: the machine, the command's arguments and the trees compared."""
    return {
        "machine": loadgen.machine_info(),
        "args": {k: v for k, v in vars(args).items() if k != "trees"},
        "trees": [{"name": t.name, "path": str(t.path), "commit": t.commit} for t in trees],
        **extra,
        "runs": [],
    }


@contextlib.contextmanager
def bench_app(tree: Tree, args: Any, overrides: Mapping[str, Any]) -> Iterator[ServeApp]:
    """`serve run` of `args.config` from `tree`, with `overrides` over its args and `args.env` over its
    environment, on `args.port`; stopped (every process of it) when the block ends."""
    with serve_app(
        args.config,
        port=args.port,
        args=overrides,
        repo=tree.path,
        env={**BENCH_ENV, **args.env},
        num_cpus=getattr(args, "num_cpus", None),
    ) as app:
        yield app


# ---- the bench model -------------------------------------------------------------------------------------
def model_args(model_dir: str) -> dict[str, Any]:
    """The `model` args of a bench app: `model_dir` served as BENCH_MODEL."""
    return {"path": model_dir, "served_model_name": BENCH_MODEL}


def bench_model_dir() -> str:
    """The embedded model with its special tokens silenced: every answer has exactly `max_tokens` tokens."""
    from benchmarks.models import no_eos_copy
    from deployments.embedded_model import ensure_embedded_model

    embedded = ensure_embedded_model()
    return str(no_eos_copy(embedded, embedded.parent / "bench-tiny-noeos"))


# ---- in-process runs -------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def in_process_executor(engine: dict[str, Any], model_dir: str) -> AsyncIterator[Any]:
    """The executor a replica would build from `engine` args, started on this process's loop."""
    from deployments.config import EngineConfig
    from deployments.engine import create_executor

    executor = create_executor(EngineConfig.model_validate(engine), model_dir)
    await executor.start()
    try:
        yield executor
    finally:
        await executor.shutdown()


def in_fresh_process(function: Callable[..., T], *args: Any, repo: Path) -> T:
    """`function(*args)` in a new Python process whose `deployments` package comes from `repo`.

    Every stack run gets a fresh Engine replica, so its in-process reference gets a fresh process too: a
    second executor in a warm process ran 7-12 % faster than the first on a 2-core machine.
    """
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        1, mp_context=spawn, initializer=_put_first_on_path, initargs=(str(repo),)
    ) as pool:
        return pool.submit(function, *args).result()


def _put_first_on_path(path: str) -> None:
    sys.path.insert(0, path)


def deployments_source() -> str:
    """Where this process imported `deployments` from (recorded with every in-process run)."""
    import deployments

    return str(Path(deployments.__file__).resolve().parent)


# ---- stack runs ------------------------------------------------------------------------------------------
async def stack_levels(
    base_url: str,
    model: str,
    source: loadgen.PromptSource,
    levels: Sequence[int],
    *,
    num_requests: Callable[[int], int],
    input_len: int,
    output_len: int,
    pids: Mapping[str, int],
    endpoint: str = "completions",
) -> list[dict[str, Any]]:
    """A closed loop at each level against a running app: a short warm-up, then the measured load with the
    CPU seconds every process of the app spent on it."""
    backend = loadgen.OpenAIBackend(base_url, model, endpoint=endpoint, max_tokens=output_len)
    results = []
    try:
        warm = loadgen.make_jobs(source, min(8, max(levels)), input_len, 1)
        await loadgen.run_load(backend, warm, concurrency=len(warm))
        for concurrency in levels:
            jobs = loadgen.make_jobs(source, num_requests(concurrency), input_len, 1)
            meter = CpuMeter(pids)
            records, duration = await loadgen.run_load(backend, jobs, concurrency=concurrency)
            summary = loadgen.summarize(records, duration)
            results.append({"concurrency": concurrency, **summary, "cpu": meter.stop()})
    finally:
        await backend.close()
    return results


# ---- CPU and profiles ------------------------------------------------------------------------------------
class CpuMeter:
    """CPU seconds each process spent over a window: which process pays for the tokens."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        import psutil

        self._processes: dict[str, Any] = {}
        for role, pid in {**pids, f"loadgen#{os.getpid()}": os.getpid()}.items():
            with contextlib.suppress(psutil.Error):
                self._processes[role] = psutil.Process(pid)
        self._start = self._read()
        self._started_at = time.perf_counter()

    def _read(self) -> dict[str, float]:
        import psutil

        seconds = {}
        for role, process in self._processes.items():
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                seconds[role] = times.user + times.system
        return seconds

    def stop(self) -> dict[str, Any]:
        end = self._read()
        grouped: dict[str, float] = {}
        for role, seconds in end.items():
            group = _role_group(role)
            grouped[group] = grouped.get(group, 0.0) + seconds - self._start.get(role, 0.0)
        return {
            "wall_s": round(time.perf_counter() - self._started_at, 3),
            "cpu_s": {k: round(v, 2) for k, v in sorted(grouped.items(), key=lambda kv: -kv[1])},
        }


def _role_group(role: str) -> str:
    for marker, group in (
        ("ServeReplica:shepherd:Router", "router"),
        ("ServeReplica:shepherd:Engine", "engine"),
        ("ProxyActor", "proxy"),
        ("haproxy", "haproxy"),
        ("ServeController", "controller"),
        ("loadgen", "loadgen"),
        ("raylet", "raylet"),
        ("gcs_server", "gcs"),
    ):
        if marker in role:
            return group
    return "other"


def py_spy_top(pid: int, duration_s: float, *, top: int = 25) -> str:
    """py-spy samples of `pid` (200 Hz, idle excluded): the functions with the most self and total time."""
    raw = Path(f"/tmp/py-spy-{pid}-{os.getpid()}.folded")
    command = [_py_spy(), "record", "-p", str(pid), "-d", str(int(duration_s)), "-r", "200"]
    command += ["-f", "raw", "-o", str(raw), "--nonblocking"]
    subprocess.run(command, capture_output=True, timeout=duration_s + 60)
    self_counts: dict[str, int] = {}
    total_counts: dict[str, int] = {}
    num_samples = 0
    if raw.exists():
        for line in raw.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            num_samples += count
            frames = [_short_frame(f) for f in stack.split(";")]
            self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count
            for frame in set(frames):
                total_counts[frame] = total_counts.get(frame, 0) + count
        raw.unlink()
    lines = [
        f"py-spy {duration_s:.0f}s @200Hz of pid {pid}: {num_samples} samples",
        "self%  function",
    ]
    for frame, count in sorted(self_counts.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * count / max(1, num_samples):5.1f}  {frame}")
    lines += ["", "total% function (inclusive)"]
    for frame, count in sorted(total_counts.items(), key=lambda kv: -kv[1])[: top * 2]:
        lines.append(f"{100 * count / max(1, num_samples):5.1f}  {frame}")
    return "\n".join(lines) + "\n"


def _py_spy() -> str:
    """py-spy beside this Python, or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy") or "py-spy"


def _short_frame(frame: str) -> str:
    """'func (/long/path/site-packages/ray/serve/x.py:12)' -> 'func (ray/serve/x.py)'."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3.", str(REPO) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})"


# ---- reporting -------------------------------------------------------------------------------------------
def spread(values: Sequence[float]) -> str:
    """'median [min-max]' of the rounds, or the one value."""
    import statistics

    values = [v for v in values if v == v]  # NaN: a failed run
    if not values:
        return "-"
    if len(values) == 1:
        return _num(values[0])
    return f"{_num(statistics.median(values))} [{_num(min(values))}-{_num(max(values))}]"


def _num(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def write_report(
    report: dict[str, Any],
    path: str,
    title: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
) -> None:
    """Puts the table into `report`, writes it to `path`, and prints the table under `title`."""
    report["table"] = [dict(zip(headers, row, strict=True)) for row in rows]
    loadgen.write_json(path, report)
    print(f"\n{title}")
    print_table(headers, rows)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
