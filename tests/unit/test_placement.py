"""Engine replica placement: Serve options, the Open MPI environment, a simulated GPU cluster."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from deployments.placement import (
    SERVE_REPLICA_ENV,
    check_replica_fits,
    engine_deployment_options,
    mpi_env_vars,
)
from tests import trtllm_support as support


def test_single_gpu_engine_needs_no_placement_group() -> None:
    options = engine_deployment_options(
        num_gpus=1, num_cpus=2, tensor_parallel_size=1, uses_mpi=True
    )
    assert set(options) == {"ray_actor_options"}
    actor = options["ray_actor_options"]
    assert (actor["num_cpus"], actor["num_gpus"]) == (2, 1)
    env = actor["runtime_env"]["env_vars"]
    assert env["OMPI_ALLOW_RUN_AS_ROOT"] == env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"
    assert "OMPI_MCA_rmaps_base_oversubscribe" not in env  # nothing is spawned


def test_tensor_parallel_replica_holds_all_gpus_in_one_strict_pack_bundle() -> None:
    options = engine_deployment_options(
        num_gpus=4, num_cpus=3, tensor_parallel_size=2, uses_mpi=True
    )
    assert options["placement_group_bundles"] == [{"CPU": 3, "GPU": 4}]
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["ray_actor_options"]["num_gpus"] == 4  # the replica actor fits bundle 0
    env = options["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env == {**SERVE_REPLICA_ENV, **mpi_env_vars(spawns_workers=True)}
    assert env["OMPI_MCA_rmaps_base_oversubscribe"] == "1"
    assert env["OMPI_MCA_hwloc_base_binding_policy"] == "none"


def test_zero_cpu_replica_bundle_holds_only_gpus() -> None:
    options = engine_deployment_options(
        num_gpus=2, num_cpus=0, tensor_parallel_size=2, uses_mpi=True
    )
    assert options["placement_group_bundles"] == [{"GPU": 2}]


def test_cpu_engine_without_mpi_gets_plain_cpu_options() -> None:
    options = engine_deployment_options(
        num_gpus=0, num_cpus=1.5, tensor_parallel_size=1, uses_mpi=False
    )
    assert options == {
        "ray_actor_options": {"num_cpus": 1.5, "runtime_env": {"env_vars": SERVE_REPLICA_ENV}}
    }


@pytest.mark.parametrize(
    ("num_gpus", "num_cpus", "tp"), [(3, 1, 2), (0, 0, 1), (-1, 1, 1), (2, 1, 0), (2, -1, 2)]
)
def test_inconsistent_sizes_are_rejected(num_gpus: int, num_cpus: float, tp: int) -> None:
    with pytest.raises(ValueError):
        engine_deployment_options(
            num_gpus=num_gpus, num_cpus=num_cpus, tensor_parallel_size=tp, uses_mpi=True
        )


def test_custom_resources_pin_the_replica_and_its_bundle() -> None:
    cpu = engine_deployment_options(
        num_gpus=0,
        num_cpus=1,
        tensor_parallel_size=1,
        uses_mpi=False,
        custom_resources={"gpu_node": 1},
    )
    assert cpu["ray_actor_options"]["resources"] == {"gpu_node": 1}
    tp = engine_deployment_options(
        num_gpus=2, num_cpus=2, tensor_parallel_size=2, uses_mpi=True, custom_resources={"a100": 2}
    )
    assert tp["ray_actor_options"]["resources"] == {"a100": 2}
    assert tp["placement_group_bundles"] == [{"CPU": 2, "GPU": 2, "a100": 2}]


def node(gpus: float, cpus: float = 8, *, alive: bool = True, **custom: float) -> dict[str, Any]:
    return {"Alive": alive, "Resources": {"GPU": gpus, "CPU": cpus, **custom}}


def test_fit_check_accepts_a_node_with_enough_gpus_and_cpus() -> None:
    check_replica_fits(num_gpus=4, num_cpus=2, nodes=[node(2), node(4)])


def test_fit_check_names_what_is_missing() -> None:
    with pytest.raises(ValueError, match=r"needs 8 GPUs .* largest node has 4 GPUs") as raised:
        check_replica_fits(num_gpus=8, num_cpus=2, nodes=[node(4), node(8, alive=False)])
    assert "cannot span nodes" in str(raised.value)
    with pytest.raises(ValueError, match="no alive nodes"):
        check_replica_fits(num_gpus=1, num_cpus=1, nodes=[])


def test_fit_check_needs_a_node_that_advertises_the_custom_resources() -> None:
    nodes = [node(0, router_node=1), node(0, gpu_node=1)]
    check_replica_fits(num_gpus=0, num_cpus=1, nodes=nodes, custom_resources={"gpu_node": 1})
    with pytest.raises(ValueError, match="no alive node advertises 'gpu_node'"):
        check_replica_fits(
            num_gpus=0, num_cpus=1, nodes=nodes[:1], custom_resources={"gpu_node": 1}
        )


# ---- a simulated cluster: two nodes (the head is one) with two fake GPUs each --------------------
@pytest.fixture(scope="module")
def gpu_cluster() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from cluster.local import joined_ray

    node_args = {"num_cpus": 2, "num_gpus": 2}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", support.worker_pythonpath())  # replicas import tests.*
        cluster = Cluster(
            initialize_head=True, head_node_args={**node_args, "include_dashboard": False}
        )
        cluster.add_node(**node_args, wait=False)
        try:
            with joined_ray(cluster.address):
                cluster.wait_for_nodes()
                yield ray
        finally:
            cluster.shutdown()


@pytest.mark.slow
def test_tp_replicas_land_whole_on_one_node_and_spread_across_nodes(gpu_cluster: Any) -> None:
    from ray import serve

    ray = gpu_cluster
    options = engine_deployment_options(
        num_gpus=2, num_cpus=1, tensor_parallel_size=2, uses_mpi=True
    )
    check_replica_fits(num_gpus=2, num_cpus=1, nodes=ray.nodes())
    app = serve.deployment(support.PlacementProbe, name="engine", num_replicas=2, **options).bind()
    serve.start(proxy_location="Disabled")
    try:
        handle = serve.run(app, name="placement", route_prefix=None)
        seen: dict[str, dict[str, Any]] = {}
        for _ in range(40):
            report = handle.remote().result(timeout_s=30)
            seen[report["replica"]] = report
            if len(seen) == 2:
                break
        groups = [
            pg for pg in ray.util.placement_group_table().values() if pg["state"] == "CREATED"
        ]
    finally:
        serve.shutdown()
    assert len(seen) == 2
    replicas = list(seen.values())
    assert len({r["node_id"] for r in replicas}) == 2  # one replica per 2-GPU node
    for replica in replicas:
        assert replica["gpu_ids"] == ["0", "1"]
        assert replica["env"]["OMPI_ALLOW_RUN_AS_ROOT"] == "1"
    assert len(groups) == 2
    for group in groups:
        assert group["strategy"] == "STRICT_PACK"
        assert [dict(b) for b in group["bundles"].values()] == [{"CPU": 1.0, "GPU": 2.0}]
    assert len({next(iter(g["bundles_to_node_id"].values())) for g in groups}) == 2


def test_replica_larger_than_any_node_fails_at_build_time(gpu_cluster: Any) -> None:
    with pytest.raises(ValueError, match=r"needs 4 GPUs .* largest node has 2 GPUs"):
        check_replica_fits(num_gpus=4, num_cpus=1, nodes=gpu_cluster.nodes())
