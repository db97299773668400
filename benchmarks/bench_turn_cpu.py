"""The Router's and Engine's CPU time per session turn, by stage, against the history's length (no Ray, no HTTP).

    python benchmarks/bench_turn_cpu.py --lengths 500,2000,4000,8000
    PYTHONPATH=/tmp/before python benchmarks/bench_turn_cpu.py    # another checkout's `deployments`

Eight turns of 200 words each continue one server-side session (SQLite store behind the session cache, the
embedded model's chat template), after a first turn of `--lengths` words; each stage of a turn is timed
alone and the table gives the median milliseconds: loading the session, planning the prompt (render and
continue from the exact ids), the whole `SessionManager.begin` (lease, load, plan), the routing policy's
prefix bookkeeping, the channel frame both ways, and the commit. These are the parts of a hit turn that grow
with the history; 8 concurrent turns on one Router replica run them one after another on its event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

WORDS = (
    "the of and to in is it you that he was for on are with as his they be at one have this".split()
)


async def run(lengths: list[int], num_turns: int) -> dict[int, dict[str, float]]:
    from deployments.config import SessionStoreConfig
    from deployments.embedded_model import ensure_embedded_model
    from deployments.messages import GenerateRequest, SamplingParams
    from deployments.sessions.backends import open_session_store
    from deployments.sessions.manager import SessionManager
    from deployments.templating import ChatTemplate, load_tokenizer
    from deployments.transport import wire
    from deployments.transport.policy import RoutingPolicy

    rng = random.Random(0)

    def text(num_words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(num_words))

    template = ChatTemplate(load_tokenizer(ensure_embedded_model()))
    store = open_session_store(
        SessionStoreConfig(sqlite_path=f"{tempfile.mkdtemp()}/sessions.sqlite3")
    )
    manager = SessionManager(
        store, template, max_model_len=1 << 20, max_sessions_per_owner=None, turn_timeout_s=60
    )
    policy = RoutingPolicy()
    results: dict[int, dict[str, float]] = {}
    times: dict[str, list[float]] = {}

    @contextmanager
    def timed(stage: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        times.setdefault(stage, []).append(time.perf_counter() - started)

    for length in lengths:
        times.clear()

        state = await manager.create("owner", "model", system_prompt=None, tools=None, metadata={})
        messages = [{"role": "user", "content": text(length)}]
        for turn in range(1 + num_turns):
            is_measured = turn > 0
            with timed("load"):
                loaded = await store.load(state.session_id)
            assert loaded is not None
            with timed("plan (render, continue)"):
                manager._plan(loaded, "", messages, 32, 32)
            with timed("begin (lease, load, plan)"):
                plan = await manager.begin(
                    "owner",
                    state.session_id,
                    messages,
                    requested_max_tokens=32,
                    default_max_tokens=32,
                )
            prompt_token_ids = plan.prompt_token_ids
            with timed("routing (prefix bookkeeping)"):
                try:
                    policy.record_routed("replica", prompt_token_ids, state.session_id)  # type: ignore[call-arg]
                except TypeError:  # a checkout whose policy takes no session
                    policy.record_routed("replica", prompt_token_ids)
            request = GenerateRequest(
                request_id=f"r{turn}",
                prompt_token_ids=prompt_token_ids,
                max_tokens=32,
                sampling=SamplingParams(),
                session_id=state.session_id,
            )
            with timed("frame out (Router)"):
                frame = wire.encode_frame(["g", turn, wire.request_to_wire(request)])
            with timed("frame in (Engine)"):
                wire.request_from_wire(json.loads(frame[4:])[2])
            completion_token_ids = template.encode_text(" " + text(40))[:32]
            with timed("commit"):
                await manager.commit(
                    plan, completion_token_ids, template.decode(completion_token_ids), is_exact=True
                )
            if not is_measured:
                times.clear()
            messages = [{"role": "user", "content": text(200)}]
        results[len(prompt_token_ids)] = {
            stage: 1000 * statistics.median(values) for stage, values in times.items()
        }
    await store.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--lengths", default="500,2000,4000,8000", help="first turns, in words")
    parser.add_argument("--turns", type=int, default=8)
    args = parser.parse_args()
    results = asyncio.run(run([int(n) for n in args.lengths.split(",")], args.turns))
    stages = list(next(iter(results.values())))
    print("median ms per turn; columns: prompt tokens at the last turn")
    print(f"{'stage':<32}" + "".join(f"{n:>10}" for n in results))
    for stage in stages:
        print(f"{stage:<32}" + "".join(f"{r[stage]:>10.2f}" for r in results.values()))


if __name__ == "__main__":
    main()
