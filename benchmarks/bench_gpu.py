"""Item 4 on a GPU host, in one call: the transformers engine on a random Llama-3.2-1B-shaped model (bf16).

Phases (each in its own process, so GPU memory is returned between them; all within `--budget-s`):
  setup     card, versions, copy bandwidth, the model (built here: random weights, the embedded tokenizer)
  static    `model.generate` static batching, batch = c, on GPU 0
  executor  our TransformersExecutor in-process on GPU 0, closed loop at each c, per attention/CUDA-graph setting
  stack1    the same engine behind real Ray Serve (HTTP -> proxy -> Router -> 1 Engine replica), each c;
            with `--variant NAME=TREE` several code trees (before/after a patch) in the same run
  stack2    two Engine replicas (one GPU each) behind the same Router: throughput scaling 1 -> 2
  peer      item 5 on GPU 0: our stack against `transformers serve --continuous-batching`, same settings
Beside them, pinned to cores the GPU phases do not use (a quiet "2-core machine" each, since the shared
development machine is not quiet): cores 0-1 run bench_overhead's ttft and ceiling items (emulator engine) for
every tree, cores 2-3 its throughput item and bench_peer (transformers serve); the GPU phases get cores 4+.
The weight-bandwidth floor: every decoding step reads all weights once, so steps/s <= bandwidth / weight bytes
and tokens/s <= c x that (KV-cache reads, small at these lengths, ignored).

    python -m benchmarks.bench_gpu --out $OUT --variant base=.bench-tree/base --variant fixed=.bench-tree/fixed
    python -m benchmarks.bench_gpu --dry-run --out /tmp/gpu-dry      # CPU, tiny model, same code paths
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import loadgen

SERVED = "llama-1b-shaped"
PORT = 8111
TINY_SHAPE = {
    "vocab_size": 2048,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}


# ---- shared settings -------------------------------------------------------------------------------------
def settings(dry_run: bool) -> dict[str, Any]:
    if dry_run:
        return {
            "device": "cpu",
            "dtype": "float32",
            "levels": [1, 4],
            "stack_levels": [1, 4],
            "scale_levels": [4, 8],
            "input_len": 32,
            "output_len": 16,
            "engine_configs": [("sdpa", False)],
        }
    return {
        "device": "cuda",
        "dtype": "bfloat16",
        "levels": [1, 4, 16, 64],
        "stack_levels": [1, 16, 64],
        "scale_levels": [64, 128],
        "input_len": 128,
        "output_len": 128,
        "engine_configs": [("sdpa", False), ("sdpa", True)],
    }


def engine_args(cfg: dict[str, Any], attn: str, cuda_graph: bool) -> dict[str, Any]:
    # 64 sequences x (128 + 128) tokens fit 512 pages of 64 tokens; prefill runs in 2,048-token chunks.
    return {
        "device": cfg["device"],
        "dtype": cfg["dtype"],
        "attn_implementation": attn,
        "num_blocks": 512,
        "page_size": 64,
        "max_batch_tokens": 2048,
        "max_requests_per_batch": 64,
        "use_cuda_graph": cuda_graph,
    }


def num_requests(concurrency: int, waves: int = 1) -> int:
    """`waves` waves of `concurrency` requests (at least two): what a 10-minute lease affords at 1B scale."""
    return max(2, waves * concurrency)


def card_names() -> list[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.TimeoutExpired):
        return ["cpu"]


# ---- phases (run in child processes) ----------------------------------------------------------------------
def phase_setup(args: argparse.Namespace, cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from benchmarks.models import llama_1b_shaped, no_eos_copy
    from deployments.embedded_model import ensure_embedded_model

    tokenizer_dir = ensure_embedded_model()
    model_dir = llama_1b_shaped(
        tokenizer_dir,
        Path(args.work) / ("tiny-shaped" if args.dry_run else "llama-1b-shaped"),
        dtype=cfg["dtype"],
        shape=TINY_SHAPE if args.dry_run else None,
    )
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    tiny = no_eos_copy(
        tokenizer_dir, tokenizer_dir.parent / "bench-tiny-noeos"
    )  # the CPU jobs' model
    out: dict[str, Any] = {
        "model_dir": str(model_dir),
        "tiny_model_dir": str(tiny),
        "weight_bytes": weights,
        "cards": card_names(),
    }
    if torch.cuda.is_available():
        # Device-to-device copy of 2 GiB: bytes read + bytes written per second (METHOD.md's memory ceiling).
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
        out["torch"] = torch.__version__
        out["card"] = torch.cuda.get_device_name(0)
    return out


def phase_static(args: argparse.Namespace, cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, cfg["dtype"])
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=dtype, attn_implementation="sdpa"
    )
    model = model.to(cfg["device"]).eval()
    source = loadgen.PromptSource(args.model_dir, seed=1)
    out: dict[str, Any] = {"card": _card(), "levels": []}

    def generate(batch: int, new_tokens: int) -> float:
        ids = torch.tensor(
            [source.prompt(cfg["input_len"])[1] for _ in range(batch)], device=cfg["device"]
        )
        _sync()
        start = time.perf_counter()
        output = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        _sync()
        assert output.shape[1] == ids.shape[1] + new_tokens
        return time.perf_counter() - start

    generate(2, 8)  # warm-up: kernels, allocator
    for batch in cfg["levels"]:
        seconds = generate(batch, cfg["output_len"])
        out["levels"].append(
            {
                "concurrency": batch,
                "seconds": seconds,
                "output_throughput": batch * cfg["output_len"] / seconds,
            }
        )
        print(f"  static bs={batch}: {batch * cfg['output_len'] / seconds:.0f} tok/s", flush=True)
    return out


def phase_executor(args: argparse.Namespace, cfg: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.common import in_process_executor

    attn, graph = args.engine_config.split(":")
    transformers = {
        **engine_args(cfg, attn, graph == "graph"),
        **json.loads(args.transformers_json),
    }
    engine = {"kind": "transformers", "transformers": transformers}
    source = loadgen.PromptSource(args.model_dir, seed=2)
    out: dict[str, Any] = {"card": _card(), "engine": engine, "levels": []}
    levels = [int(c) for c in args.levels.split(",")] if args.levels else cfg["levels"]

    async def main() -> None:
        async with in_process_executor(engine, args.model_dir) as executor:
            backend = loadgen.ExecutorBackend(executor, cfg["output_len"], end_id=2)
            started = time.perf_counter()
            # Warm-up: one short wave at each level (CUDA-graph capture happens on first use of each shape).
            for concurrency in levels:
                warm = loadgen.make_jobs(source, concurrency, cfg["input_len"], 1)
                await loadgen.run_load(
                    loadgen.ExecutorBackend(executor, 8, end_id=2), warm, concurrency=concurrency
                )
            out["warmup_s"] = time.perf_counter() - started
            for concurrency in levels:
                jobs = loadgen.make_jobs(
                    source, num_requests(concurrency, args.waves), cfg["input_len"], 1
                )
                records, duration = await loadgen.run_load(backend, jobs, concurrency=concurrency)
                summary = loadgen.summarize(records, duration)
                out["levels"].append({"concurrency": concurrency, **summary})
                print(
                    loadgen.one_line(f"  executor {args.engine_config} c={concurrency}", summary),
                    flush=True,
                )

    if cfg["device"] == "cpu":
        import torch

        torch.set_num_threads(1)  # as a Ray replica with num_cpus=1 (dry runs only)
    asyncio.run(main())
    return out


def tree_commit(tree: str) -> str | None:
    """The commit a frozen tree was built from (benchmarks.trees writes it; the device has no .git)."""
    path = Path(tree) / "COMMIT"
    return path.read_text().strip() if path.exists() else None


def phase_stack(args: argparse.Namespace, cfg: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.server import merge, serve_app

    attn, graph = args.engine_config.split(":")
    num_replicas = args.replicas
    levels = cfg["stack_levels"] if num_replicas == 1 else cfg["scale_levels"]
    gpu = cfg["device"] == "cuda"
    overrides = {
        "model": {"path": args.model_dir, "served_model_name": SERVED},
        "engine": merge(
            {
                "kind": "transformers",
                "num_replicas": num_replicas,
                "num_cpus_per_replica": 1 if gpu else 0.5,
                "num_gpus_per_replica": 1 if gpu else 0,
                "max_ongoing_requests": 256,
                "transformers": engine_args(cfg, attn, graph == "graph"),
            },
            json.loads(args.engine_json),
        ),
        "router": {"num_replicas": 1, "max_ongoing_requests": 1024},
    }
    source = loadgen.PromptSource(args.model_dir, seed=3)
    out: dict[str, Any] = {
        "cards": card_names(),
        "num_replicas": num_replicas,
        "tree": args.tree,
        "tree_commit": tree_commit(args.tree),
        "engine_json": args.engine_json,
        "waves": args.waves,
        "levels": [],
    }
    started = time.perf_counter()
    env = json.loads(args.env_json)
    out["env"] = env
    with serve_app("serve_config.yaml", port=PORT, args=overrides, repo=args.tree, env=env) as app:
        out["startup_s"] = time.perf_counter() - started

        async def main() -> None:
            backend = loadgen.OpenAIBackend(
                app.base_url, SERVED, endpoint="completions", max_tokens=cfg["output_len"]
            )
            short = loadgen.OpenAIBackend(
                app.base_url, SERVED, endpoint="completions", max_tokens=8
            )
            try:
                # Warm-up: short waves at each level and twice the largest, so every replica has seen each shape.
                for concurrency in [*levels, max(levels)]:
                    warm = loadgen.make_jobs(source, concurrency, cfg["input_len"], 1)
                    await loadgen.run_load(short, warm, concurrency=concurrency)
                for concurrency in levels:
                    jobs = loadgen.make_jobs(
                        source, num_requests(concurrency, args.waves), cfg["input_len"], 1
                    )
                    records, duration = await loadgen.run_load(
                        backend, jobs, concurrency=concurrency
                    )
                    summary = loadgen.summarize(records, duration)
                    out["levels"].append({"concurrency": concurrency, **summary})
                    label = f"  stack[{Path(args.tree).name}] x{num_replicas} c={concurrency}"
                    print(loadgen.one_line(label, summary), flush=True)
            finally:
                await backend.close()
                await short.close()

        asyncio.run(main())
    return out


def peer_command(
    *,
    tree: str,
    model_dir: str,
    servers: str,
    engine_json: str,
    env_json: str,
    concurrency: str,
    min_requests: int,
    sessions: int,
    port: int,
    out: Path,
    extra: list[str] | None = None,
) -> list[str]:
    """The `benchmarks.bench_peer` command line of the GPU peer phase and of the CPU peer job."""
    return [
        sys.executable,
        "-m",
        "benchmarks.bench_peer",
        "--tree",
        tree,
        "--model-dir",
        model_dir,
        "--peer-python",
        os.environ.get("PEER_PYTHON", sys.executable),
        "--servers",
        servers,
        "--shepherd-engine",
        engine_json,
        "--shepherd-env",
        env_json,
        "--concurrency",
        concurrency,
        "--min-requests",
        str(min_requests),
        "--sessions",
        str(sessions),
        "--port",
        str(port),
        "--out",
        str(out),
        *(extra or []),
    ]


def phase_peer(args: argparse.Namespace, cfg: dict[str, Any]) -> dict[str, Any]:
    """Item 5 on the GPU: our stack and `transformers serve --continuous-batching` on the 1B-shaped model, one
    after the other on GPU 0, with the same dtype, attention, KV-cache and CUDA-graph settings."""
    out_file = Path(args.work) / "gpu-peer.json"
    gpu = cfg["device"] == "cuda"
    engine = {"max_ongoing_requests": 64, **json.loads(args.engine_json)}
    command = peer_command(
        tree=args.tree,
        model_dir=args.model_dir,
        servers="shepherd,tf-serve",
        engine_json=json.dumps(engine),
        env_json=args.env_json,
        concurrency=args.peer_concurrency or ("1,16,64" if gpu else "1,4"),
        min_requests=8 if gpu else 4,
        sessions=args.peer_sessions if args.peer_sessions is not None else (16 if gpu else 2),
        port=8131,
        out=out_file,
        extra=[
            "--device",
            cfg["device"],
            "--dtype",
            cfg["dtype"],
            *(["--cuda-graph"] if gpu else []),
            "--max-batch-tokens",
            "2048" if gpu else "512",
            "--rounds",
            str(args.peer_rounds),
            "--ttft-requests",
            str(args.peer_ttft_requests),
        ],
    )
    proc = subprocess.run(command, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if not line.startswith(("(", "[")):
            print(f"  {line}", flush=True)
    result: dict[str, Any] = {"cards": card_names(), "returncode": proc.returncode}
    if out_file.exists():
        result.update(json.loads(out_file.read_text()))
    if proc.returncode != 0:
        result["stderr_tail"] = proc.stderr[-2000:]
    return result


def _card() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


PHASES = {
    "setup": phase_setup,
    "static": phase_static,
    "executor": phase_executor,
    "stack": phase_stack,
    "peer": phase_peer,
}


# ---- the driver ------------------------------------------------------------------------------------------
def run_phase(
    name: str,
    extra: list[str],
    args: argparse.Namespace,
    timeout_s: float,
    env: dict[str, str],
    cpus: set[int] | None = None,
) -> Any:
    """Runs one phase in a child process; returns its JSON, or {"error": ...} (the run goes on)."""
    result_path = (
        Path(args.work) / f"phase-{name.replace(':', '-')}-{len(os.listdir(args.work))}.json"
    )
    command = [
        sys.executable,
        "-m",
        "benchmarks.bench_gpu",
        "--phase",
        name.split(":")[0],
        "--result",
        str(result_path),
        "--work",
        args.work,
        *(["--dry-run"] if args.dry_run else []),
        *extra,
    ]
    started = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] phase {name} (limit {timeout_s:.0f}s)", flush=True)
    try:
        proc = subprocess.run(
            command,
            env={**os.environ, **env},
            timeout=timeout_s,
            capture_output=True,
            text=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(
            "\n".join(line for line in proc.stdout.splitlines() if line.startswith("  ")),
            flush=True,
        )
        if proc.returncode != 0 or not result_path.exists():
            print(tail, flush=True)
            return {"error": f"exit {proc.returncode}", "log_tail": tail[-1500:]}
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f}s"}
    finally:
        print(
            f"[{time.strftime('%H:%M:%S')}] phase {name}: {time.perf_counter() - started:.0f}s",
            flush=True,
        )
    return json.loads(result_path.read_text())


def best_tok_s(levels: list[dict[str, Any]], concurrency: int) -> float | None:
    return next(
        (lvl["output_throughput"] for lvl in levels if lvl["concurrency"] == concurrency), None
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--work", default="/tmp/bench-gpu")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--budget-s", type=float, default=420)
    parser.add_argument(
        "--variant", action="append", default=[], help="NAME=TREE: a code tree for the GPU stack"
    )
    parser.add_argument(
        "--cpu-tree", action="append", default=[], help="NAME=TREE: trees of the CPU jobs"
    )
    parser.add_argument(
        "--skip", default="", help="comma-separated: static,executor,stack1,stack2,peer,cpu"
    )
    parser.add_argument("--phase")
    parser.add_argument("--result")
    parser.add_argument("--model-dir")
    parser.add_argument("--engine-config", default="sdpa:nograph")
    parser.add_argument(
        "--stack-engine-config", default="sdpa:graph", help="when executor phases are skipped"
    )
    parser.add_argument(
        "--variant-engine", action="append", default=[], help="NAME=JSON engine args (GPU stack)"
    )
    parser.add_argument("--engine-json", default="{}")
    parser.add_argument(
        "--executor-variant",
        action="append",
        default=[],
        help='NAME=JSON transformers args of one more in-process run, e.g. greedy={"sampling": "greedy"}',
    )
    parser.add_argument(
        "--transformers-json", default="{}", help="(executor phase) from --executor-variant"
    )
    parser.add_argument("--env-json", default="{}", help="environment of the stack's `serve run`")
    parser.add_argument(
        "--variant-env", action="append", default=[], help="NAME=JSON serve-run env (GPU stack)"
    )
    parser.add_argument(
        "--cpu-tree-engine", action="append", default=[], help="NAME=JSON engine args (CPU jobs)"
    )
    parser.add_argument("--cpu-items-a", default="ttft,ceiling")
    parser.add_argument("--cpu-items-b", default="throughput,peer")
    parser.add_argument("--ceiling-levels", default="128,256")
    parser.add_argument("--peer-servers", default="shepherd,tf-serve,tf-serve-default-threads")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument(
        "--executor-configs", default="", help="e.g. sdpa:graph (default: every config)"
    )
    parser.add_argument("--waves", type=int, default=1, help="requests per level = waves x c")
    parser.add_argument("--peer-rounds", type=int, default=1)
    parser.add_argument(
        "--peer-ttft-requests", type=int, default=0, help="peer phase: a TTFT-only load at c=1"
    )
    parser.add_argument(
        "--bracket",
        action="store_true",
        help="run the executor in-process again (top stack level only) after each stack variant",
    )
    parser.add_argument(
        "--levels", help="(the executor phase's own) concurrency levels; default: all"
    )
    parser.add_argument("--peer-concurrency", help="peer phase: closed-loop levels (1,16,64)")
    parser.add_argument("--peer-sessions", type=int, help="peer phase: multi-turn sessions (16)")
    parser.add_argument(
        "--cpu-tree-env", action="append", default=[], help="NAME=JSON serve-run env (CPU jobs)"
    )
    parser.add_argument("--tree", default=".")
    args = parser.parse_args()
    args.cpu_tree_engine = dict(item.split("=", 1) for item in args.cpu_tree_engine)
    args.cpu_tree_env = dict(item.split("=", 1) for item in args.cpu_tree_env)
    args.variant_engine = dict(item.split("=", 1) for item in args.variant_engine)
    args.variant_env = dict(item.split("=", 1) for item in args.variant_env)
    executor_variants = dict(item.split("=", 1) for item in args.executor_variant)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SHEPHERD_CACHE_DIR", str(Path(args.work) / "cache"))
    cfg = settings(args.dry_run)
    if args.phase:
        if args.tree != ".":
            sys.path.insert(0, str(Path(args.tree).resolve()))
        result = PHASES[args.phase](args, cfg)
        Path(args.result).write_text(json.dumps(result, default=str))
        return

    deadline = time.monotonic() + args.budget_s
    variants = {k: str(Path(v).resolve()) for k, v in (v.split("=", 1) for v in args.variant)}
    variants = variants or {"base": str(Path(".").resolve())}
    cpu_trees = {
        k: str(Path(v).resolve()) for k, v in (v.split("=", 1) for v in args.cpu_tree)
    } or variants
    first_tree = next(iter(variants.values()))
    skip = set(args.skip.split(","))
    report: dict[str, Any] = {
        "machine": loadgen.machine_info(),
        "settings": cfg,
        "variants": variants,
    }
    out_path = Path(args.out) / ("gpu-dry.json" if args.dry_run else "gpu.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out_path.write_text(json.dumps(report, indent=1, default=str))

    def left() -> float:
        return deadline - time.monotonic()

    groups = physical_core_groups()
    pin = not args.dry_run and len(groups) >= 8
    # The CPU jobs take one CPU of each of the first four physical cores; the GPU phases get the other cores.
    gpu_cores = {cpu for group in groups[4:] for cpu in group} if pin else None
    report["cpu_topology"] = groups
    gpu0 = {"CUDA_VISIBLE_DEVICES": "0"} if not args.dry_run else {}
    report["setup"] = run_phase(
        "setup", ["--tree", first_tree], args, min(240, left()), gpu0, gpu_cores
    )
    save()
    model_dir = report["setup"].get("model_dir")
    if model_dir is None:
        raise SystemExit("setup failed")
    jobs = []
    if "cpu" not in skip:
        jobs, _ = start_cpu_jobs(args, cpu_trees, report["setup"]["tiny_model_dir"], pin, left)
    base = ["--model-dir", model_dir, "--tree", first_tree]
    if "static" not in skip:
        report["static"] = run_phase("static", base, args, min(150, left()), gpu0, gpu_cores)
        save()
    best: tuple[float, str] = (0.0, args.stack_engine_config)
    for attn, graph in cfg["engine_configs"]:
        name = f"{attn}:{'graph' if graph else 'nograph'}"
        if args.executor_configs and name not in args.executor_configs.split(","):
            continue
        if "executor" in skip or left() < 60:
            report[f"executor[{name}]"] = {"skipped": f"{left():.0f}s left"}
            continue
        for variant, transformers_json in [("", "{}"), *executor_variants.items()]:
            if left() < 60:
                break
            key = f"executor[{name}{'+' + variant if variant else ''}]"
            extra = [*base, "--engine-config", name, "--waves", str(args.waves)]
            extra += ["--transformers-json", transformers_json]
            result = run_phase(
                f"executor:{key}", extra, args, min(200, left() - 30), gpu0, gpu_cores
            )
            report[key] = result
            if not variant:  # the stack phases run the default executor settings' best config
                tok_s = best_tok_s(result.get("levels", []), max(cfg["levels"])) or 0.0
                best = max(best, (tok_s, name))
            save()
    report["stack_engine_config"] = best[1]

    def variant_args(variant: str, tree: str) -> list[str]:
        """The model, code tree, engine args and `serve run` environment of one variant's phases."""
        return [
            *("--model-dir", model_dir, "--tree", tree),
            *("--engine-json", args.variant_engine.get(variant, "{}")),
            *("--env-json", args.variant_env.get(variant, "{}")),
        ]

    top = max(cfg["stack_levels"])

    def bracket(label: str) -> float | None:
        """The executor in-process at the top level only, in a fresh process: the same run every time."""
        key = f"executor[{best[1]}]@{label}"
        extra = [*base, "--engine-config", best[1], "--waves", str(args.waves)]
        extra += ["--transformers-json", "{}", "--levels", str(top)]
        report[key] = run_phase(
            f"executor:{key}", extra, args, min(120, left() - 30), gpu0, gpu_cores
        )
        save()
        return best_tok_s(report[key].get("levels", []), top)

    # The in-process figure drifts by up to 8 % between leases (R5.2): with --bracket, it is measured again
    # after every stack run, so each stack figure has one run just before and one just after it.
    before = bracket("start") if args.bracket and left() > 150 else None
    for variant, tree in variants.items():
        if "stack1" in skip or left() < 60:
            report[f"stack1[{variant}]"] = {"skipped": f"{left():.0f}s left"}
            continue
        extra = [
            *variant_args(variant, tree),
            *("--engine-config", best[1], "--replicas", "1", "--waves", str(args.waves)),
        ]
        report[f"stack1[{variant}]"] = run_phase(
            "stack", extra, args, min(180, left() - 20), {}, gpu_cores
        )
        save()
        if args.bracket and left() > 90:
            after = bracket(variant)
            stack = best_tok_s(report[f"stack1[{variant}]"].get("levels", []), top)
            if before and after and stack:
                report[f"bracketed_ratio[{variant}]"] = ratio = stack / ((before + after) / 2)
                print(
                    f"  stack[{variant}] / in-process around it, c={top}: {ratio:.3f}", flush=True
                )
            before = after
    if "stack2" not in skip and left() > 70:
        last_variant, last_tree = list(variants.items())[-1]
        extra = [
            *variant_args(last_variant, last_tree),
            *("--engine-config", best[1], "--replicas", "2", "--waves", str(args.waves)),
        ]
        report["stack2"] = run_phase("stack", extra, args, min(200, left() - 10), {}, gpu_cores)
        save()
    if "peer" not in skip and left() > 90:
        last_variant, last_tree = list(variants.items())[-1]
        extra = [
            *variant_args(last_variant, last_tree),
            *("--peer-rounds", str(args.peer_rounds)),
            *("--peer-ttft-requests", str(args.peer_ttft_requests)),
            *(("--peer-concurrency", args.peer_concurrency) if args.peer_concurrency else ()),
            *(
                ("--peer-sessions", str(args.peer_sessions))
                if args.peer_sessions is not None
                else ()
            ),
        ]
        report["peer"] = run_phase("peer", extra, args, left() - 10, gpu0, gpu_cores)
        save()
    for name, thread, results in jobs:
        thread.join(timeout=max(10.0, left() + 60))
        report[f"cpu_job[{name}]"] = results
        save()
    save()
    print_table(report, cfg)
    print_cpu_jobs(report)


def physical_core_groups() -> list[list[int]]:
    """CPUs grouped by physical core (SMT siblings together), from sysfs; one group per CPU if unknown."""
    groups: dict[tuple[str, str], list[int]] = {}
    for cpu in sorted(os.sched_getaffinity(0)):
        base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            key = (
                (base / "physical_package_id").read_text().strip(),
                (base / "core_id").read_text().strip(),
            )
        except OSError:
            key = ("cpu", str(cpu))
        groups.setdefault(key, []).append(cpu)
    return list(groups.values())


def start_cpu_jobs(
    args: argparse.Namespace, trees: dict[str, str], tiny_model_dir: str, pin: bool, left: Any
) -> tuple[list[tuple[str, threading.Thread, dict[str, Any]]], set[int]]:
    """Two threads, each running its commands in turn on two CPUs of two different physical cores (every
    process a command starts, Ray and the replicas included, inherits the affinity). Returns the threads and
    the CPUs left for the GPU phases (the pinned cores' SMT siblings excluded)."""
    names = list(trees)
    first_last = {n: trees[n] for n in dict.fromkeys((names[0], names[-1]))}

    def tree_args(selected: dict[str, str]) -> list[str]:
        out = [a for n, t in selected.items() for a in ("--tree", f"{n}={t}")]
        out += [
            a
            for n, e in args.cpu_tree_engine.items()
            if n in selected
            for a in ("--tree-engine", f"{n}={e}")
        ]
        out += [
            a
            for n, e in args.cpu_tree_env.items()
            if n in selected
            for a in ("--tree-env", f"{n}={e}")
        ]
        return out

    small = args.dry_run
    work = Path(args.work)
    overhead = [sys.executable, "-m", "benchmarks.bench_overhead"]
    commands = {
        "ttft": [
            *overhead,
            "--items",
            "ttft",
            "--engines",
            "emulator",
            *tree_args(first_last),
            "--ttft-requests",
            "20" if small else "60",
            "--port",
            "8101",
            "--out",
            str(work / "cpu-ttft.json"),
        ],
        "ceiling": [
            *overhead,
            "--items",
            "ceiling",
            *tree_args(trees),
            "--ceiling-levels",
            "32,64" if small else args.ceiling_levels,
            "--ceiling-waves",
            "2",
            "--profile",
            "--port",
            "8103",
            "--out",
            str(work / "cpu-ceiling.json"),
        ],
        "throughput": [
            *overhead,
            "--items",
            "throughput",
            *tree_args(first_last),
            "--throughput-requests",
            "16" if small else "128",
            "--port",
            "8102",
            "--out",
            str(work / "cpu-throughput.json"),
        ],
        "peer": peer_command(
            tree=trees[names[-1]],
            model_dir=tiny_model_dir,
            servers=args.peer_servers,
            engine_json=args.cpu_tree_engine.get(names[-1], "{}"),
            env_json=args.cpu_tree_env.get(names[-1], "{}"),
            concurrency="1,4" if small else "1,16",
            min_requests=4 if small else 16,
            sessions=2 if small else 8,
            port=8121,
            out=work / "cpu-peer.json",
        ),
    }
    groups = physical_core_groups()
    pinned = (
        [{groups[0][0], groups[1][0]}, {groups[2][0], groups[3][0]}]
        if pin and len(groups) >= 8
        else [None, None]
    )
    taken = {cpu for group in groups[:4] for cpu in group} if pinned[0] else set()
    started = []
    for name, items, cores in (
        ("job-a", args.cpu_items_a, pinned[0]),
        ("job-b", args.cpu_items_b, pinned[1]),
    ):
        selected = [commands[item] for item in items.split(",") if item]
        if not selected:
            continue
        results: dict[str, Any] = {"cores": sorted(cores) if cores else "unpinned", "commands": []}
        thread = threading.Thread(
            target=_run_commands, args=(selected, cores, results, left), daemon=True
        )
        thread.start()
        started.append((name, thread, results))
    rest = {cpu for group in groups for cpu in group} - taken
    return started, rest


def _run_commands(
    commands: list[list[str]], cores: set[int] | None, results: dict[str, Any], left: Any
) -> None:
    for command in commands:
        out_file = Path(command[command.index("--out") + 1])
        entry: dict[str, Any] = {"command": " ".join(command[1:])}
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=max(30.0, left() + 45),
                env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
            )
            entry["returncode"] = proc.returncode
            entry["stdout_tail"] = "\n".join(
                line for line in proc.stdout.splitlines() if not line.startswith(("(", "["))
            )[-6000:]
            if proc.returncode != 0:
                entry["stderr_tail"] = proc.stderr[-2000:]
        except subprocess.TimeoutExpired:
            entry["error"] = "timed out"
        entry["seconds"] = time.perf_counter() - started
        if out_file.exists():
            entry["result"] = json.loads(out_file.read_text())
        results["commands"].append(entry)
        print(
            f"[cpu job {cores}] {command[2]} done in {entry['seconds']:.0f}s rc={entry.get('returncode')}",
            flush=True,
        )


def print_table(report: dict[str, Any], cfg: dict[str, Any]) -> None:
    setup = report.get("setup", {})
    bandwidth = setup.get("copy_bandwidth_gbs")
    weight_bytes = setup.get("weight_bytes") or 0
    steps_floor = bandwidth * 1e9 / weight_bytes if bandwidth and weight_bytes else None
    print(
        f"\ncards: {setup.get('cards')}  copy bandwidth {bandwidth} GB/s  weights {weight_bytes / 1e9:.2f} GB"
    )
    print(
        f"weight-read floor: {steps_floor and round(steps_floor)} steps/s; in {cfg['input_len']} / out "
        f"{cfg['output_len']} tokens, greedy"
    )
    rows = [("static generate", report.get("static", {}))]
    rows += [(k, v) for k, v in report.items() if k.startswith(("executor[", "stack1[", "stack2"))]
    print(
        f"{'series':<26}"
        + "".join(f"{'c=' + str(c):>12}" for c in [1, 4, 16, 64, 128])
        + "   (output tok/s)"
    )
    for name, value in rows:
        levels = value.get("levels", []) if isinstance(value, dict) else []
        cells = [best_tok_s(levels, c) for c in [1, 4, 16, 64, 128]]
        note = value.get("error") or value.get("skipped") or "" if isinstance(value, dict) else ""
        print(
            f"{name:<26}"
            + "".join(f"{c:>12.0f}" if c else f"{'-':>12}" for c in cells)
            + f"   {note}"
        )
    if steps_floor:
        print(
            f"{'floor (bandwidth)':<26}"
            + "".join(f"{steps_floor * c:>12.0f}" for c in [1, 4, 16, 64, 128])
        )


def print_cpu_jobs(report: dict[str, Any]) -> None:
    """The headline numbers of the pinned 2-core jobs (full data in gpu.json)."""
    for key, job in report.items():
        if not key.startswith("cpu_job["):
            continue
        print(f"\n{key} cores {job.get('cores')}:")
        for command in job.get("commands", []):
            result = command.get("result") or {}
            status = command.get("error") or f"rc={command.get('returncode')}"
            print(f"  {command['command'][:60]}... {status} {command.get('seconds', 0):.0f}s")
            for name, entry in result.items():
                if name.startswith("ttft_c1_"):
                    for k, v in entry.items():
                        if k.startswith("added["):
                            print(
                                f"    {name} {k}: TTFT +{v['ttft_p50_ms']:.2f} ms p50, +{v['ttft_p99_ms']:.2f} ms p99,"
                                f" GET /v1/models {v['get_models_p50_ms']:.2f} ms"
                            )
                elif name == "throughput_c64_transformers":
                    for k, v in entry.items():
                        if k.startswith("ratio["):
                            print(f"    c=64 stack/in-process {k}: {v:.3f}")
                elif name == "ceiling_emulator":
                    for k, v in entry.items():
                        if k.startswith("stack["):
                            cells = ", ".join(
                                f"c={r['concurrency']}: {r['output_throughput']:.0f}" for r in v
                            )
                            print(f"    ceiling {k}: {cells} tok/s")
            for line in result.get("ratios", []):
                print(f"    {line}")


if __name__ == "__main__":
    main()
