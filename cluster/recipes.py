"""The cluster recipes checked against the app they run: `rayservice.yaml` (KubeRay) and `ray-cluster.yaml`
(`ray up`) both deploy `serve_config.trtllm.yaml`, one `AppConfig`, and their node groups must be able to host
what it asks for.

    python -m cluster.recipes           # lists every disagreement; exit status 1 if there is one
    python -m cluster.recipes --write   # copies serve_config.trtllm.yaml into rayservice.yaml's serveConfigV2

What is checked: the args validate as `AppConfig`; sessions live in Redis (Routers on several hosts) at a host
the recipe provides; the Engine and the Router autoscale, and the GPU node group can grow to the Engine's
`max_replicas` (a replica never spans nodes); the head runs no replicas; the KubeRay serve config is the file,
byte for byte, and `ray up` mounts the file.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import yaml

if TYPE_CHECKING:
    from deployments.config import AppConfig, EngineConfig

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIG = "serve_config.trtllm.yaml"
RAYSERVICE = "cluster/rayservice.yaml"
RAY_CLUSTER = "cluster/ray-cluster.yaml"
_SERVE_CONFIG_KEY = "serveConfigV2: |"


@dataclass(frozen=True)
class NodeGroup:
    """What a recipe's worker group offers: per node, and how many nodes at most."""

    name: str
    num_gpus: float
    num_cpus: float
    custom_resources: Mapping[str, float]
    max_nodes: int


def app_args(serve_config: Mapping[str, Any]) -> dict[str, Any]:
    [application] = serve_config["applications"]
    args: dict[str, Any] = application["args"]
    return args


def app_config(serve_config: Mapping[str, Any]) -> AppConfig:
    """The validated args (raises pydantic's ValidationError)."""
    from deployments.config import AppConfig

    return AppConfig.model_validate(app_args(serve_config))


def app_problems(config: AppConfig) -> list[str]:
    """What a multi-node app config must have, whichever recipe runs it."""
    problems = []
    if config.sessions.store.kind != "redis":
        problems.append(
            f"{SERVE_CONFIG}: sessions.store.kind is {config.sessions.store.kind!r}: Routers on several "
            f"hosts need the Redis store"
        )
    if config.engine.autoscaling is None:
        problems.append(f"{SERVE_CONFIG}: engine.autoscaling is not set")
    elif config.engine.check_fits_at_build:
        problems.append(
            f"{SERVE_CONFIG}: engine.check_fits_at_build must be false: autoscaled GPU nodes may not "
            f"exist yet when the app is built"
        )
    if config.router.autoscaling is None:
        problems.append(f"{SERVE_CONFIG}: router.autoscaling is not set")
    return problems


def capacity_problems(recipe: str, config: AppConfig, groups: list[NodeGroup]) -> list[str]:
    """The largest cluster a recipe can grow to hosts the Engine's `max_replicas` (whole, one per bundle)."""
    engine = config.engine
    max_replicas = (
        engine.num_replicas if engine.autoscaling is None else engine.autoscaling.max_replicas
    )
    per_group = {group.name: _replicas_per_node(engine, group) for group in groups}
    hosting = [group for group in groups if per_group[group.name] > 0]
    if not hosting:
        return [
            f"{recipe}: no worker group can host an Engine replica ({engine.num_gpus_per_replica} GPUs, "
            f"{engine.num_cpus_per_replica:g} CPUs, {dict(engine.custom_resources)} on one node)"
        ]
    reachable = sum(per_group[group.name] * group.max_nodes for group in hosting)
    if reachable < max_replicas:
        return [
            f"{recipe}: the GPU groups grow to {reachable} Engine replicas, the app scales to "
            f"{max_replicas}: raise the groups' maximum node count or lower max_replicas"
        ]
    return []


def _replicas_per_node(engine: EngineConfig, group: NodeGroup) -> int:
    fits = [
        group.num_cpus / engine.num_cpus_per_replica if engine.num_cpus_per_replica else math.inf
    ]
    if engine.num_gpus_per_replica:
        fits.append(group.num_gpus / engine.num_gpus_per_replica)
    for name, amount in engine.custom_resources.items():
        fits.append(group.custom_resources.get(name, 0) / amount)
    return int(min(fits))


def redis_host(config: AppConfig) -> tuple[str, int] | None:
    """(host, port) of the Redis session store; None with another store."""
    url = config.sessions.store.redis_url
    if config.sessions.store.kind != "redis" or url is None:
        return None
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or 6379


# ---- KubeRay ----------------------------------------------------------------------------------------------
def rayservice_problems(text: str, serve_config_text: str, config: AppConfig) -> list[str]:
    documents = [doc for doc in yaml.safe_load_all(text) if doc]
    services = [doc for doc in documents if doc.get("kind") == "RayService"]
    if len(services) != 1:
        return [f"{RAYSERVICE}: expected one RayService, found {len(services)}"]
    spec = services[0]["spec"]
    problems = []
    if spec.get("serveConfigV2") != serve_config_text:
        problems.append(
            f"{RAYSERVICE}: serveConfigV2 is not {SERVE_CONFIG} (run `python -m cluster.recipes --write`)"
        )
    cluster = spec["rayClusterConfig"]
    if str(cluster["headGroupSpec"].get("rayStartParams", {}).get("num-cpus")) != "0":
        problems.append(
            f"{RAYSERVICE}: the head must run no replicas (rayStartParams num-cpus: '0')"
        )
    if not cluster.get("enableInTreeAutoscaling"):
        problems.append(
            f"{RAYSERVICE}: enableInTreeAutoscaling is off: Serve asks for replicas no node has room for"
        )
    groups = [_kuberay_group(group) for group in cluster.get("workerGroupSpecs", [])]
    problems += capacity_problems(RAYSERVICE, config, groups)
    redis = redis_host(config)
    if redis is None:
        return problems
    host, port = redis
    redis_services = [
        doc
        for doc in documents
        if doc.get("kind") == "Service"
        and doc["metadata"]["name"] == host
        and any(p.get("port") == port for p in doc["spec"].get("ports", []))
    ]
    if not redis_services:
        problems.append(f"{RAYSERVICE}: no Service {host!r} on port {port} for the session store")
    return problems


def _kuberay_group(group: Mapping[str, Any]) -> NodeGroup:
    [container] = group["template"]["spec"]["containers"][:1]
    limits = container.get("resources", {}).get("limits", {})
    params = group.get("rayStartParams", {})
    custom = yaml.safe_load(params["resources"]) if "resources" in params else {}
    return NodeGroup(
        name=group["groupName"],
        num_gpus=float(limits.get("nvidia.com/gpu", 0)),
        num_cpus=float(params.get("num-cpus", limits.get("cpu", 0))),
        custom_resources=custom,
        max_nodes=int(group.get("maxReplicas", group.get("replicas", 0))),
    )


# ---- ray up -------------------------------------------------------------------------------------------------
def ray_cluster_problems(text: str, config: AppConfig) -> list[str]:
    spec = yaml.safe_load(text)
    problems = []
    if SERVE_CONFIG not in (spec.get("file_mounts") or {}).values():
        problems.append(f"{RAY_CLUSTER}: file_mounts does not carry {SERVE_CONFIG} to the nodes")
    types = spec["available_node_types"]
    head = types[spec["head_node_type"]]
    if head.get("resources", {}).get("CPU") != 0:
        problems.append(f"{RAY_CLUSTER}: the head must run no replicas (resources: {{CPU: 0}})")
    groups = [
        NodeGroup(
            name=name,
            num_gpus=float(node.get("resources", {}).get("GPU", 0)),
            num_cpus=float(node.get("resources", {}).get("CPU", 0)),
            custom_resources={
                k: v for k, v in node.get("resources", {}).items() if k not in ("CPU", "GPU")
            },
            max_nodes=min(int(node.get("max_workers", 0)), int(spec.get("max_workers", 0))),
        )
        for name, node in types.items()
        if name != spec["head_node_type"]
    ]
    problems += capacity_problems(RAY_CLUSTER, config, groups)
    redis = redis_host(config)
    if redis is None:
        return problems
    host, port = redis
    head_setup = " ".join(spec.get("head_setup_commands", []))
    worker_setup = " ".join(spec.get("worker_setup_commands", []))
    if "redis-server" not in head_setup or f"--port {port}" not in head_setup:
        problems.append(f"{RAY_CLUSTER}: head_setup_commands start no redis-server on port {port}")
    if host not in head_setup or host not in worker_setup:
        problems.append(
            f"{RAY_CLUSTER}: the head and the workers must resolve {host!r} (the session store's host)"
        )
    return problems


# ---- all of it ------------------------------------------------------------------------------------------------
def problems(repo: Path = REPO) -> list[str]:
    from pydantic import ValidationError

    serve_config_text = (repo / SERVE_CONFIG).read_text()
    try:
        config = app_config(yaml.safe_load(serve_config_text))
    except ValidationError as error:
        return [f"{SERVE_CONFIG}: the args are not a valid AppConfig:\n{error}"]
    return [
        *app_problems(config),
        *rayservice_problems((repo / RAYSERVICE).read_text(), serve_config_text, config),
        *ray_cluster_problems((repo / RAY_CLUSTER).read_text(), config),
    ]


def write_rayservice(repo: Path = REPO) -> None:
    """Replaces the literal block after `serveConfigV2: |` with serve_config.trtllm.yaml, indented."""
    path = repo / RAYSERVICE
    lines = path.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip() == _SERVE_CONFIG_KEY)
    key_indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines) and (
        not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > key_indent
    ):
        end += 1
    block = textwrap.indent((repo / SERVE_CONFIG).read_text(), " " * (key_indent + 2))
    path.write_text("".join([*lines[: start + 1], block, *lines[end:]]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--write", action="store_true", help=f"copy {SERVE_CONFIG} into {RAYSERVICE}"
    )
    args = parser.parse_args(argv)
    if args.write:
        write_rayservice()
    found = problems()
    for problem in found:
        print(problem)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
