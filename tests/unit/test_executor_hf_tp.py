"""The transformers engine split over two ranks on the CPU: the executor is rank 0 and spawns rank 1 through MPI,
the ranks talk over gloo. Against the same executor at TP=1 on the embedded model (greedy: exact tokens), and
the rank's process against every way its replica can end."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from deployments.config import AppConfig, TransformersEngineConfig
from deployments.errors import EngineDead, EngineError
from deployments.executors.hf import TransformersExecutor
from deployments.executors.hf_tp import RANK_MODULE, check_model_splits
from deployments.messages import FinishReason, GenerateRequest, SamplingParams, TokenDelta
from deployments.placement import engine_deployment_options, mpi_env_vars
from tests import trtllm_support as support

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = ["Hello café 東京", "What is the session token?", "hi"]
MAX_TOKENS = 8  # TP=2 on two cores is slow: short answers keep the suite quick


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=False
        )
    )


async def started(model_dir: Path, tp_size: int) -> TransformersExecutor:
    config = TransformersEngineConfig(device="cpu", num_blocks=64, tensor_parallel_size=tp_size)
    executor = TransformersExecutor(model_dir, config)
    await executor.start()
    return executor


async def deltas_of(stream: AsyncIterator[TokenDelta]) -> list[TokenDelta]:
    return [delta async for delta in stream]


async def greedy_answers(executor: TransformersExecutor, prompts: list[list[int]]) -> list[Any]:
    requests = [
        GenerateRequest(f"g{i}-{id(prompts)}", ids, MAX_TOKENS, GREEDY)
        for i, ids in enumerate(prompts)
    ]
    return list(await asyncio.gather(*(deltas_of(executor.generate(r)) for r in requests)))


def cache_bytes(executor: TransformersExecutor) -> int:
    manager = executor._manager
    assert manager is not None and manager.batch_processor is not None
    return int(manager.batch_processor.cache.cache_tensor.numel())


def rank_pids(executor: TransformersExecutor) -> list[int]:
    assert executor._group is not None
    return executor._group.pids


def is_rank_process(pid: int) -> bool:
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return RANK_MODULE in cmdline


@pytest.fixture
def mpi() -> None:
    support.require_mpi()


@pytest.mark.mpi
def test_two_ranks_stream_the_tokens_of_one_and_their_rank_exits_with_the_executor(
    mpi: None, model_dir: Path, tokenizer: Any
) -> None:
    prompts = [prompt_ids(tokenizer, text) for text in PROMPTS]

    async def tp1() -> tuple[list[list[int]], int]:
        executor = await started(model_dir, 1)
        try:
            answers = await greedy_answers(executor, prompts)
            return [support.joined(a) for a in answers], cache_bytes(executor)
        finally:
            await executor.shutdown()

    async def tp2() -> dict[str, Any]:
        executor = await started(model_dir, 2)
        try:
            pids = rank_pids(executor)
            seen = {"pids": pids, "are_rank_processes": [is_rank_process(pid) for pid in pids]}
            seen["capabilities"], seen["has_sampler"] = (
                executor.capabilities,
                executor._sampler is not None,
            )
            first = await greedy_answers(executor, prompts)
            seen["cache_bytes"] = cache_bytes(executor)  # the cache exists once the CB thread runs
            # A client gone mid-stream: rank 0 cancels, and every rank drops the request at the same step.
            stream = executor.generate(GenerateRequest("gone", prompts[0], 1500, GREEDY))
            await stream.__anext__()
            await stream.aclose()
            sampled = await deltas_of(
                executor.generate(
                    GenerateRequest("sampled", prompts[1], MAX_TOKENS, SamplingParams(1.5))
                )
            )
            again = await greedy_answers(executor, prompts)  # the ranks still agree on everything
            manager = executor._manager
            assert manager is not None and manager.batch_processor is not None
            scheduler = manager.batch_processor.scheduler
            executor.check_health()
            return {
                **seen,
                "first": first,
                "again": [support.joined(a) for a in again],
                "sampled": support.joined(sampled),
                "stats": executor.stats(),
                "num_scheduled": len(scheduler.active_requests) + len(scheduler.waiting_requests),
            }
        finally:
            await executor.shutdown()

    want, tp1_cache_bytes = support.run(tp1(), timeout_s=120)
    got = support.run(tp2(), timeout_s=240)
    assert got["are_rank_processes"] == [True]
    # Per-request processors live on rank 0 only, so a TP engine declines what needs them (a 400 naming the
    # field and this hint), instead of letting the ranks sample different tokens.
    capabilities = got["capabilities"]
    assert not got["has_sampler"] and not capabilities.supports_seed
    assert not capabilities.guided_decoding_kinds and capabilities.max_top_logprobs == 0
    assert "tensor_parallel_size" in capabilities.unsupported_hint
    assert [support.joined(a) for a in got["first"]] == want
    assert got["again"] == want
    assert all(len(deltas) > 1 for deltas in got["first"])  # streamed, not one final delta
    assert all(deltas[-1].finish_reason is FinishReason.LENGTH for deltas in got["first"])
    assert len(got["sampled"]) == MAX_TOKENS
    assert got["stats"].num_cancelled_requests == 1
    assert got["num_scheduled"] == 0
    # The same pages on each rank, each page holding half the key-value heads.
    assert got["cache_bytes"] * 2 == pytest.approx(tp1_cache_bytes, rel=0.05)
    assert support.wait_until_gone(got["pids"]) == []


@pytest.mark.mpi
# transformers' CB thread re-raises the broken collective as it ends (continuous_api._handle_critical_error).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_killed_rank_fails_the_health_check_and_the_requests_in_flight(
    mpi: None, model_dir: Path, tokenizer: Any
) -> None:
    async def scenario() -> dict[str, Any]:
        executor = await started(model_dir, 2)
        try:
            pids = rank_pids(executor)
            stream = executor.generate(GenerateRequest("long", prompt_ids(tokenizer, "x"), 1500))
            await stream.__anext__()
            os.kill(pids[0], signal.SIGKILL)
            with pytest.raises(EngineDead, match="rank"):
                async for _ in stream:
                    pass
            with pytest.raises(EngineDead):
                executor.check_health()
            with pytest.raises(EngineDead):
                await deltas_of(executor.generate(GenerateRequest("after", [1, 2, 3], 2)))
            return {"pids": pids}
        finally:
            await executor.shutdown()

    result = support.run(scenario(), timeout_s=240)
    assert support.wait_until_gone(result["pids"]) == []


_REPLICA = """
import asyncio, sys
from deployments.config import TransformersEngineConfig
from deployments.executors.hf import TransformersExecutor

async def main():
    config = TransformersEngineConfig(device="cpu", num_blocks=16, tensor_parallel_size=2)
    executor = TransformersExecutor(sys.argv[1], config)
    await executor.start()
    print("RANKS", *executor._group.pids, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


@pytest.mark.mpi
def test_ranks_exit_when_their_replica_is_killed(mpi: None, model_dir: Path) -> None:
    """A replica SIGKILLed (Serve's last resort, or the OOM killer) runs no cleanup: the ranks go anyway."""
    env = {
        **os.environ,
        **mpi_env_vars(spawns_workers=True),
        "PYTHONPATH": str(support.REPO_ROOT),
    }
    replica = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_REPLICA), str(model_dir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert replica.stdout is not None
        output = []
        for line in replica.stdout:  # until the ranks are up, or the replica exits
            output.append(line)
            if line.startswith("RANKS"):
                break
        pids = [int(pid) for pid in output[-1].split()[1:]]
        assert len(pids) == 1 and is_rank_process(pids[0]), "".join(output[-30:])
        replica.kill()
        replica.wait(timeout=30)
        assert support.wait_until_gone(pids, timeout_s=20) == []
    finally:
        replica.kill()
        replica.wait(timeout=30)


def test_a_model_that_does_not_split_evenly_fails_before_any_rank_starts(model_dir: Path) -> None:
    with pytest.raises(EngineError, match="must divide the model's 4 attention heads and 2"):
        check_model_splits(str(model_dir), 4)
    check_model_splits(str(model_dir), 2)


@pytest.mark.parametrize(
    ("num_gpus", "device", "message"),
    [
        (1, "auto", r"num_gpus_per_replica \(1\) must equal .*tensor_parallel_size \(2\)"),
        (4, "auto", r"num_gpus_per_replica \(4\) must equal"),
        (0, "cuda", "runs its ranks on 'cpu'"),
        (2, "cpu", "runs its ranks on 'cuda'"),
    ],
)
def test_a_replica_runs_one_rank_per_gpu_or_all_ranks_on_the_cpu(
    num_gpus: int, device: str, message: str
) -> None:
    engine = {
        "num_gpus_per_replica": num_gpus,
        "transformers": {"tensor_parallel_size": 2, "device": device},
    }
    with pytest.raises(ValueError, match=message):
        AppConfig.model_validate({"engine": engine})


@pytest.mark.parametrize("num_gpus", [0, 2])
def test_a_tensor_parallel_replica_may_spawn_ranks(num_gpus: int) -> None:
    AppConfig.model_validate(
        {"engine": {"num_gpus_per_replica": num_gpus, "transformers": {"tensor_parallel_size": 2}}}
    )
    options = engine_deployment_options(
        num_gpus=num_gpus, num_cpus=1, tensor_parallel_size=2, uses_mpi=True
    )
    env = options["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env["OMPI_MCA_rmaps_base_oversubscribe"] == "1"  # even with no GPU to count
    assert ("placement_group_strategy" in options) == (num_gpus > 1)
