"""Ray Serve placement of engine replicas: resources, placement groups and the MPI environment.

A replica is one engine. With tensor parallelism the replica actor itself holds all the engine's
GPUs in a single STRICT_PACK bundle, so Ray sets CUDA_VISIBLE_DEVICES to exactly those GPUs and the
MPI ranks the replica spawns (TensorRT-LLM's orchestrator mode, the transformers engine's tensor
parallelism; `executors/ranks.py`) inherit it. One replica therefore never spans
nodes; replicas spread over nodes like any other actors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# Ray Serve's fast path for streaming replicas, as Ray Serve LLM sets it: user code and the handle's
# request router run on the replica's own event loop instead of a thread and a loop of their own, which
# saves two cross-thread hops per streamed item.
SERVE_REPLICA_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}

# Open MPI refuses to start as root without both variables (containers usually run as root).
_MPI_ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def mpi_env_vars(*, spawns_workers: bool) -> dict[str, str]:
    """Environment an engine process needs for Open MPI.

    Args:
        spawns_workers: the engine spawns ranks (orchestrator mode, world size > 1).
    Returns:
        Root permission always (MPI initializes even for one rank). When spawning: no binding, since
        Open MPI would pin every spawned rank to one core (TRT-LLM passes bind_to=none for the same
        reason, nvbugs/4574329), and oversubscription, because Open MPI counts slots by host cores
        and the orchestrator already holds one, so N ranks on a node with <= N cores fail with
        "There are not enough slots available".
    """
    env = dict(_MPI_ROOT_ENV)
    if spawns_workers:
        env["OMPI_MCA_hwloc_base_binding_policy"] = "none"
        env["OMPI_MCA_rmaps_base_oversubscribe"] = "1"
    return env


def engine_deployment_options(
    *,
    num_gpus: float,
    num_cpus: float,
    tensor_parallel_size: int,
    uses_mpi: bool,
    custom_resources: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Options for `serve.deployment(...)` / `Deployment.options(...)` of one engine replica.

    Args:
        num_gpus: GPUs per replica, tp * pp (0 for a CPU engine); a fraction below 1 shares one GPU
            with other replicas (Ray's fractional GPUs; single-rank engines only).
        num_cpus: CPUs per replica (the orchestrator, its threads and the MPI ranks share them).
        tensor_parallel_size: the engine's TP size; must divide num_gpus.
        uses_mpi: the backend initializes MPI (TensorRT-LLM does; transformers does for TP > 1).
        custom_resources: custom Ray resources per replica (`engine.custom_resources`): they pin replicas
            to the nodes that advertise them.
    Returns:
        {"ray_actor_options": ...} and, for more than one GPU, "placement_group_bundles" (one bundle
        with every GPU, which the replica actor occupies) and placement_group_strategy STRICT_PACK.
    Raises:
        ValueError: inconsistent sizes.
    """
    if num_gpus < 0 or num_cpus < 0 or num_gpus == num_cpus == 0:
        raise ValueError(
            f"a replica needs GPUs or CPUs, got num_gpus={num_gpus:g}, num_cpus={num_cpus:g}"
        )
    # A share of one GPU holds a single rank; whole GPUs split evenly over the ranks.
    is_shared = 0 < num_gpus < 1
    if tensor_parallel_size < 1 or (
        tensor_parallel_size > 1 if is_shared else num_gpus % tensor_parallel_size != 0
    ):
        raise ValueError(
            f"num_gpus ({num_gpus:g}) must be a multiple of tensor_parallel_size "
            f"({tensor_parallel_size}): an engine replica holds tp * pp GPUs"
        )
    env_vars = dict(SERVE_REPLICA_ENV)
    if uses_mpi:
        # A TP engine on the CPU spawns its ranks too, with no GPU to count.
        env_vars.update(mpi_env_vars(spawns_workers=num_gpus > 1 or tensor_parallel_size > 1))
    actor_options: dict[str, Any] = {"num_cpus": num_cpus, "runtime_env": {"env_vars": env_vars}}
    if num_gpus:
        actor_options["num_gpus"] = num_gpus
    if custom_resources:
        actor_options["resources"] = dict(custom_resources)
    options: dict[str, Any] = {"ray_actor_options": actor_options}
    if num_gpus > 1:
        # Serve runs the replica actor in bundle 0: the bundle holds exactly the actor's resources.
        bundle: dict[str, float] = (
            {"CPU": num_cpus, "GPU": num_gpus} if num_cpus else {"GPU": num_gpus}
        )
        bundle.update(custom_resources or {})
        options["placement_group_bundles"] = [bundle]
        options["placement_group_strategy"] = "STRICT_PACK"
    return options


def check_replica_fits(
    *,
    num_gpus: float,
    num_cpus: float,
    nodes: Iterable[Mapping[str, Any]],
    custom_resources: Mapping[str, float] | None = None,
) -> None:
    """Fails fast at build time when no node can host a replica (Serve would wait forever).

    Args:
        nodes: `ray.nodes()` entries ({"Alive": bool, "Resources": {"GPU": ..., "CPU": ...}, ...}).
            Skip this check on autoscaling clusters, whose GPU nodes may not exist yet.
        custom_resources: custom resources one replica needs, which some node must advertise.
    Raises:
        ValueError: naming what one replica needs and what the largest node offers.
    """
    alive = [node for node in nodes if node.get("Alive", True)]
    needs = {"GPU": num_gpus, "CPU": num_cpus, **(custom_resources or {})}
    fits = [
        node
        for node in alive
        if all(node.get("Resources", {}).get(name, 0) >= amount for name, amount in needs.items())
    ]
    if fits:
        return
    custom = {name: amount for name, amount in needs.items() if name not in ("GPU", "CPU")}
    missing = [
        name
        for name in custom
        if not any(node.get("Resources", {}).get(name, 0) >= custom[name] for node in alive)
    ]
    if missing:
        raise ValueError(
            f"an engine replica needs the custom resources {custom}, but no alive node advertises "
            f"{', '.join(repr(name) for name in missing)} (`ray start --resources`); turn off "
            f"engine.check_fits_at_build if such nodes join later"
        )
    offers = sorted(
        (
            (node.get("Resources", {}).get("GPU", 0), node.get("Resources", {}).get("CPU", 0))
            for node in alive
        ),
        reverse=True,
    )
    largest = f"{offers[0][0]:g} GPUs and {offers[0][1]:g} CPUs" if offers else "no alive nodes"
    raise ValueError(
        f"an engine replica needs {num_gpus:g} GPUs and {num_cpus:g} CPUs on one node, but the "
        f"largest node has {largest} ({len(alive)} alive nodes). A replica cannot span nodes: "
        f"build the engine with a smaller tensor/pipeline parallel size (trtllm-build --tp_size/"
        f"--pp_size), use bigger nodes, or run leader mode (mpirun) outside Ray Serve."
    )
