"""`AppConfig` checks that involve several sections: GPU shares and KV-cache sizing."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from deployments.config import AppConfig
from deployments.placement import engine_deployment_options


def config(engine: dict[str, Any], model_path: str | None = None) -> AppConfig:
    return AppConfig.model_validate({"model": {"path": model_path}, "engine": engine})


def test_transformers_replicas_may_share_a_gpu_and_size_their_cache_from_it() -> None:
    engine = config(
        {"num_replicas": 4, "num_gpus_per_replica": 0.25, "transformers": {"num_blocks": "auto"}}
    ).engine
    assert engine.num_gpus_per_replica == 0.25 and engine.transformers.num_blocks == "auto"
    assert engine.transformers.gpu_memory_utilization == 0.9
    assert (
        config(
            {"num_gpus_per_replica": 1, "transformers": {"num_blocks": 512}}
        ).engine.transformers.num_blocks
        == 512
    )
    assert config({}).engine.transformers.num_blocks == 128  # explicit counts stay the default


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        (
            {"kind": "trtllm", "num_gpus_per_replica": 0.5},
            r"num_gpus_per_replica is 0\.5, but a TensorRT-LLM engine holds whole GPUs",
        ),
        (
            {"num_gpus_per_replica": 1.5},
            r"num_gpus_per_replica is 1\.5: a share of one GPU is below 1",
        ),
        (
            {"num_gpus_per_replica": 0.5, "transformers": {"tensor_parallel_size": 2}},
            r"num_gpus_per_replica \(0\.5\) must equal .*tensor_parallel_size \(2\)",
        ),
        (
            {"transformers": {"num_blocks": "auto"}},
            r"num_blocks: auto sizes the KV cache from the replica's GPU share",
        ),
        (
            {"num_gpus_per_replica": 1, "transformers": {"num_blocks": "auto", "device": "cpu"}},
            r"runs on the CPU",
        ),
        ({"transformers": {"num_blocks": "all"}}, r"num_blocks"),
        ({"transformers": {"gpu_memory_utilization": 1.5}}, r"gpu_memory_utilization"),
    ],
)
def test_bad_gpu_shares_and_cache_sizes_are_refused_naming_the_field(
    engine: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        config(engine, model_path="/models/engine" if engine.get("kind") == "trtllm" else None)


def test_a_fractional_replica_reserves_its_share_and_no_placement_group() -> None:
    options = engine_deployment_options(
        num_gpus=0.25, num_cpus=1, tensor_parallel_size=1, uses_mpi=False
    )
    assert options["ray_actor_options"]["num_gpus"] == 0.25
    assert "placement_group_bundles" not in options
    with pytest.raises(ValueError, match="multiple of tensor_parallel_size"):
        engine_deployment_options(num_gpus=0.5, num_cpus=1, tensor_parallel_size=2, uses_mpi=True)
