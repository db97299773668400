"""The GPU runs in one command on a GPU host (Ray carried in): the transformers engine on a random
Llama-3.2-1B-shaped model (bf16, sdpa, CUDA graphs), through the stack and in-process.

Steps, each a child process with its own time limit, all within `--budget-s` (a step that would not fit is
skipped and says so):
  setup     the cards, versions, copy bandwidth and the model (random weights, the embedded tokenizer)
  serving   bench_serving: `--serving-replicas` Engine replicas on GPU 0 (several share it when > 1) against
            the executor in-process, at `--levels`, bracketed: output tokens/s, TTFT, TPOT
  scaling   with 2+ GPUs: bench_serving with one Engine replica per GPU, at `--scale-levels`
  sessions  bench_sessions: `--session-replicas` Engine replicas sharing GPU 0, session affinity against
            power of two, `--sessions` concurrent sessions x `--turns` turns with long system prompts
  peer      bench_peer: our stack against `transformers serve --continuous-batching` on GPU 0
Every step prints its own table; this driver prints them all at the end and writes everything to
`--out`/gpu.json. A step's weight-read floor: each decoding step reads every weight once, so steps/s <=
copy bandwidth / weight bytes, and tokens/s <= c x that.

    python -m benchmarks.bench_gpu --out $OUT                          # on the GPU host, ~9 minutes
    python -m benchmarks.bench_gpu --steps sessions --session-replicas 4 --out $OUT
    python -m benchmarks.bench_gpu --dry-run --out /tmp/gpu-dry        # CPU, tiny model, same code paths
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import loadgen
from benchmarks.common import json_arg, print_table
from benchmarks.models import TINY_SHAPE
from cluster.local import merge

STEPS = ("serving", "scaling", "sessions", "peer")
# The longest each step may take when the budget allows (seconds).
STEP_LIMIT_S = {"setup": 240, "serving": 240, "scaling": 200, "sessions": 240, "peer": 240}


def transformers_args(dry_run: bool) -> dict[str, Any]:
    """64 sequences x (128 + 128) tokens fit 512 pages of 64 tokens; prefill runs in 2,048-token chunks."""
    return {
        "device": "cpu" if dry_run else "cuda",
        "dtype": "float32" if dry_run else "bfloat16",
        "attn_implementation": "sdpa",
        "num_blocks": 512,
        "page_size": 64,
        "max_batch_tokens": 2048,
        "max_requests_per_batch": 64,
        "use_cuda_graph": not dry_run,
    }


def engine_on_gpu0(num_replicas: int, dry_run: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """Engine args and `serve run` environment for `num_replicas` replicas on GPU 0.

    One replica reserves the GPU through Ray. Several share it: they reserve no GPU, and Ray then leaves
    CUDA_VISIBLE_DEVICES as `serve run` got it (Ray's RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO is off by default),
    so each replica's engine, on device `cuda`, takes GPU 0.
    """
    engine: dict[str, Any] = {
        "kind": "transformers",
        "num_replicas": num_replicas,
        "num_cpus_per_replica": 1,
        "num_gpus_per_replica": 0 if dry_run or num_replicas > 1 else 1,
        "max_ongoing_requests": 64,
        "transformers": transformers_args(dry_run),
    }
    env = {"CUDA_VISIBLE_DEVICES": "0"} if num_replicas > 1 and not dry_run else {}
    return engine, env


def card_names() -> list[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.TimeoutExpired):
        return []


def setup(work: Path, dry_run: bool) -> dict[str, Any]:
    """The model and the card's copy bandwidth (runs in a child process: `--step setup`)."""
    import torch

    from benchmarks.models import llama_1b_shaped
    from deployments.embedded_model import ensure_embedded_model

    model_dir = llama_1b_shaped(
        ensure_embedded_model(),
        work / ("tiny-shaped" if dry_run else "llama-1b-shaped"),
        dtype="float32" if dry_run else "bfloat16",
        shape=TINY_SHAPE if dry_run else None,
    )
    out: dict[str, Any] = {
        "model_dir": str(model_dir),
        "weight_bytes": sum(p.stat().st_size for p in model_dir.glob("*.safetensors")),
        "cards": card_names(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        # Device-to-device copies of 2 GiB: bytes read + written per second, the memory ceiling of decoding.
        src = torch.empty(2**30, dtype=torch.bfloat16, device="cuda").uniform_()
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            dst.copy_(src)
        torch.cuda.synchronize()
        out["copy_bandwidth_gbs"] = 10 * 2 * src.numel() * 2 / (time.perf_counter() - start) / 1e9
        out["num_gpus"] = torch.cuda.device_count()
    return out


def step_commands(args: argparse.Namespace, model_dir: str, num_gpus: int) -> dict[str, list[str]]:
    """The benchmark command line of every step."""
    work = Path(args.work)
    python = [sys.executable, "-m"]
    engine, env = engine_on_gpu0(args.serving_replicas, args.dry_run)
    engine = merge(engine, args.engine_json)
    common = ["--model-dir", model_dir, "--repo", args.repo]
    levels = "1,4" if args.dry_run else args.levels
    commands = {
        "serving": [
            *python,
            "benchmarks.bench_serving",
            *common,
            *("--engine-json", json.dumps(engine), "--env", json.dumps({**env, **args.env})),
            *("--levels", levels, "--rounds", str(args.rounds)),
            *("--out", str(work / "serving.json")),
        ]
    }
    if num_gpus >= 2 or args.dry_run:
        scaled = merge(engine, {"num_replicas": max(2, num_gpus), "num_gpus_per_replica": 1})
        if args.dry_run:
            scaled["num_gpus_per_replica"] = 0
        commands["scaling"] = [
            *python,
            "benchmarks.bench_serving",
            *common,
            *("--engine-json", json.dumps(scaled), "--env", json.dumps(args.env)),
            *("--levels", "4,8" if args.dry_run else args.scale_levels, "--in-process", "none"),
            *("--num-cpus", str(2 * max(2, num_gpus) + 2)),
            *("--out", str(work / "scaling.json")),
        ]
    shared, shared_env = engine_on_gpu0(args.session_replicas, args.dry_run)
    # Room for every session's history on every replica: 16 sessions x ~8k tokens each.
    shared = merge(merge(shared, {"transformers": {"num_blocks": 2048}}), args.engine_json)
    commands["sessions"] = [
        *python,
        "benchmarks.bench_sessions",
        *common,
        *("--replicas", str(args.session_replicas), "--engine-json", json.dumps(shared)),
        *("--env", json.dumps({**shared_env, **args.env})),
        *("--num-cpus", str(args.session_replicas + 2)),
        *("--sessions", "2" if args.dry_run else str(args.sessions)),
        *("--turns", "3" if args.dry_run else str(args.turns)),
        *("--system-tokens", "64" if args.dry_run else str(args.system_tokens)),
        *("--turn-tokens", "32" if args.dry_run else str(args.turn_tokens)),
        *("--output-len", "8" if args.dry_run else "32"),
        *("--out", str(work / "sessions.json")),
    ]
    peer_engine = {"max_ongoing_requests": 64, **args.engine_json}
    commands["peer"] = [
        *python,
        "benchmarks.bench_peer",
        *common,
        *("--engine-json", json.dumps(peer_engine), "--env", json.dumps(args.env)),
        *("--device", "cpu" if args.dry_run else "cuda"),
        *("--dtype", "float32" if args.dry_run else "bfloat16"),
        *([] if args.dry_run else ["--cuda-graph"]),
        *("--max-batch-tokens", "2048", "--levels", levels),
        *("--sessions", "2" if args.dry_run else "16", "--rounds", str(args.rounds)),
        *("--ttft-requests", "4" if args.dry_run else "48"),
        *("--out", str(work / "peer.json")),
    ]
    return commands


def run_step(name: str, command: list[str], limit_s: float, env: dict[str, str]) -> dict[str, Any]:
    """Runs one step's command; returns its JSON (from its `--out`) or what went wrong."""
    out_path = Path(command[command.index("--out") + 1])
    out_path.unlink(missing_ok=True)
    started = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {name} (limit {limit_s:.0f} s)", flush=True)
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=limit_s, env={**os.environ, **env}
        )
        log = proc.stdout + proc.stderr
        status = f"exit {proc.returncode}"
    except subprocess.TimeoutExpired as timeout:
        # The captured output comes back as bytes even with text=True.
        output = timeout.stdout
        log = output.decode(errors="replace") if isinstance(output, bytes) else (output or "")
        status = f"timed out after {limit_s:.0f} s"
    seconds = time.perf_counter() - started
    # The benchmark's own progress lines (not Ray's or the replicas' logs).
    for line in log.splitlines():
        if not line.startswith(("(", "[", " ")) and ("tok/s" in line or "FAILED" in line):
            print(f"  {line}", flush=True)
    result: dict[str, Any] = {"status": status, "seconds": round(seconds)}
    if out_path.exists():
        result["result"] = json.loads(out_path.read_text())
    if status != "exit 0":
        result["log_tail"] = log[-3000:]
        print(log[-1500:], flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench-gpu-out"))
    parser.add_argument("--work", default="/tmp/bench-gpu")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, small loads")
    parser.add_argument("--budget-s", type=float, default=540, help="all steps together")
    parser.add_argument(
        "--steps", default=",".join(STEPS), help="comma-separated: " + ",".join(STEPS)
    )
    parser.add_argument("--repo", default=".", help="the code tree to serve")
    parser.add_argument(
        "--engine-json", type=json_arg, default={}, help="engine args for every step"
    )
    parser.add_argument("--env", type=json_arg, default={}, help="`serve run`'s environment")
    parser.add_argument("--levels", default="1,16,64")
    parser.add_argument("--scale-levels", default="64,128")
    parser.add_argument("--serving-replicas", type=int, default=1, help="replicas on GPU 0")
    parser.add_argument("--session-replicas", type=int, default=4, help="replicas sharing GPU 0")
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--system-tokens", type=int, default=4000)
    parser.add_argument("--turn-tokens", type=int, default=480)
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds of the serving and peer steps"
    )
    parser.add_argument("--step", help=argparse.SUPPRESS)  # internal: run the setup in this process
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.step == "setup":
        (work / "setup.json").write_text(json.dumps(setup(work, args.dry_run)))
        return

    deadline = time.monotonic() + args.budget_s
    os.environ.setdefault("SHEPHERD_CACHE_DIR", str(work / "cache"))
    report: dict[str, Any] = {"machine": loadgen.machine_info(), "args": vars(args)}
    out_path = Path(args.out) / ("gpu-dry.json" if args.dry_run else "gpu.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "benchmarks.bench_gpu", "--step", "setup", "--work", str(work)]
    command += ["--out", str(work / "setup.json"), *(["--dry-run"] if args.dry_run else [])]
    report["setup"] = run_step("setup", command, STEP_LIMIT_S["setup"], {})
    setup_result = report["setup"].get("result") or {}
    out_path.write_text(json.dumps(report, indent=1, default=str))
    if "model_dir" not in setup_result:
        raise SystemExit("setup failed: no model")
    commands = step_commands(args, setup_result["model_dir"], setup_result.get("num_gpus", 0))
    for name in args.steps.split(","):
        left = deadline - time.monotonic()
        if name not in commands:
            report[name] = {"status": "not run: needs 2 or more GPUs"}
        elif left < 60:
            report[name] = {"status": f"skipped: {left:.0f} s of the budget left"}
        else:
            report[name] = run_step(name, commands[name], min(STEP_LIMIT_S[name], left - 10), {})
        out_path.write_text(json.dumps(report, indent=1, default=str))
    print_report(report)
    print(f"wrote {out_path}")


def print_report(report: dict[str, Any]) -> None:
    setup = report["setup"].get("result") or {}
    bandwidth, weight_bytes = setup.get("copy_bandwidth_gbs"), setup.get("weight_bytes") or 0
    print(f"\ncards: {setup.get('cards')}, torch {setup.get('torch')}")
    if bandwidth and weight_bytes:
        floor = bandwidth * 1e9 / weight_bytes
        print(
            f"copy bandwidth {bandwidth:.0f} GB/s, weights {weight_bytes / 1e9:.2f} GB: at most "
            f"{floor:.0f} decoding steps/s, so tokens/s <= c x {floor:.0f}"
        )
    for name in STEPS:
        step = report.get(name)
        if step is None:
            continue
        print(
            f"\n{name}: {step['status']}" + (f", {step['seconds']} s" if "seconds" in step else "")
        )
        result = step.get("result") or {}
        rows = result.get("table") or []
        if rows:
            print_table(list(rows[0]), [list(row.values()) for row in rows])
        for tree, summary in (result.get("summary") or {}).items():
            print(f"{tree}: {json.dumps(summary)}")


if __name__ == "__main__":
    main()
