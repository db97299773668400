"""The KubeRay and `ray up` recipes in cluster/ run serve_config.trtllm.yaml, and a drift of either fails here."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from cluster import recipes

FILES = (recipes.SERVE_CONFIG, recipes.RAYSERVICE, recipes.RAY_CLUSTER)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    for name in FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(recipes.REPO / name, tmp_path / name)
    return tmp_path


def edit_yaml(path: Path, change: Callable[[dict], None]) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_the_recipes_agree_with_the_app_they_deploy() -> None:
    assert recipes.problems() == []


def test_an_app_config_edit_without_write_is_drift_and_write_repairs_it(repo: Path) -> None:
    def more_replicas(config: dict) -> None:
        config["applications"][0]["args"]["engine"]["autoscaling"]["min_replicas"] = 3

    edit_yaml(repo / recipes.SERVE_CONFIG, more_replicas)
    assert [p for p in recipes.problems(repo) if "serveConfigV2" in p]
    recipes.write_rayservice(repo)
    assert recipes.problems(repo) == []
    service = next(d for d in yaml.safe_load_all((repo / recipes.RAYSERVICE).read_text()) if d)
    # The write kept the rest of the file (the Redis objects come first).
    assert service["kind"] == "Service"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda args: args["sessions"].update(store={"kind": "sqlite"}), "Redis store"),
        (lambda args: args["engine"].pop("autoscaling"), "engine.autoscaling is not set"),
        (lambda args: args["router"].pop("autoscaling"), "router.autoscaling is not set"),
        (lambda args: args["engine"].update(check_fits_at_build=True), "check_fits_at_build"),
        (lambda args: args["engine"].update(num_replicas=2), "mutually exclusive"),
        (
            lambda args: args["engine"]["autoscaling"].update(max_replicas=9),
            "grow to 8 Engine replicas, the app scales to 9",
        ),
        (lambda args: args["engine"].update(num_gpus_per_replica=8), "no worker group can host"),
        (
            lambda args: args["sessions"]["store"].update(redis_url="redis://elsewhere:6380/0"),
            "'elsewhere'",
        ),
    ],
)
def test_each_app_drift_is_named(repo: Path, change: Callable[[dict], None], expected: str) -> None:
    edit_yaml(repo / recipes.SERVE_CONFIG, lambda c: change(c["applications"][0]["args"]))
    recipes.write_rayservice(repo)
    found = recipes.problems(repo)
    assert any(expected in problem for problem in found), found


def test_node_group_drift_is_named(repo: Path) -> None:
    text = (repo / recipes.RAYSERVICE).read_text()
    (repo / recipes.RAYSERVICE).write_text(
        text.replace("maxReplicas: 4", "maxReplicas: 2").replace('num-cpus: "0"', 'num-cpus: "8"')
    )

    def smaller(cluster: dict) -> None:
        cluster["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 2
        cluster.pop("file_mounts")

    edit_yaml(repo / recipes.RAY_CLUSTER, smaller)
    found = recipes.problems(repo)
    assert any("rayservice.yaml: the GPU groups grow to 4" in p for p in found), found
    assert any("rayservice.yaml: the head must run no replicas" in p for p in found), found
    assert any("ray-cluster.yaml: the GPU groups grow to 4" in p for p in found), found
    assert any("ray-cluster.yaml: file_mounts" in p for p in found), found
