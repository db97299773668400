"""Tensor parallelism of the transformers engine, with the executor in-process: one command, one table.

Every measurement runs in a child process of its own (GPU memory is returned between them), and the variants
alternate round by round, so drift on the machine falls on both alike.

  --tp 2   (a host with 2 GPUs): TP=2 over both GPUs against TP=1 on GPU 0, this tree. Greedy output equal
           token for token on the same prompts; output tokens/s and TTFT p50/p99 at each concurrency; and the
           share of a decoding step that rank 0 spends in the activation all-reduces (from the NCCL kernels
           the profiler records on a GPU; from timing gloo's `all_reduce` on the CPU), next to what the
           continuous-batching control collectives (gloo) take.
  --tp 1 --repo old=DIR --repo new=DIR   (one GPU): TP=1 through each checkout's executor (say, the code
           before tensor parallelism existed, and after), same model, same load: does TP=1 regress? Only
           each checkout's `deployments` package is used; the benchmark's own code is this one's.

    mkdir -p .carry/old && git archive OLD_COMMIT deployments | tar -x -C .carry/old   # .carry/ travels
    python -m benchmarks.bench_tp --tp 1 --repo old=.carry/old --repo new=. --out $OUT  # to the GPU host
    python -m benchmarks.bench_tp --tp 2 --shape 1b --out $OUT       # --shape 8b: a model whose weights make
                                                                      # decoding bandwidth-bound on one GPU
    python -m benchmarks.bench_tp --tp 2 --dry-run --out /tmp/tp-dry  # CPU: a tiny model, gloo
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import loadgen
from benchmarks.common import REPO, Tree, deployments_source, parse_trees
from benchmarks.models import TINY_SHAPE

SHAPES: dict[str, dict[str, Any] | None] = {
    "tiny": TINY_SHAPE,
    "1b": None,  # Llama-3.2-1B (benchmarks.models)
    "8b": {  # Llama-3.1-8B: 16 GB of bf16 weights read per decoding step
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
    },
}
# NVLink multicast stays off on the lent GPU hosts (it can take their shared GPUs out of service).
NO_MULTICAST = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
NUM_EQUALITY_PROMPTS = 4
EQUALITY_TOKENS = 32


def settings(dry_run: bool) -> dict[str, Any]:
    if dry_run:
        return {
            "device": "cpu",
            "dtype": "float32",
            "levels": [1, 4],
            "input_len": 16,
            "output_len": 8,
            "waves": 1,
            "min_requests": 2,
            "profile_concurrency": 4,
        }
    return {
        "device": "cuda",
        "dtype": "bfloat16",
        "levels": [1, 16, 64],
        "input_len": 128,
        "output_len": 128,
        "waves": 2,
        "min_requests": 8,  # TTFT percentiles at c=1 need more than two requests
        "profile_concurrency": 16,
    }


def engine_args(cfg: dict[str, Any], tp_size: int) -> dict[str, Any]:
    transformers: dict[str, Any] = {
        "device": cfg["device"],
        "dtype": cfg["dtype"],
        "num_blocks": 512,
        "page_size": 64,
        "max_batch_tokens": 2048,
        "max_requests_per_batch": 64,
        "use_cuda_graph": cfg["device"] == "cuda",
        "sampling": "greedy",
    }
    if tp_size > 1:  # an older tree has no such field (its config forbids unknown ones)
        transformers["tensor_parallel_size"] = tp_size
    gpus = tp_size if cfg["device"] == "cuda" else 0
    return {"kind": "transformers", "num_gpus_per_replica": gpus, "transformers": transformers}


# ---- phases (child processes) -------------------------------------------------------------------------------
def phase_setup(args: argparse.Namespace, cfg: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.models import llama_1b_shaped
    from deployments.embedded_model import ensure_embedded_model

    tokenizer_dir = ensure_embedded_model()
    model_dir = llama_1b_shaped(
        tokenizer_dir,
        Path(args.work) / f"llama-{args.shape}-shaped",
        dtype=cfg["dtype"],
        shape=SHAPES[args.shape],
    )
    return {"model_dir": str(model_dir), "machine": loadgen.machine_info()}


async def _allreduce_share(executor: Any, backend: Any, jobs: list[Any], concurrency: int) -> Any:
    """Runs `jobs` while measuring where rank 0's steps go; returns shares of the window's wall time."""
    import torch
    import torch.distributed as dist

    manager = executor._manager
    control_group = manager.batch_processor.distributed_helper.cpu_comm_group
    seconds = {"activation": 0.0, "control": 0.0}
    original = dist.all_reduce

    def timed_all_reduce(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(tensor, *args, **kwargs)
        finally:
            group = kwargs.get("group", args[1] if len(args) > 1 else None)
            kind = "control" if group is control_group else "activation"
            seconds[kind] += time.perf_counter() - started

    is_gpu = torch.cuda.is_available()
    profiler: Any = (
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
        if is_gpu
        else contextlib.nullcontext()
    )
    first_step = manager.current_batch
    dist.all_reduce = timed_all_reduce  # gloo's all_reduce blocks: its wall time is its cost
    started = time.perf_counter()
    try:
        with profiler:
            await loadgen.run_load(backend, jobs, concurrency=concurrency)
    finally:
        dist.all_reduce = original
    window_s = time.perf_counter() - started
    out: dict[str, Any] = {
        "concurrency": concurrency,
        "num_steps": manager.current_batch - first_step,
        "window_s": window_s,
        "control_share": seconds["control"] / window_s,
    }
    if is_gpu:
        # NCCL launches asynchronously: only its kernels' time counts. CUPTI sees every kernel of the process.
        kernels = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        total_us = sum(e.time_range.elapsed_us() for e in kernels)
        nccl_us = sum(e.time_range.elapsed_us() for e in kernels if "nccl" in e.name.lower())
        out["num_kernels"] = len(kernels)
        out["activation_share"] = nccl_us / 1e6 / window_s if kernels else None
        out["activation_share_of_gpu_time"] = nccl_us / total_us if total_us else None
    else:
        out["activation_share"] = seconds["activation"] / window_s
    return out


def phase_run(args: argparse.Namespace, cfg: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.common import in_process_executor
    from deployments.messages import GenerateRequest, SamplingParams

    engine = engine_args(cfg, args.tp_size)
    source = loadgen.PromptSource(args.model_dir, seed=2)
    out: dict[str, Any] = {
        "tp_size": args.tp_size,
        "engine": engine,
        "deployments": deployments_source(),
        "levels": [],
    }

    async def main() -> None:
        started = time.perf_counter()
        async with in_process_executor(engine, args.model_dir) as executor:
            out["start_s"] = time.perf_counter() - started
            prompts = [source.prompt(cfg["input_len"])[1] for _ in range(NUM_EQUALITY_PROMPTS)]
            greedy = SamplingParams(temperature=0.0)
            out["greedy_token_ids"] = []
            for i, ids in enumerate(prompts):
                request = GenerateRequest(f"eq{i}", ids, EQUALITY_TOKENS, greedy)
                deltas = [d async for d in executor.generate(request)]
                out["greedy_token_ids"].append([t for d in deltas for t in d.token_ids])
            backend = loadgen.ExecutorBackend(executor, cfg["output_len"], end_id=2)
            for concurrency in cfg["levels"]:  # warm-up: CUDA graphs are captured per shape
                warm = loadgen.make_jobs(source, concurrency, cfg["input_len"], 1)
                await loadgen.run_load(
                    loadgen.ExecutorBackend(executor, 8, end_id=2), warm, concurrency=concurrency
                )
            for concurrency in cfg["levels"]:
                jobs = loadgen.make_jobs(
                    source,
                    max(cfg["min_requests"], cfg["waves"] * concurrency),
                    cfg["input_len"],
                    1,
                )
                records, duration = await loadgen.run_load(backend, jobs, concurrency=concurrency)
                summary = loadgen.summarize(records, duration)
                out["levels"].append({"concurrency": concurrency, **summary})
                print(loadgen.one_line(f"  tp={args.tp_size} c={concurrency}", summary), flush=True)
            if args.tp_size > 1:
                concurrency = cfg["profile_concurrency"]
                jobs = loadgen.make_jobs(source, concurrency, cfg["input_len"], 1)
                out["allreduce"] = await _allreduce_share(executor, backend, jobs, concurrency)

    asyncio.run(main())
    return out


# ---- the parent -----------------------------------------------------------------------------------------------
def run_phase(
    phase: str, args: argparse.Namespace, extra: list[str], *, tree: Tree, env: dict[str, str]
) -> dict[str, Any]:
    """One phase in a child process serving `tree`'s `deployments`; its JSON, or {"error": ...}."""
    result = Path(args.work) / f"{phase}-{len(os.listdir(args.work))}.json"
    command = [
        sys.executable,
        "-m",
        "benchmarks.bench_tp",
        "--phase",
        phase,
        "--result",
        str(result),
    ]
    command += ["--work", args.work, "--shape", args.shape, "--deployments-from", str(tree.path)]
    command += extra
    command += ["--dry-run"] if args.dry_run else []
    started = time.perf_counter()
    proc = subprocess.run(
        command,
        cwd=REPO,
        env={
            **os.environ,
            **NO_MULTICAST,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=args.phase_timeout_s,
    )
    print("\n".join(line for line in proc.stdout.splitlines() if line.startswith("  ")), flush=True)
    print(f"  ({phase} {' '.join(extra)}: {time.perf_counter() - started:.0f} s)", flush=True)
    if proc.returncode != 0 or not result.exists():
        tail = (proc.stdout + proc.stderr)[-2500:]
        print(tail, flush=True)
        return {"error": f"exit {proc.returncode}", "log_tail": tail}
    data: dict[str, Any] = json.loads(result.read_text())
    return data


def _level(run: dict[str, Any], concurrency: int) -> dict[str, Any] | None:
    return next((lv for lv in run.get("levels", []) if lv["concurrency"] == concurrency), None)


def _mean(levels: list[dict[str, Any]], key: str, sub: str | None = None) -> str:
    values = [lv[key][sub] if sub else lv[key] for lv in levels]
    return f"{statistics.fmean(values):.1f}" if values else "n/a"


def print_table(report: dict[str, Any], levels: list[int]) -> None:
    names = list(report["variants"])
    runs = report["runs"]
    print(f"\n{report['title']}")
    if "greedy_equal" in report:
        print(
            f"greedy output equal ({NUM_EQUALITY_PROMPTS} prompts x {EQUALITY_TOKENS} tokens): ",
            end="",
        )
        print(report["greedy_equal"])
    a, b = names
    print(f"| c | {a} tok/s | {b} tok/s | {b}/{a} (per round) ", end="")
    print(f"| TTFT p50 {a}/{b} ms | TTFT p99 {a}/{b} ms |")
    print("|---|---|---|---|---|---|")
    for c in levels:
        cells: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        ratios = []
        for round_runs in runs:
            got = {name: _level(round_runs.get(name, {}), c) for name in names}
            for name, level in got.items():
                if level is not None:
                    cells[name].append(level)
            level_a, level_b = got[a], got[b]
            if level_a is not None and level_b is not None:
                ratios.append(level_b["output_throughput"] / level_a["output_throughput"])

        per_round = " ".join(f"{r:.2f}" for r in ratios) or "n/a"
        tok_s = [_mean(cells[name], "output_throughput") for name in (a, b)]
        p50 = [_mean(cells[name], "ttft_ms", "p50") for name in (a, b)]
        p99 = [_mean(cells[name], "ttft_ms", "p99") for name in (a, b)]
        print(
            f"| {c} | {tok_s[0]} | {tok_s[1]} | {per_round} | {'/'.join(p50)} | {'/'.join(p99)} |"
        )
    shares = [r[b]["allreduce"] for r in runs if "allreduce" in r.get(b, {})]
    for share in shares:
        wall, gpu = share.get("activation_share"), share.get("activation_share_of_gpu_time")
        print(
            f"rank 0 at c={share['concurrency']}, {share['num_steps']} steps: activation all-reduce "
            + (f"{100 * wall:.1f} % of wall time" if wall is not None else "n/a (no kernels seen)")
            + (f" ({100 * gpu:.1f} % of GPU kernel time)" if gpu is not None else "")
            + f"; CB control collectives (gloo, waits for the other ranks included) "
            f"{100 * share['control_share']:.1f} %"
        )
    errors = {
        f"{n} round {i}": r[n]["error"] for i, r in enumerate(runs) for n in r if "error" in r[n]
    }
    if errors:
        print(f"errors: {errors}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tp", type=int, default=2, help="2: TP=2 vs TP=1; 1: --tree A vs --tree B"
    )
    parser.add_argument(
        "--repo", action="append", default=[], help="NAME=DIR, twice (with --tp 1): two checkouts"
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None, help="where the JSON report goes")
    parser.add_argument("--work", default="/tmp/bench-tp")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, gloo")
    parser.add_argument("--phase-timeout-s", type=float, default=400)
    parser.add_argument("--phase", choices=["setup", "run"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--tp-size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--deployments-from", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dry_run:
        args.shape = "tiny"
    cfg = settings(args.dry_run)
    if args.phase is not None:
        if args.deployments_from:
            # Only `deployments` comes from the checkout under test (nothing has imported it yet); the
            # `benchmarks` package, already imported, stays this one.
            sys.path.insert(0, args.deployments_from)
        result = phase_setup(args, cfg) if args.phase == "setup" else phase_run(args, cfg)
        Path(args.result).write_text(json.dumps(result, default=str))
        return

    os.makedirs(args.work, exist_ok=True)
    if args.tp == 1:
        if len(args.repo) != 2:
            parser.error("--tp 1 compares two checkouts: --repo old=DIR --repo new=DIR")
        variants = {
            tree.name: (tree, 1, {"CUDA_VISIBLE_DEVICES": "0"}) for tree in parse_trees(args.repo)
        }
        title = f"TP=1 through each checkout's executor, {args.shape}-shaped model"
    else:
        (this,) = parse_trees(args.repo[:1])
        variants = {
            "tp1": (this, 1, {"CUDA_VISIBLE_DEVICES": "0"} if not args.dry_run else {}),
            f"tp{args.tp}": (this, args.tp, {}),
        }
        title = f"TP={args.tp} against TP=1, {args.shape}-shaped model"
    if args.dry_run:
        for name, (tree, tp, env) in variants.items():
            variants[name] = (tree, tp, {**env, "CUDA_VISIBLE_DEVICES": ""})
    setup = run_phase("setup", args, [], tree=parse_trees([])[0], env={})
    if "error" in setup:
        sys.exit("setup failed")
    print(f"model {setup['model_dir']}; {setup['machine'].get('gpus') or 'no GPU'}", flush=True)
    runs: list[dict[str, Any]] = []
    for round_index in range(args.rounds):
        order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        round_runs = {}
        for name in order:
            tree, tp, env = variants[name]
            extra = ["--model-dir", setup["model_dir"], "--tp-size", str(tp)]
            round_runs[name] = run_phase("run", args, extra, tree=tree, env=env)
        runs.append(round_runs)
    report: dict[str, Any] = {
        "title": title,
        "variants": list(variants),
        "trees": {name: [str(t.path), t.commit] for name, (t, _, _) in variants.items()},
        "settings": cfg,
        "machine": setup["machine"],
        "runs": runs,
    }
    if args.tp > 1:
        outputs = [r[n].get("greedy_token_ids") for r in runs for n in variants]
        report["greedy_equal"] = None not in outputs and all(o == outputs[0] for o in outputs)
    print_table(report, cfg["levels"])
    if args.out:
        loadgen.write_json(Path(args.out) / "bench_tp.json", report)


if __name__ == "__main__":
    main()
