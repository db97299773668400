"""Fast prefix hits in the transformers engine, in one GPU run: the engine alone, the same load through
`serve run`, and four replicas sharing one GPU routed by session affinity or by power of two.

    python3 -m benchmarks.bench_prefix --out $OUT             # one H200, about 7 minutes
    python3 -m benchmarks.bench_prefix --out /tmp/bp --dry-run  # the CPU, tiny sizes (under the Ray lock)

--out receives only bench_prefix.json (rewritten after every phase), the PNG and the tails of failed apps'
logs; the model (2.5 GB in bf16), caches and the apps' folders go to --work (default: a new temporary folder).

(a) In process (no Ray, no HTTP): a random model of Llama-3.2-1B's shape (`benchmarks/models.py`, bf16),
    8 sessions at once, each a 4,000-token history then turns of 200 new tokens and 32 output tokens. TTFT
    of a turn that hits its cached prefix against a fresh prompt of the same length that misses, for each
    engine variant (CUDA graphs, the chunked-prefill budget `max_batch_tokens`, the scheduler, the attention
    kernel where one is installed), with a per-step breakdown from timers around the continuous-batching
    loop's own methods and CUDA events on its compute stream: scheduler, batch preparation, GPU time of the
    forward step, output update, and the Python time left over. The best variant (lowest hit TTFT p50)
    goes on.
(b) The same sessions through `serve run` (1 Engine replica, 1 Router, server-side sessions over HTTP):
    TTFT p50 of hit turns, stack over in-process (the goal is within 10 %).
(c) 4 Engine replicas sharing the GPU (`num_gpus_per_replica: 0.25`, `num_blocks: auto`), 32 sessions of
    8 turns with 1-4k-token system prompts and 200-500 new tokens a turn, once with session affinity and
    once with power of two: TTFT at turns >= 3, prefix hit rate and `usage.prompt_tokens_details.cached_tokens`.
(d) A PNG of TTFT per turn for each policy in --out, with every number in bench_prefix.json.

Every phase stops at the time budget and says what it skipped or what failed; the table is printed last.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import importlib.util
import json
import math
import random
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.loadgen import PromptSource, machine_info, write_json
from benchmarks.models import TINY_SHAPE, llama_1b_shaped
from benchmarks.plots import plot_turns
from cluster.local import port_is_free, serve_app
from deployments.executors.hf_attention import has_varlen_kernel

MODEL_NAME = "bench-1b"
PORT = 8321


@dataclass(frozen=True)
class Sizes:
    """One run's sizes: the GPU run's defaults, or a dry run's tiny ones."""

    is_gpu: bool = True
    shape: dict[str, Any] | None = None  # None: Llama-3.2-1B's
    dtype: str = "bfloat16"
    page_size: int = 64
    num_blocks: int = 4096  # (a), (b): 262k tokens, 8 GiB for the 1B shape in bf16
    # (a), (b)
    num_sessions: int = 8
    history_tokens: int = 4000
    new_tokens: int = 200
    output_tokens: int = 32
    num_hit_turns: int = 4
    num_miss_turns: int = 2
    # (c)
    shared_replicas: int = 4
    shared_sessions: int = 32
    shared_turns: int = 8
    system_tokens: tuple[int, int] = (1000, 4000)
    turn_tokens: tuple[int, int] = (200, 500)
    stagger_s: float = 0.05  # between session starts
    num_cpus: int | None = None  # logical CPUs of the local Ray (None: the machine's)


GPU_SIZES = Sizes()
DRY_SIZES = Sizes(
    is_gpu=False,
    shape=TINY_SHAPE,
    dtype="float32",
    page_size=16,
    num_blocks=512,
    num_sessions=2,
    history_tokens=96,
    new_tokens=12,
    output_tokens=4,
    num_hit_turns=2,
    num_miss_turns=1,
    shared_sessions=4,
    shared_turns=3,
    system_tokens=(40, 80),
    turn_tokens=(8, 16),
    stagger_s=0.0,
    num_cpus=8,
)


def engine_variants(sizes: Sizes) -> list[tuple[str, dict[str, Any]]]:
    """(name, engine.transformers settings) tried in process; the first is today's default engine."""
    base: dict[str, Any] = {
        "dtype": sizes.dtype,
        "attn_implementation": "sdpa",
        "page_size": sizes.page_size,
        "num_blocks": sizes.num_blocks,
        "max_batch_tokens": 512,
        "scheduler": "fifo",
        "use_cuda_graph": False,
    }
    if not sizes.is_gpu:  # graphs and kernels do not exist on the CPU: the schedulers only
        return [("default", base), ("prefill_first", {**base, "scheduler": "prefill_first"})]
    graphs = {**base, "use_cuda_graph": True}
    variants = [
        ("default (no graphs, 512)", base),
        ("graphs, 512", graphs),
        ("graphs, 2048", {**graphs, "max_batch_tokens": 2048}),
        (
            "graphs, 2048, prefill_first",
            {**graphs, "max_batch_tokens": 2048, "scheduler": "prefill_first"},
        ),
        ("no graphs, 2048", {**base, "max_batch_tokens": 2048}),
    ]
    if has_varlen_kernel():
        varlen = {**graphs, "max_batch_tokens": 2048, "attn_implementation": "varlen"}
        variants += [
            ("varlen, graphs, 2048, prefill_first", {**varlen, "scheduler": "prefill_first"}),
            ("varlen, graphs, 2048", varlen),
            ("varlen, no graphs, 2048", {**varlen, "use_cuda_graph": False}),
        ]
    if importlib.util.find_spec("flash_attn") is not None:
        variants.append(
            (
                "flash_attention_2, graphs, 2048",
                {**graphs, "max_batch_tokens": 2048, "attn_implementation": "flash_attention_2"},
            )
        )
    return variants


def _prompts(tokenizer_dir: Path, seed: int) -> PromptSource:
    """Prompts whose text tokenizes back to the ids drawn, so that (a) in process and (b), (c) through the
    server's chat template prefill the same number of tokens (random ids' text re-tokenizes ~1.5x longer)."""
    return PromptSource(str(tokenizer_dir), seed, is_round_trip=True)


# ---- what one request measured ------------------------------------------------------------------------
@dataclass(slots=True)
class Sample:
    kind: str  # "first" (a session's first turn), "hit", "miss"
    turn: int
    ttft_s: float
    latency_s: float
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    token_ids: list[int] = field(default_factory=list, repr=False)

    @property
    def itl_s(self) -> float:
        if self.num_output_tokens < 2:
            return math.nan
        return (self.latency_s - self.ttft_s) / (self.num_output_tokens - 1)


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms_summary(values: Sequence[float]) -> dict[str, float]:
    clean = [1000 * v for v in values if not math.isnan(v)]
    if not clean:
        return {"p50": math.nan, "p90": math.nan, "mean": math.nan, "count": 0}
    return {
        "p50": statistics.median(clean),
        "p90": pct(clean, 0.9),
        "mean": statistics.fmean(clean),
        "count": len(clean),
    }


# ---- (a) the engine in process, with a per-step breakdown ----------------------------------------------
class StepProbe:
    """Timers around one continuous-batching loop's own methods (the objects' attributes, not their source):
    `scheduler.schedule_batch`, `prepare_next_batch` (which calls it), `_generation_step` (the forward pass,
    timed on the GPU with CUDA events on the processor's compute stream) and `update_batch` (waits for the
    GPU, updates requests, hands outputs to the event loop)."""

    def __init__(self, processor: Any) -> None:
        import torch

        self._torch = torch
        self._is_cuda = torch.cuda.is_available()
        self._stream = getattr(processor.inputs_and_outputs, "compute_stream", None)
        self.steps: list[dict[str, Any]] = []
        self._current: dict[str, Any] = {}
        self._wrap(processor.scheduler, "schedule_batch", self._on_schedule)
        self._wrap(processor, "prepare_next_batch", self._on_prepare)
        self._wrap(processor, "_generation_step", self._on_forward)
        self._wrap(processor, "update_batch", self._on_update)

    def _wrap(self, owner: Any, name: str, after: Callable[[float, float, Any], None]) -> None:
        original = getattr(owner, name)
        is_forward = name == "_generation_step" and self._is_cuda

        def timed(*args: Any, **kwargs: Any) -> Any:
            before = time.perf_counter()
            if is_forward:
                start, end = (self._torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record(self._stream)
            result = original(*args, **kwargs)
            if is_forward:
                end.record(self._stream)
                self._current["events"] = (start, end)
            after(before, time.perf_counter(), result)
            return result

        setattr(owner, name, timed)

    def _on_schedule(self, before: float, after: float, result: Any) -> None:
        requests, _, num_q_tokens, _ = result
        self._current["schedule_s"] = self._current.get("schedule_s", 0.0) + after - before
        if requests:
            self._current["num_requests"] = len(requests)
            self._current["num_q_tokens"] = int(num_q_tokens)

    def _on_prepare(self, before: float, after: float, result: Any) -> None:
        if not result:  # nothing to run: the loop waits for requests
            self._current = {}
            return
        self._current["prepare_s"] = after - before

    def _on_forward(self, before: float, after: float, result: Any) -> None:
        self._current["forward_cpu_s"] = after - before

    def _on_update(self, before: float, after: float, result: Any) -> None:
        step, self._current = self._current, {}
        if "prepare_s" not in step:
            return
        step["update_s"] = after - before
        self.steps.append(step)

    def reset(self) -> None:
        self.steps = []

    def summary(self) -> dict[str, dict[str, float]]:
        """Mean milliseconds per step, for steps that prefill (some prompt tokens) and decode-only steps."""
        if self._is_cuda:
            self._torch.cuda.synchronize()
        rows: dict[str, list[dict[str, float]]] = {"prefill": [], "decode": []}
        for step in self.steps:
            num_requests = step.get("num_requests", 0)
            events = step.get("events")
            # On the CPU the forward pass runs while it is launched.
            gpu_ms = events[0].elapsed_time(events[1]) if events else 1000 * step["forward_cpu_s"]
            schedule = step.get("schedule_s", 0.0)
            wall = step["prepare_s"] + step["forward_cpu_s"] + step["update_s"]
            kind = "prefill" if step.get("num_q_tokens", 0) > num_requests else "decode"
            rows[kind].append(
                {
                    "scheduler": 1000 * schedule,
                    "prepare": 1000 * (step["prepare_s"] - schedule),
                    "forward_launch": 1000 * step["forward_cpu_s"],
                    "update": 1000 * step["update_s"],
                    "gpu": gpu_ms,
                    "wall": 1000 * wall,
                    "python": max(0.0, 1000 * wall - gpu_ms),
                    "tokens": step.get("num_q_tokens", 0),
                    "requests": num_requests,
                }
            )
        return {
            kind: {
                "count": len(steps),
                **{key: statistics.fmean(s[key] for s in steps) for key in steps[0]},
            }
            for kind, steps in rows.items()
            if steps
        }


async def _generate(executor: Any, request_id: str, prompt: list[int], sizes: Sizes) -> Sample:
    from deployments.messages import GenerateRequest, SamplingParams

    request = GenerateRequest(
        request_id=request_id,
        prompt_token_ids=prompt,
        max_tokens=sizes.output_tokens,
        sampling=SamplingParams(temperature=0.0),
    )
    started = time.perf_counter()
    ttft = math.nan
    cached = 0
    token_ids: list[int] = []
    async for delta in executor.generate(request):
        if delta.token_ids and math.isnan(ttft):
            ttft = time.perf_counter() - started
        cached = cached or delta.num_cached_tokens
        token_ids += delta.token_ids
    return Sample(
        kind="",
        turn=0,
        ttft_s=ttft,
        latency_s=time.perf_counter() - started,
        num_prompt_tokens=len(prompt),
        num_cached_tokens=cached,
        num_output_tokens=len(token_ids),
        token_ids=token_ids,
    )


async def _in_process_sessions(
    executor: Any, source: PromptSource, sizes: Sizes, label: str, num_hit_turns: int
) -> tuple[list[Sample], list[list[int]]]:
    """Every session at once: its history, then `num_hit_turns` turns that continue it exactly."""

    async def session(index: int) -> tuple[list[Sample], list[int]]:
        prompt = source.prompt(sizes.history_tokens)[1] or []
        samples = []
        for turn in range(1 + num_hit_turns):
            sample = await _generate(executor, f"{label}-{index}-{turn}", prompt, sizes)
            sample.kind, sample.turn = ("first" if turn == 0 else "hit"), turn
            samples.append(sample)
            prompt = prompt + sample.token_ids + (source.prompt(sizes.new_tokens)[1] or [])
        return samples, prompt

    done = await asyncio.gather(*(session(i) for i in range(sizes.num_sessions)))
    return [s for samples, _ in done for s in samples], [prompt for _, prompt in done]


async def _in_process_misses(
    executor: Any, source: PromptSource, sizes: Sizes, lengths: list[int]
) -> list[Sample]:
    """Fresh prompts as long as the hit turns' prompts, the same number at once."""

    async def session(index: int) -> list[Sample]:
        samples = []
        for turn in range(sizes.num_miss_turns):
            length = lengths[(index + turn * sizes.num_sessions) % len(lengths)]
            prompt = source.prompt(length)[1] or []
            sample = await _generate(executor, f"miss-{index}-{turn}", prompt, sizes)
            sample.kind, sample.turn = "miss", turn
            samples.append(sample)
        return samples

    done = await asyncio.gather(*(session(i) for i in range(sizes.num_sessions)))
    return [s for samples in done for s in samples]


async def in_process(
    model_dir: Path, settings: dict[str, Any], sizes: Sizes, seed: int, tokenizer_dir: Path
) -> dict[str, Any]:
    from deployments.config import TransformersEngineConfig
    from deployments.executors.hf import TransformersExecutor

    config = TransformersEngineConfig(device="cuda" if sizes.is_gpu else "cpu", **settings)
    executor: Any = TransformersExecutor(model_dir, config)
    started = time.perf_counter()
    await executor.start()
    load_s = time.perf_counter() - started
    probe: StepProbe | None = None
    try:
        manager = executor._manager
        assert manager is not None and manager.batch_processor is not None
        attn = str(manager.model.config._attn_implementation)
        probe = StepProbe(manager.batch_processor)
        del manager
        # Warm-up: the same shapes once (CUDA graphs are captured as new padded sizes appear).
        await _in_process_sessions(executor, _prompts(tokenizer_dir, seed + 1), sizes, "warm", 1)
        probe.reset()
        source = _prompts(tokenizer_dir, seed)
        sessions, _ = await _in_process_sessions(executor, source, sizes, "s", sizes.num_hit_turns)
        hits = [s for s in sessions if s.kind == "hit"]
        steps_hit = probe.summary()
        probe.reset()
        misses = await _in_process_misses(
            executor, source, sizes, [s.num_prompt_tokens for s in hits]
        )
        steps_miss = probe.summary()
        stats = executor.stats()
    finally:
        await executor.shutdown()
        # The probe's timers reference the batch processor (and its KV cache): drop both before the
        # next engine allocates its own.
        executor = probe = None
        gc.collect()
        _empty_cuda_cache()
    hit_ttft = ms_summary([s.ttft_s for s in hits])
    miss_ttft = ms_summary([s.ttft_s for s in misses])
    return {
        "settings": settings,
        "attn_implementation": attn,
        "load_s": load_s,
        "ttft_ms_hit": hit_ttft,
        "ttft_ms_miss": miss_ttft,
        "ttft_ms_first": ms_summary([s.ttft_s for s in sessions if s.kind == "first"]),
        # Greedy tokens of each session's first turn: the same prompts in every variant, so the kernels'
        # outputs can be compared (bf16 numerics may flip a near-tie of the random model's argmax).
        "first_turn_tokens": [s.token_ids for s in sessions if s.kind == "first"],
        "itl_ms_hit_phase": ms_summary([s.itl_s for s in sessions]),
        "miss_over_hit_p50": miss_ttft["p50"] / hit_ttft["p50"],
        "hit_prompt_tokens_mean": statistics.fmean(s.num_prompt_tokens for s in hits),
        "hit_cached_tokens_mean": statistics.fmean(s.num_cached_tokens for s in hits),
        "miss_cached_tokens_mean": statistics.fmean(s.num_cached_tokens for s in misses),
        "steps_hit_phase_ms": steps_hit,
        "steps_miss_phase_ms": steps_miss,
        "engine_hit_rate": stats.prefix_cache_hit_rate,
    }


def _agreement(reference: list[list[int]], tokens: list[list[int]]) -> float:
    """The share of output positions, over all sessions, before which the two greedy outputs agree."""
    same = total = 0
    for want, got in zip(reference, tokens, strict=True):
        prefix = next(
            (i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b),
            min(len(want), len(got)),
        )
        same += prefix
        total += max(len(want), len(got))
    return same / total if total else math.nan


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _wait_for_gpu_memory(timeout_s: float = 60.0) -> None:
    """Until the GPU is nearly free again: the previous app's processes are killed, and the driver frees
    their memory a moment later, while the next app's replicas check what is free when they start."""
    import torch

    if not torch.cuda.is_available():
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        free, total = torch.cuda.mem_get_info()
        if free > 0.9 * total:
            return
        time.sleep(1.0)
    free, total = torch.cuda.mem_get_info()
    print(
        f"warning: only {free / 2**30:.1f} of {total / 2**30:.1f} GiB of the GPU are free",
        flush=True,
    )


# ---- (b), (c) through serve run: server-side sessions over HTTP -------------------------------------------
async def _stream_turn(
    http: Any, base_url: str, session_id: str, text: str, sizes: Sizes, turn: int
) -> Sample:
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": sizes.output_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "session_id": session_id,
    }
    started = time.perf_counter()
    ttft = math.nan
    usage: dict[str, Any] = {}
    buffer = b""
    async with http.post(f"{base_url}/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:300]}")
        async for data in response.content.iter_any():
            now = time.perf_counter()
            buffer += data
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if not event.startswith(b"data: ") or event == b"data: [DONE]":
                    continue
                chunk = json.loads(event[6:])
                if "error" in chunk:
                    raise RuntimeError(str(chunk["error"])[:300])
                choices = chunk.get("choices") or []
                if choices and choices[0]["delta"].get("content") and math.isnan(ttft):
                    ttft = now - started
                usage = chunk.get("usage") or usage
    details = usage.get("prompt_tokens_details") or {}
    return Sample(
        kind="hit" if turn else "first",
        turn=turn,
        ttft_s=ttft,
        latency_s=time.perf_counter() - started,
        num_prompt_tokens=int(usage.get("prompt_tokens", 0)),
        num_cached_tokens=int(details.get("cached_tokens", 0)),
        num_output_tokens=int(usage.get("completion_tokens", 0)),
    )


async def _run_sessions(
    base_url: str, plans: list[tuple[str | None, list[str]]], sizes: Sizes
) -> list[Sample]:
    """Each plan (system prompt, turns) as one server-side session, all at once (staggered starts)."""
    import aiohttp

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=600)
    ) as http:

        async def session(index: int, system_prompt: str | None, turns: list[str]) -> list[Sample]:
            await asyncio.sleep(index * sizes.stagger_s)
            body = {"system_prompt": system_prompt} if system_prompt else {}
            async with http.post(f"{base_url}/v1/sessions", json=body) as response:
                if response.status != 200:
                    raise RuntimeError(f"creating a session: HTTP {response.status}")
                session_id = (await response.json())["id"]
            return [
                await _stream_turn(http, base_url, session_id, text, sizes, turn)
                for turn, text in enumerate(turns)
            ]

        done = await asyncio.gather(
            *(session(i, system, turns) for i, (system, turns) in enumerate(plans))
        )
    return [s for samples in done for s in samples]


def _serve_args(
    model_dir: Path,
    settings: dict[str, Any],
    sizes: Sizes,
    engine: dict[str, Any] | None = None,
    transformers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`args` over serve_config.yaml: this model, one Engine replica (or `engine`'s), one Router."""
    return {
        "model": {"path": str(model_dir), "served_model_name": MODEL_NAME},
        "engine": {
            "num_replicas": 1,
            "num_cpus_per_replica": 1,
            "num_gpus_per_replica": 1 if sizes.is_gpu else 0,
            **(engine or {}),
            "transformers": {
                "device": "auto" if sizes.is_gpu else "cpu",
                **settings,
                **(transformers or {}),
            },
        },
        "router": {"num_replicas": 1, "num_cpus_per_replica": 1},
    }


def _served(
    stack: ExitStack, work: Path, name: str, args: dict[str, Any], sizes: Sizes, env: dict[str, str]
) -> str:
    workdir = work / f"serve-{name}"
    workdir.mkdir(parents=True, exist_ok=True)
    _wait_for_gpu_memory()
    app = stack.enter_context(
        serve_app(
            "serve_config.yaml",
            port=PORT,
            args=args,
            env={"SHEPHERD_CACHE_DIR": str(workdir), **env},
            num_cpus=sizes.num_cpus if not env.get("RAY_OVERRIDE_RESOURCES") else None,
            workdir=workdir,
        )
    )
    return app.base_url


def _keep_log_tail(work: Path, out: Path, name: str) -> None:
    log = work / f"serve-{name}" / "serve-run.log"
    if log.exists():
        (out / f"serve-{name}.log.tail").write_text(log.read_text(errors="replace")[-20000:])


async def through_stack(
    model_dir: Path,
    settings: dict[str, Any],
    sizes: Sizes,
    seed: int,
    tokenizer_dir: Path,
    out: Path,
    work: Path,
) -> dict[str, Any]:
    source = _prompts(tokenizer_dir, seed)
    plans = [
        (
            None,
            [source.prompt(sizes.history_tokens)[0]]
            + [source.prompt(sizes.new_tokens)[0] for _ in range(sizes.num_hit_turns)],
        )
        for _ in range(sizes.num_sessions)
    ]
    warm = _prompts(tokenizer_dir, seed + 1)
    warm_plans = [
        (None, [warm.prompt(sizes.history_tokens)[0], warm.prompt(sizes.new_tokens)[0]])
        for _ in range(sizes.num_sessions)
    ]
    with ExitStack() as stack:
        try:
            base_url = _served(
                stack, work, "stack", _serve_args(model_dir, settings, sizes), sizes, {}
            )
            await _run_sessions(base_url, warm_plans, sizes)
            before = await _router_ttft(base_url)
            samples = await _run_sessions(base_url, plans, sizes)
            after = await _router_ttft(base_url)
        except BaseException:
            _keep_log_tail(work, out, "stack")
            raise
    hits = [s for s in samples if s.kind == "hit"]
    num_turns = after[1] - before[1]
    return {
        "ttft_ms_hit": ms_summary([s.ttft_s for s in hits]),
        # The Router's own TTFT (request in -> first token out of the engine), mean over every turn of the
        # measured sessions, beside the client's over the same turns: the rest is the ingress and HTTP.
        "router_ttft_ms_mean": 1000 * (after[0] - before[0]) / num_turns if num_turns else math.nan,
        "client_ttft_ms_mean": ms_summary([s.ttft_s for s in samples])["mean"],
        "num_turns_without_text": sum(math.isnan(s.ttft_s) for s in samples),
        "ttft_ms_first": ms_summary([s.ttft_s for s in samples if s.kind == "first"]),
        "itl_ms": ms_summary([s.itl_s for s in samples]),
        "hit_prompt_tokens_mean": statistics.fmean(s.num_prompt_tokens for s in hits),
        "hit_cached_tokens_mean": statistics.fmean(s.num_cached_tokens for s in hits),
    }


async def _warm_up(base_url: str, num_requests: int) -> None:
    """Short session-less chats before the sessions start, as `bench_sessions` sends: the Router's view of
    its Engine replicas (Serve's handle, each replica's channel) fills in over its first requests, and a
    first turn routed on a partial ring lands off its owner and misses its prefix on turn 2, back home."""
    import aiohttp

    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with aiohttp.ClientSession() as http:

        async def one() -> None:
            async with http.post(f"{base_url}/v1/chat/completions", json=body) as response:
                await response.read()

        await asyncio.gather(*(one() for _ in range(num_requests)))


async def _router_ttft(base_url: str) -> tuple[float, int]:
    """(sum of seconds, count) of the Router's TTFT histogram for chat, from its /metrics."""
    import aiohttp

    total, count = 0.0, 0
    async with aiohttp.ClientSession() as http, http.get(f"{base_url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if "/v1/chat/completions" not in name:
            continue
        if name.startswith("shepherd_time_to_first_token_seconds_sum"):
            total += float(value)
        elif name.startswith("shepherd_time_to_first_token_seconds_count"):
            count += int(float(value))
    return total, count


def shared_plans(
    sizes: Sizes, seed: int, tokenizer_dir: Path
) -> list[tuple[str | None, list[str]]]:
    source = _prompts(tokenizer_dir, seed)
    rng = random.Random(seed)
    return [
        (
            source.prompt(rng.randint(*sizes.system_tokens))[0],
            [source.prompt(rng.randint(*sizes.turn_tokens))[0] for _ in range(sizes.shared_turns)],
        )
        for _ in range(sizes.shared_sessions)
    ]


async def shared_gpu(
    model_dir: Path,
    settings: dict[str, Any],
    sizes: Sizes,
    policy: str,
    plans: Any,
    out: Path,
    work: Path,
) -> dict[str, Any]:
    engine: dict[str, Any] = {
        "num_replicas": sizes.shared_replicas,
        "num_gpus_per_replica": 1 / sizes.shared_replicas,
        "request_router": policy,
    }
    env: dict[str, str] = {}
    if not sizes.is_gpu:
        # A dry run places the replicas on a pretended GPU (Ray's fractional resources), on the CPU.
        env["RAY_OVERRIDE_RESOURCES"] = json.dumps({"CPU": sizes.num_cpus or 8, "GPU": 1})
    transformers = {"num_blocks": "auto"} if sizes.is_gpu else {}
    args = _serve_args(model_dir, settings, sizes, engine, transformers)
    name = f"shared-{policy}"
    with ExitStack() as stack:
        try:
            base_url = _served(stack, work, name, args, sizes, env)
            await _warm_up(base_url, 2 * sizes.shared_replicas)
            started = time.perf_counter()
            samples = await _run_sessions(base_url, plans, sizes)
            duration_s = time.perf_counter() - started
        except BaseException:
            _keep_log_tail(work, out, name)
            raise
    turns = sorted({s.turn for s in samples})
    later = [s for s in samples if s.turn >= 2]

    def hit_rate(chosen: Sequence[Sample]) -> float:
        prompt = sum(s.num_prompt_tokens for s in chosen)
        return sum(s.num_cached_tokens for s in chosen) / prompt if prompt else math.nan

    return {
        "policy": policy,
        "duration_s": duration_s,
        "ttft_ms_turns_3_plus": ms_summary([s.ttft_s for s in later]),
        "ttft_ms_per_turn": {
            str(t + 1): ms_summary([s.ttft_s for s in samples if s.turn == t]) for t in turns
        },
        "hit_rate": hit_rate(samples),
        # A turn whose 32 tokens decode to no visible text (a random model may repeat a special token)
        # has no client TTFT: it is missing from the TTFT counts, not failed.
        "num_turns_without_text_per_turn": {
            str(t + 1): sum(math.isnan(s.ttft_s) for s in samples if s.turn == t) for t in turns
        },
        "hit_rate_turns_2_plus": hit_rate([s for s in samples if s.turn >= 1]),
        "hit_rate_per_turn": {
            str(t + 1): hit_rate([s for s in samples if s.turn == t]) for t in turns
        },
        "cached_tokens_mean_turns_2_plus": statistics.fmean(
            s.num_cached_tokens for s in samples if s.turn >= 1
        ),
        "prompt_tokens_mean_turns_2_plus": statistics.fmean(
            s.num_prompt_tokens for s in samples if s.turn >= 1
        ),
        "itl_ms": ms_summary([s.itl_s for s in samples]),
    }


# ---- (d) the plot, and the table ---------------------------------------------------------------------------
def plot(shared: dict[str, Any], path: Path, title: str) -> Path:
    return plot_turns(
        shared, path, title=title, hit_label="cached / prompt tokens (usage.cached_tokens)"
    )


def _step_line(kind: str, s: dict[str, float]) -> str:
    cells = [s["count"], s["tokens"], s["scheduler"], s["prepare"], s["forward_launch"]]
    cells += [s["update"], s["gpu"], s["python"], s["wall"]]
    return f"    {kind:<8} " + " ".join(f"{cell:>7.2f}" for cell in cells)


def _shared_line(policy: str, r: dict[str, Any]) -> str:
    t = r["ttft_ms_turns_3_plus"]
    cached = (
        f"{r['cached_tokens_mean_turns_2_plus']:.0f}/{r['prompt_tokens_mean_turns_2_plus']:.0f}"
    )
    return (
        f"    {policy:<17} {t['p50']:>13.1f} {t['p90']:>7.1f} {t['mean']:>7.1f} "
        f"{r['hit_rate']:>5.0%} {r['hit_rate_turns_2_plus']:>8.0%} {cached:>12} {r['itl_ms']['p50']:>7.1f}"
    )


def print_table(report: dict[str, Any]) -> None:
    sizes = report["sizes"]
    print(
        f"\nbench_prefix on {report['machine'].get('gpus') or 'CPU'}: {sizes['num_sessions']} sessions "
        f"at once, {sizes['history_tokens']}-token history, {sizes['new_tokens']} new and "
        f"{sizes['output_tokens']} output tokens a turn; TTFT in ms"
    )
    print(
        f"(a) in process {'':<22} hit p50    p90  miss p50  miss/hit  ITL p50  cached/prompt  same  attn"
    )
    for name, r in report["in_process"].items():
        if "error" in r:
            print(f"  {name:<36} {r['error']}")
            continue
        cached = f"{r['hit_cached_tokens_mean']:.0f}/{r['hit_prompt_tokens_mean']:.0f}"
        print(
            f"  {name:<36} {r['ttft_ms_hit']['p50']:>7.1f} {r['ttft_ms_hit']['p90']:>6.1f} "
            f"{r['ttft_ms_miss']['p50']:>9.1f} {r['miss_over_hit_p50']:>8.1f}x "
            f"{r['itl_ms_hit_phase']['p50']:>8.1f} {cached:>14} "
            f"{r.get('first_turn_tokens_as_first_variant', math.nan):>5.0%}  {r['attn_implementation']}"
        )
    best = report.get("best_variant")
    if best in report["in_process"] and "error" not in report["in_process"][best]:
        print(f"  per step, {best}, mean ms (hit phase, then miss phase):")
        names = ["steps", "tokens", "sched", "prep", "launch", "update", "GPU", "python", "wall"]
        print("    kind     " + " ".join(f"{name:>7}" for name in names))
        for phase in ("steps_hit_phase_ms", "steps_miss_phase_ms"):
            for kind, steps in report["in_process"][best][phase].items():
                print(_step_line(kind, steps))
    stack = report.get("stack") or {}
    if "error" in stack:
        print(f"(b) serve run: {stack['error']}")
    elif stack:
        in_process = stack.get("in_process_hit_p50_ms", math.nan)
        print(
            f"(b) serve run, {best}: hit TTFT p50 {stack['ttft_ms_hit']['p50']:.1f} ms, in process "
            f"{in_process:.1f} ms: stack/in-process {stack.get('stack_over_in_process', math.nan):.2f}x "
            f"(goal <= 1.10); cached/prompt {stack['hit_cached_tokens_mean']:.0f}/"
            f"{stack['hit_prompt_tokens_mean']:.0f}"
        )
        if "router_ttft_ms_mean" in stack:
            client, router = stack["client_ttft_ms_mean"], stack["router_ttft_ms_mean"]
            print(
                f"    where the stack's part goes (means over every turn): client TTFT {client:.1f} ms = "
                f"ingress + HTTP {client - router:.1f} + the Router's TTFT {router:.1f} (its plan, the "
                f"channel and the engine); turns without visible text: {stack['num_turns_without_text']}"
            )
    shared = report.get("shared") or {}
    if shared:
        print(
            f"(c) {sizes['shared_replicas']} replicas on one GPU, {sizes['shared_sessions']} sessions x "
            f"{sizes['shared_turns']} turns:"
        )
        print(
            "    policy            TTFT t>=3 p50     p90    mean   hit  hit t>=2  cached t>=2  ITL p50"
        )
        for policy, r in shared.items():
            print(f"    {policy:<17} {r['error']}" if "error" in r else _shared_line(policy, r))
        for policy, r in shared.items():
            missing = r.get("num_turns_without_text_per_turn") or {}
            if any(missing.values()):
                print(f"    {policy}: turns without visible text (no TTFT), per turn: {missing}")
        ratio = report.get("affinity_over_pow2_p50")
        if ratio is not None:
            print(
                f"    affinity / power of two, TTFT t>=3 p50: {ratio:.2f}x (goal <= 0.5; hit rate goal >= 90%)"
            )
    for line in report["skipped"]:
        print(f"skipped: {line}")


# ---- the run ----------------------------------------------------------------------------------------------
def _error(error: BaseException) -> dict[str, str]:
    traceback.print_exception(error)
    return {"error": f"FAILED: {type(error).__name__}: {str(error)[:200]}"}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from deployments.embedded_model import ensure_embedded_model

    started = time.monotonic()
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The model, its caches and the apps' folders stay out of --out, which keeps only what is reported.
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_prefix-"))
    report: dict[str, Any] = {
        "machine": machine_info(),
        "sizes": dataclasses.asdict(sizes),
        "in_process": {},
        "skipped": [],
    }

    def left_s() -> float:
        return args.budget_s - (time.monotonic() - started)

    def save() -> None:
        """After each phase, so that a run cut short by its machine's limit still reports what it did."""
        write_json(out / "bench_prefix.json", report)

    tokenizer_dir = ensure_embedded_model(work / "cache")
    model_dir = llama_1b_shaped(tokenizer_dir, work / "model", dtype=sizes.dtype, shape=sizes.shape)
    gc.collect()
    _empty_cuda_cache()  # the replicas of (c) size their caches from the GPU's memory
    report["model_ready_s"] = time.monotonic() - started
    print(f"model ready in {report['model_ready_s']:.0f} s: {model_dir}", flush=True)

    # (a) each variant in process, leaving what the phases asked for after it need on the H200: (b) about
    # 1.5 minutes, (c) about 2.
    reserve_s = (90 * ("b" in args.phases) + 120 * ("c" in args.phases)) if sizes.is_gpu else 0
    chosen = [
        (name, settings)
        for name, settings in engine_variants(sizes)
        if not args.variants or name in args.variants.split(";")
    ]
    for name, settings in chosen if "a" in args.phases else []:
        if left_s() < reserve_s + (45 if sizes.is_gpu else 0):
            report["skipped"].append(
                f"(a) {name}: out of time ({left_s():.0f} s left, {reserve_s} s kept for the later phases)"
            )
            continue
        try:
            report["in_process"][name] = await in_process(
                model_dir, settings, sizes, args.seed, tokenizer_dir
            )
            r = report["in_process"][name]
            print(
                f"(a) {name}: hit p50 {r['ttft_ms_hit']['p50']:.1f} ms, miss p50 {r['ttft_ms_miss']['p50']:.1f} ms",
                flush=True,
            )
        except Exception as error:
            report["in_process"][name] = _error(error)
            _empty_cuda_cache()
        save()
    measured = {n: r for n, r in report["in_process"].items() if "error" not in r}
    if measured:
        reference = next(iter(measured.values()))["first_turn_tokens"]
        for r in measured.values():
            r["first_turn_tokens_as_first_variant"] = _agreement(reference, r["first_turn_tokens"])
    variants = dict(engine_variants(sizes))
    best = (
        min(measured, key=lambda n: measured[n]["ttft_ms_hit"]["p50"])
        if measured
        else next(iter(variants))
    )
    report["best_variant"] = best
    settings = variants[best]

    # (b) the same sessions through serve run.
    if "b" not in args.phases:
        pass
    elif not port_is_free(PORT):
        report["skipped"].append(f"(b), (c): port {PORT} is busy")
    elif left_s() < (150 if sizes.is_gpu else 0):
        report["skipped"].append("(b) serve run: out of time")
    else:
        try:
            stack = await through_stack(
                model_dir, settings, sizes, args.seed, tokenizer_dir, out, work
            )
            if best in measured:
                in_process_p50 = measured[best]["ttft_ms_hit"]["p50"]
                stack["in_process_hit_p50_ms"] = in_process_p50
                stack["stack_over_in_process"] = stack["ttft_ms_hit"]["p50"] / in_process_p50
            report["stack"] = stack
            print(f"(b) serve run: hit p50 {stack['ttft_ms_hit']['p50']:.1f} ms", flush=True)
        except Exception as error:
            report["stack"] = _error(error)
        save()

    # (c) several replicas on one GPU, each policy in its own app.
    report["shared"] = {}
    plans = shared_plans(sizes, args.seed + 2, tokenizer_dir)
    for policy in ("session_affinity", "power_of_two") if "c" in args.phases else ():
        if not port_is_free(PORT):
            report["skipped"].append(f"(c) {policy}: port {PORT} is busy")
        elif left_s() < (60 if sizes.is_gpu else 0):
            report["skipped"].append(f"(c) {policy}: out of time")
        else:
            try:
                report["shared"][policy] = await shared_gpu(
                    model_dir, settings, sizes, policy, plans, out, work
                )
                r = report["shared"][policy]
                print(
                    f"(c) {policy}: TTFT t>=3 p50 {r['ttft_ms_turns_3_plus']['p50']:.1f} ms, hit {r['hit_rate']:.0%}",
                    flush=True,
                )
            except Exception as error:
                report["shared"][policy] = _error(error)
            save()
    measured_shared = {p: r for p, r in report["shared"].items() if "error" not in r}
    if len(measured_shared) == 2:
        report["affinity_over_pow2_p50"] = (
            measured_shared["session_affinity"]["ttft_ms_turns_3_plus"]["p50"]
            / measured_shared["power_of_two"]["ttft_ms_turns_3_plus"]["p50"]
        )

    # (d)
    if measured_shared:
        try:
            gpu = report["machine"].get("gpus") or "CPU dry run"
            title = (
                f"{sizes.shared_replicas} Engine replicas on one GPU ({gpu}), {sizes.shared_sessions} "
                f"sessions x {sizes.shared_turns} turns, engine: {best}"
            )
            report["plot"] = str(plot(measured_shared, out / "prefix-ttft-per-turn.png", title))
        except Exception as error:
            report["skipped"].append(f"(d) plot: {type(error).__name__}: {error}")
    report["wall_s"] = time.monotonic() - started
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--out", required=True, help="results folder: bench_prefix.json, the PNG, logs"
    )
    parser.add_argument(
        "--work", help="the model, caches and serve run folders (default: a new temporary folder)"
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="phases that would start past it are skipped (a started phase may run a minute over)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--variants",
        default="",
        help="the (a) variants to run, by name, separated by ';' (default: all); the fastest serves (b) and (c)",
    )
    parser.add_argument(
        "--phases", default="a,b,c", help="which of (a), (b), (c) to run; (d) plots (c)"
    )
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    write_json(Path(args.out) / "bench_prefix.json", report)
    print_table(report)
    print(f"results: {Path(args.out) / 'bench_prefix.json'}")
    ran = [*report["in_process"].values(), *report.get("shared", {}).values()]
    ran += [report["stack"]] if "stack" in report else []
    return 0 if any("error" not in r for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
