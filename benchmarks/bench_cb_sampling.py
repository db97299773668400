"""What transformers' continuous batching pays for per-request sampling, in-process, with no serving layer.

Our executor (`deployments/executors/hf.py`) builds its manager with per-request logits processors
(temperature, top-k, top-p per request, as the OpenAI API needs) and logprobs, and sends greedy requests as
top_k=1 sampling. `transformers serve` decodes with the model's default generation config. Four managers on
the same model and the same prompts, alternated over `--rounds`:

  ours             do_sample + per-request processors + logprobs; requests greedy as top_k=1 (what we run)
  no-logprobs      the same without logprobs
  greedy+logprobs  argmax, no processors, logprobs
  plain            argmax, no processors, no logprobs

    python -m benchmarks.bench_cb_sampling --model-dir /tmp/shepcache/bench-tiny-noeos
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

from benchmarks import loadgen
from benchmarks.common import RESULTS

MODES = ("ours", "no-logprobs", "greedy+logprobs", "plain")


def manager_settings(mode: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(generation config, CB config, per-request kwargs) of one mode."""
    sampled = mode in ("ours", "no-logprobs")
    generation: dict[str, Any] = {"max_new_tokens": 16, "eos_token_id": -1, "pad_token_id": 0}
    if sampled:
        # The same base as the executor's: per-request values override these.
        generation.update(do_sample=True, temperature=0.7, top_k=50, top_p=0.9)
    else:
        generation["do_sample"] = False
    cb = {
        "per_request_processors": sampled,
        "return_logprobs": mode in ("ours", "greedy+logprobs"),
    }
    per_request = {"temperature": 1.0, "top_k": 1, "top_p": 1.0} if sampled else {}
    return generation, cb, per_request


def tokens_per_s(
    model: Any, mode: str, prompts: list[list[int]], concurrency: int, num_tokens: int, args: Any
) -> float:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    generation, cb, per_request = manager_settings(mode)
    manager = model.init_continuous_batching(
        generation_config=GenerationConfig(**generation),
        continuous_batching_config=ContinuousBatchingConfig(
            num_blocks=512,
            max_batch_tokens=args.max_batch_tokens,
            page_size=64,
            max_requests_per_batch=64,
            use_cuda_graph=args.cuda_graph,
            **cb,
        ),
    )
    manager.start()
    try:
        started = time.perf_counter()
        for index, prompt in enumerate(prompts[:concurrency]):
            manager.add_request(
                prompt,
                request_id=f"{mode}-{concurrency}-{index}",
                max_new_tokens=num_tokens,
                **per_request,
            )
        finished = 0
        while finished < concurrency:
            result = manager.get_result(timeout=60)
            if result is None:
                raise RuntimeError(f"{mode}: no result within 60 s")
            finished += result.is_finished()
        return concurrency * num_tokens / (time.perf_counter() - started)
    finally:
        manager.stop(block=True, timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cuda-graph", action="store_true")
    parser.add_argument("--max-batch-tokens", type=int, default=512)
    parser.add_argument("--levels", default="1,64")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "cb-sampling.json"))
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    if args.device == "cpu":
        torch.set_num_threads(1)  # as a Ray replica with num_cpus=1
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=getattr(torch, args.dtype), attn_implementation="sdpa"
    )
    model = model.to(args.device).eval()
    rng = random.Random(0)
    vocab = int(model.config.vocab_size)
    levels = [int(c) for c in args.levels.split(",")]
    prompts = [[rng.randrange(10, vocab) for _ in range(128)] for _ in range(max(levels))]
    runs = []
    for round_index in range(args.rounds):
        for mode in MODES:
            for concurrency in levels:
                rate = tokens_per_s(model, mode, prompts, concurrency, args.output_len, args)
                runs.append(
                    {"round": round_index, "mode": mode, "concurrency": concurrency, "tok_s": rate}
                )
                print(f"r{round_index} {mode:<16} c={concurrency:<3} {rate:8.0f} tok/s", flush=True)
    summary = {
        f"{mode} c={c}": sorted(
            r["tok_s"] for r in runs if r["mode"] == mode and r["concurrency"] == c
        )
        for mode in MODES
        for c in levels
    }
    report = {
        "machine": loadgen.machine_info(),
        "args": vars(args),
        "runs": runs,
        "summary": summary,
    }
    loadgen.write_json(args.out, report)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
