"""An OpenAI-compatible streaming load generator (the method of vLLM's `benchmark_serving.py`).

Per request it records TTFT (first chunk with text), the list of inter-token latencies (gaps between chunks
with text), end-to-end latency and the number of output tokens; TPOT = (latency - TTFT) / (output tokens - 1).
Loads: a closed loop of `concurrency` clients, or Poisson arrivals at `rate` requests/s. Prompts: random token
ids of a fixed length (sent as ids to /v1/completions, or decoded to text for /v1/chat/completions), single
turn or multi-turn sessions whose history grows with every answer.

    python -m benchmarks.loadgen --base-url http://127.0.0.1:8101 --model shepherd-tiny \
        --tokenizer /tmp/shepcache/shepherd-tiny-r1-seed0 --concurrency 1,8,64 --num-requests 256 \
        --input-len 128 --output-len 128 --out benchmarks/results/sweep.json --plot
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

PERCENTILES = (50, 90, 99)


# ---- what one request measured ------------------------------------------------------------------------
@dataclass(slots=True)
class RequestRecord:
    """One request as the client saw it; times in seconds, `start` on `time.perf_counter`'s clock."""

    start: float
    ttft: float = math.nan
    latency: float = math.nan
    itl: list[float] = field(default_factory=list)
    num_output_tokens: int = 0
    num_prompt_tokens: int = 0
    num_cached_tokens: int | None = (
        None  # prompt tokens the engine found cached, where usage reports it
    )
    num_chunks: int = 0
    turn: int = 0
    error: str | None = None
    text: str = ""
    finish_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float:
        if self.num_output_tokens < 2:
            return math.nan
        return (self.latency - self.ttft) / (self.num_output_tokens - 1)


# ---- prompts ------------------------------------------------------------------------------------------
class PromptSource:
    """Random prompts of a fixed token length, reproducible from a seed.

    With a tokenizer directory, ids are drawn from the non-special vocabulary (vLLM's `random` dataset) and the
    text is their decoding; without one, the text is random words and no ids are known. Such a decoding
    usually tokenizes back to more ids than were drawn (about 1.5x for byte-level BPE); `is_round_trip` draws
    only whole words with their leading space (`Ġword`), so the text of N ids is N ids again, and a prompt
    sent as text through a server is as long as the same prompt sent as ids to an engine in process.
    """

    _WORD = re.compile(r"^Ġ[a-z]{3,}$")
    _WORDS = "the of and to in is it you that he was for on are with as his they be at one have this".split()

    def __init__(
        self, tokenizer_dir: str | None, seed: int, *, is_round_trip: bool = False
    ) -> None:
        self._rng = random.Random(seed)
        self._tokenizer: Any = None
        if tokenizer_dir is not None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
            special = {
                token.content for token in self._tokenizer.get_added_tokens_decoder().values()
            }
            vocab = self._tokenizer.get_vocab()
            self._ids = sorted(i for token, i in vocab.items() if token not in special)
            if is_round_trip:
                words = [i for i in self._ids if self._WORD.match(self._tokenizer.id_to_token(i))]
                self._ids = [
                    i
                    for i in words
                    if self._tokenizer.encode(self._tokenizer.decode([i])).ids == [i]
                ]

    def prompt(self, num_tokens: int) -> tuple[str, list[int] | None]:
        if self._tokenizer is None:
            return " ".join(self._rng.choice(self._WORDS) for _ in range(num_tokens)), None
        token_ids = [self._rng.choice(self._ids) for _ in range(num_tokens)]
        return str(self._tokenizer.decode(token_ids)), token_ids

    def count(self, text: str) -> int | None:
        return len(self._tokenizer.encode(text).ids) if self._tokenizer is not None else None


@dataclass(slots=True)
class Job:
    """One unit of closed-loop work: a single request, or a whole session of `len(turns)` requests."""

    turns: list[tuple[str, list[int] | None]]


def make_jobs(source: PromptSource, num_jobs: int, input_len: int, num_turns: int) -> list[Job]:
    return [Job([source.prompt(input_len) for _ in range(num_turns)]) for _ in range(num_jobs)]


# ---- backends -----------------------------------------------------------------------------------------
class Backend(Protocol):
    """Streams one request and fills in a RequestRecord; `history` holds earlier turns (chat only)."""

    async def send(
        self,
        text: str,
        token_ids: list[int] | None,
        history: list[dict[str, str]],
        record: RequestRecord,
    ) -> None: ...

    async def close(self) -> None: ...


class OpenAIBackend:
    """An OpenAI-compatible server over HTTP (aiohttp; SSE parsed by hand, one timestamp per network read)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        endpoint: str = "chat",
        max_tokens: int = 128,
        send_token_ids: bool = True,
        include_usage: bool = True,
        extra_body: dict[str, Any] | None = None,
        api_key: str | None = None,
        timeout_s: float = 600,
    ) -> None:
        import aiohttp

        self._url = base_url.rstrip("/") + (
            "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
        )
        self._is_chat = endpoint == "chat"
        self._model = model
        self.max_tokens = max_tokens
        self._send_token_ids = send_token_ids
        self._include_usage = include_usage
        self._extra_body = extra_body or {}
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
        )

    def body(
        self, text: str, token_ids: list[int] | None, history: list[dict[str, str]]
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self._model,
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
            "stream": True,
            **self._extra_body,
        }
        if self._include_usage:
            body["stream_options"] = {"include_usage": True}
        if self._is_chat:
            body["messages"] = [*history, {"role": "user", "content": text}]
        else:
            body["prompt"] = token_ids if (self._send_token_ids and token_ids is not None) else text
        return body

    async def send(
        self,
        text: str,
        token_ids: list[int] | None,
        history: list[dict[str, str]],
        record: RequestRecord,
    ) -> None:
        body = self.body(text, token_ids, history)
        parts: list[str] = []
        last_at = record.start
        buffer = b""
        async with self._session.post(self._url, json=body) as response:
            if response.status != 200:
                record.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return
            async for data in response.content.iter_any():
                now = time.perf_counter()
                buffer += data
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    if not event.startswith(b"data: "):
                        continue
                    payload = event[6:]
                    if payload == b"[DONE]":
                        continue
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        record.error = str(chunk["error"])[:200]
                        continue
                    usage = chunk.get("usage")
                    if usage:
                        record.num_output_tokens = usage["completion_tokens"]
                        record.num_prompt_tokens = usage["prompt_tokens"]
                        details = usage.get("prompt_tokens_details") or {}
                        if details.get("cached_tokens") is not None:
                            record.num_cached_tokens = details["cached_tokens"]
                    choices = chunk.get("choices") or []
                    piece = None
                    if choices:
                        choice = choices[0]
                        record.finish_reason = choice.get("finish_reason") or record.finish_reason
                        piece = (
                            choice["delta"].get("content") if self._is_chat else choice.get("text")
                        )
                    if piece:
                        if not parts:
                            record.ttft = now - record.start
                        else:
                            record.itl.append(now - last_at)
                        last_at = now
                        parts.append(piece)
                        record.num_chunks += 1
        record.latency = last_at - record.start
        record.text = "".join(parts)

    async def close(self) -> None:
        await self._session.close()


class ExecutorBackend:
    """The same requests handed to an Executor in this process (no HTTP, no router, no Ray)."""

    def __init__(self, executor: Any, max_tokens: int, end_id: int | None = None) -> None:
        self._executor = executor
        self.max_tokens = max_tokens
        self._end_id = end_id
        self._num_sent = 0

    async def send(
        self,
        text: str,
        token_ids: list[int] | None,
        history: list[dict[str, str]],
        record: RequestRecord,
    ) -> None:
        from deployments.messages import GenerateRequest, SamplingParams

        assert token_ids is not None, "the in-process backend needs token-id prompts (a tokenizer)"
        self._num_sent += 1
        request = GenerateRequest(
            request_id=f"bench-{self._num_sent}",
            prompt_token_ids=token_ids,
            max_tokens=self.max_tokens,
            sampling=SamplingParams(temperature=0.0),
            end_id=self._end_id,
        )
        last_at = record.start
        async for delta in self._executor.generate(request):
            if delta.token_ids:
                now = time.perf_counter()
                if record.num_output_tokens == 0:
                    record.ttft = now - record.start
                else:
                    record.itl.append(now - last_at)
                last_at = now
                record.num_output_tokens += len(delta.token_ids)
                record.num_chunks += 1
        record.num_prompt_tokens = len(token_ids)
        record.latency = last_at - record.start

    async def close(self) -> None:
        return None


# ---- running a load -----------------------------------------------------------------------------------
async def _run_job(backend: Backend, job: Job, source: PromptSource | None) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    history: list[dict[str, str]] = []
    for turn, (text, token_ids) in enumerate(job.turns):
        record = RequestRecord(start=time.perf_counter(), turn=turn)
        try:
            await backend.send(text, token_ids, history, record)
        except Exception as error:
            record.error = f"{type(error).__name__}: {error}"[:200]
        if record.ok and record.num_output_tokens == 0 and record.text:
            # No usage in the stream (llama-cpp-python): a "length" finish means exactly max_tokens tokens;
            # otherwise re-tokenize the text, as vLLM's benchmark does.
            max_tokens = getattr(backend, "max_tokens", None)
            if record.finish_reason == "length" and max_tokens:
                record.num_output_tokens = max_tokens
            elif source is not None:
                record.num_output_tokens = source.count(record.text) or record.num_chunks
        records.append(record)
        if not record.ok:
            break
        history += [
            {"role": "user", "content": text},
            {"role": "assistant", "content": record.text},
        ]
    return records


async def run_load(
    backend: Backend,
    jobs: Sequence[Job],
    *,
    concurrency: int | None,
    rate: float | None = None,
    seed: int = 0,
    source: PromptSource | None = None,
    progress: str | None = None,
) -> tuple[list[RequestRecord], float]:
    """Runs every job; returns the records and the wall time from first send to last answer.

    Closed loop when `rate` is None (`concurrency` clients, each starting its next job when one ends);
    otherwise Poisson arrivals at `rate` jobs/s, at most `concurrency` in flight when it is given.
    """
    from tqdm.auto import tqdm

    bar = tqdm(
        total=sum(len(job.turns) for job in jobs),
        desc=progress,
        disable=progress is None,
        leave=False,
    )
    records: list[RequestRecord] = []
    pending = list(reversed(jobs))
    limit = asyncio.Semaphore(concurrency) if concurrency else None

    async def one(job: Job) -> None:
        if limit is not None:
            async with limit:
                done = await _run_job(backend, job, source)
        else:
            done = await _run_job(backend, job, source)
        records.extend(done)
        bar.update(len(done))

    started = time.perf_counter()
    if rate is None:
        assert concurrency, "a closed loop needs a concurrency"

        async def client() -> None:
            while pending:
                await one(pending.pop())

        await asyncio.gather(*(client() for _ in range(min(concurrency, len(jobs)))))
    else:
        rng = random.Random(seed)
        tasks = []
        for job in jobs:
            tasks.append(asyncio.create_task(one(job)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    bar.close()
    ended = max((r.start + r.latency for r in records if r.ok), default=time.perf_counter())
    return records, ended - started


# ---- aggregates ---------------------------------------------------------------------------------------
def _stats(values: Sequence[float], scale: float = 1000.0) -> dict[str, float]:
    array = np.asarray([v for v in values if not math.isnan(v)], dtype=float) * scale
    if array.size == 0:
        return {"mean": math.nan, **{f"p{p}": math.nan for p in PERCENTILES}}
    return {
        "mean": float(array.mean()),
        **{f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES},
    }


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    *,
    ttft_slo_ms: float | None = None,
    tpot_slo_ms: float | None = None,
) -> dict[str, Any]:
    """Aggregates in milliseconds and per second, as `vllm bench serve` reports them."""
    ok = [r for r in records if r.ok]
    num_output = sum(r.num_output_tokens for r in ok)
    num_input = sum(r.num_prompt_tokens for r in ok)

    def meets_slo(r: RequestRecord) -> bool:
        return (ttft_slo_ms is None or r.ttft * 1000 <= ttft_slo_ms) and (
            tpot_slo_ms is None or math.isnan(r.tpot) or r.tpot * 1000 <= tpot_slo_ms
        )

    summary: dict[str, Any] = {
        "num_completed": len(ok),
        "num_failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "duration_s": duration_s,
        "num_input_tokens": num_input,
        "num_output_tokens": num_output,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else math.nan,
        "output_throughput": num_output / duration_s if duration_s > 0 else math.nan,
        "total_token_throughput": (num_input + num_output) / duration_s
        if duration_s > 0
        else math.nan,
        "tokens_per_chunk": num_output / max(1, sum(r.num_chunks for r in ok)),
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats([r.tpot for r in ok]),
        "itl_ms": _stats([gap for r in ok for gap in r.itl]),
        "e2el_ms": _stats([r.latency for r in ok]),
    }
    cached = [r.num_cached_tokens for r in ok if r.num_cached_tokens is not None]
    if cached:
        summary["num_cached_tokens"] = sum(cached)
    if ttft_slo_ms is not None or tpot_slo_ms is not None:
        summary["goodput"] = {
            "ttft_slo_ms": ttft_slo_ms,
            "tpot_slo_ms": tpot_slo_ms,
            "request_goodput": sum(meets_slo(r) for r in ok) / duration_s
            if duration_s > 0
            else math.nan,
        }
    turns = sorted({r.turn for r in ok})
    if len(turns) > 1:
        summary["ttft_ms_by_turn"] = {
            str(t): _stats([r.ttft for r in ok if r.turn == t]) for t in turns
        }
    return summary


def one_line(label: str, summary: dict[str, Any]) -> str:
    return (
        f"{label:<28} ok {summary['num_completed']:>5} fail {summary['num_failed']:>3}  "
        f"out {summary['output_throughput']:>9.1f} tok/s  req {summary['request_throughput']:>7.2f}/s  "
        f"TTFT p50 {summary['ttft_ms']['p50']:>8.2f} p99 {summary['ttft_ms']['p99']:>8.2f} ms  "
        f"TPOT p50 {summary['tpot_ms']['p50']:>7.2f} ms  ITL p99 {summary['itl_ms']['p99']:>7.2f} ms  "
        f"tok/chunk {summary['tokens_per_chunk']:.2f}"
    )


# ---- where and when ---------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """What a number needs next to it: CPU, memory, GPU, versions, date, command, commit."""
    import os
    import platform
    import subprocess
    import sys
    from datetime import datetime, timezone
    from importlib import metadata

    def run(*command: str) -> str | None:
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=10)
            return out.stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            return None

    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in ("ray", "transformers", "torch", "tokenizers", "fastapi", "aiohttp"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    repo = Path(__file__).resolve().parents[1]
    return {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpu": cpu_model,
        "num_cpus": os.cpu_count(),
        "sched_cpus": len(os.sched_getaffinity(0)),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpus": run(
            "nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"
        ),
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": run("git", "-C", str(repo), "rev-parse", "--short", "HEAD"),
        "git_dirty": bool(
            run("git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no")
        ),
        "loadavg": os.getloadavg(),
    }


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")


# ---- command line -----------------------------------------------------------------------------------------
async def sweep(args: argparse.Namespace) -> dict[str, Any]:
    source = PromptSource(args.tokenizer, args.seed)
    backend = OpenAIBackend(
        args.base_url,
        args.model,
        endpoint=args.endpoint,
        max_tokens=args.output_len,
        include_usage=not args.no_usage,
        api_key=args.api_key,
    )
    levels = []
    try:
        if args.warmup:
            warm = make_jobs(source, args.warmup, args.input_len, 1)
            await run_load(backend, warm, concurrency=min(args.warmup, 8), source=source)
        for concurrency in (
            [int(c) for c in args.concurrency.split(",")] if args.concurrency else [None]
        ):
            num_jobs = max(args.num_requests // args.turns, concurrency or 1)
            jobs = make_jobs(source, num_jobs, args.input_len, args.turns)
            label = (
                f"c={concurrency}" if args.rate is None else f"rate={args.rate}/s c<={concurrency}"
            )
            records, duration = await run_load(
                backend,
                jobs,
                concurrency=concurrency,
                rate=args.rate,
                seed=args.seed,
                source=source,
                progress=label,
            )
            summary = summarize(
                records, duration, ttft_slo_ms=args.ttft_slo_ms, tpot_slo_ms=args.tpot_slo_ms
            )
            print(one_line(label, summary), flush=True)
            levels.append({"concurrency": concurrency, "rate": args.rate, **summary})
    finally:
        await backend.close()
    return {"machine": machine_info(), "config": vars(args), "levels": levels}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8101")
    parser.add_argument("--model", default="shepherd-tiny")
    parser.add_argument("--api-key", help="sent as a bearer token (router.api_keys)")
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    parser.add_argument(
        "--tokenizer", help="a directory with tokenizer.json: exact-length random prompts"
    )
    parser.add_argument(
        "--concurrency", default="1,4,16,64", help="comma-separated closed-loop levels"
    )
    parser.add_argument(
        "--rate", type=float, help="Poisson arrivals per second instead of a closed loop"
    )
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument(
        "--turns", type=int, default=1, help="requests per session (multi-turn when > 1)"
    )
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--ttft-slo-ms", type=float)
    parser.add_argument("--tpot-slo-ms", type=float)
    parser.add_argument(
        "--no-usage", action="store_true", help="count tokens by re-tokenizing the text"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON results path")
    parser.add_argument("--plot", action="store_true", help="also write a PNG next to --out")
    args = parser.parse_args(argv)
    result = asyncio.run(sweep(args))
    if args.out:
        write_json(args.out, result)
        if args.plot:
            from benchmarks.plots import plot_levels

            plot_levels(
                {args.model: result["levels"]},
                Path(args.out).with_suffix(".png"),
                title=args.base_url,
            )


if __name__ == "__main__":
    main()
