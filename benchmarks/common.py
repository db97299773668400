"""What the bench_* scripts share: in-process executors, patched repo copies, CPU accounting, quiet waits."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PLOTS = REPO / "benchmarks" / "plots"


def app_args(config: str | Path, repo: Path = REPO) -> dict[str, Any]:
    """The `args` of a serve config's first application (what the deployments receive)."""
    spec = yaml.safe_load((repo / config).read_text())
    args: dict[str, Any] = spec["applications"][0]["args"]
    return args


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


# Files this benchmark suite brings to a snapshot: the emulator and the benchmarks themselves.
OWN_FILES = ("deployments/executors/emulator.py", "benchmarks", "serve_config.emulator.yaml")


def snapshot(
    patches: Sequence[str | Path] = (), *, ref: str | None = "HEAD", repo: Path = REPO
) -> Path:
    """A frozen copy of the serving code to benchmark: the commit `ref` (or the working tree when None) plus
    this suite's own files, with `patches` applied (`patch -p1`). Other people edit the working tree while
    benchmarks run; a snapshot keeps one run's before/after on the same code.
    """
    target = Path(tempfile.mkdtemp(prefix="shepherd-bench-tree-"))
    ignore = shutil.ignore_patterns(
        ".git", ".carry", ".whl", "__pycache__", "*.egg-info", "results", "plots"
    )
    if ref is None:
        shutil.copytree(repo, target, dirs_exist_ok=True, ignore=ignore)
    else:
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", ref], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
        for name in OWN_FILES:
            source = repo / name
            if source.is_dir():
                shutil.copytree(source, target / name, dirs_exist_ok=True, ignore=ignore)
            else:
                shutil.copy(source, target / name)
    for patch in patches:
        subprocess.run(
            ["patch", "-s", "-p1", "-i", str(Path(patch).resolve())], cwd=target, check=True
        )
    return target


def commit_of(ref: str = "HEAD", repo: Path = REPO) -> str:
    out = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", ref], capture_output=True, text=True
    )
    return out.stdout.strip()


def wait_for_quiet(max_load: float = 1.0, timeout_s: float = 90.0) -> float:
    """Waits (bounded) until the 1-minute load average drops under `max_load`; returns the load seen.

    The development machine is shared: other test runs land on the same two cores.
    """
    deadline = time.monotonic() + timeout_s
    load = os.getloadavg()[0]
    while load > max_load and time.monotonic() < deadline:
        time.sleep(5)
        load = os.getloadavg()[0]
    return load


class CpuMeter:
    """CPU seconds each process spent over a window: which process pays for the tokens."""

    def __init__(self, pids: dict[str, int]) -> None:
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
        wall = time.perf_counter() - self._started_at
        used = {role: end[role] - self._start.get(role, 0.0) for role in end}
        grouped: dict[str, float] = {}
        for role, seconds in used.items():
            grouped[_role_group(role)] = grouped.get(_role_group(role), 0.0) + seconds
        return {
            "wall_s": wall,
            "cpu_s": {k: round(v, 3) for k, v in sorted(grouped.items(), key=lambda kv: -kv[1])},
            "cpu_s_total": round(sum(grouped.values()), 3),
        }


def _role_group(role: str) -> str:
    for marker, group in (
        ("ServeReplica:shepherd:Router", "router"),
        ("ServeReplica:shepherd:Engine", "engine"),
        ("ProxyActor", "proxy"),
        ("ServeController", "controller"),
        ("loadgen", "loadgen"),
        ("raylet", "raylet"),
        ("gcs_server", "gcs"),
    ):
        if marker in role:
            return group
    return "other ray processes"


def py_spy_top(pid: int, duration_s: float, out_path: Path, *, top: int = 25) -> str:
    """Samples `pid` with py-spy for `duration_s` and writes the functions with the most self and total time."""
    raw = out_path.with_suffix(".folded")
    command = [
        _py_spy(),
        "record",
        "-p",
        str(pid),
        "-d",
        str(int(duration_s)),
        "-r",
        "200",
        "-f",
        "raw",
        "-o",
        str(raw),
        "--nonblocking",
    ]
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
        f"py-spy {duration_s:.0f}s @200Hz of pid {pid}: {num_samples} samples (idle excluded)",
        "",
        "self%  function",
    ]
    for frame, count in sorted(self_counts.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * count / max(1, num_samples):5.1f}  {frame}")
    lines += ["", "total% function (inclusive)"]
    for frame, count in sorted(total_counts.items(), key=lambda kv: -kv[1])[: top * 2]:
        lines.append(f"{100 * count / max(1, num_samples):5.1f}  {frame}")
    text = "\n".join(lines) + "\n"
    out_path.write_text(text)
    return text


def _py_spy() -> str:
    """py-spy beside this Python, on PATH, or in a `pip --target` directory on PYTHONPATH (the GPU host)."""
    candidates = [Path(sys.executable).parent / "py-spy"]
    candidates += [
        Path(p) / "bin" / "py-spy" for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p
    ]
    found = next((str(c) for c in candidates if c.exists()), None)
    return found or shutil.which("py-spy") or "py-spy"


def _short_frame(frame: str) -> str:
    """'func (/long/path/site-packages/ray/serve/x.py:12)' -> 'func (ray/serve/x.py)'."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    for marker in (
        "site-packages/",
        "python3.11/",
        "python3.12/",
        "/work/main/",
        "shepherd-patched-",
    ):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})"


@contextlib.contextmanager
def timed(label: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    print(f"[{label}: {time.perf_counter() - started:.1f}s]", flush=True)
