"""Both HTTP ingresses. `serve run serve_config.yaml` starts HAProxy, which forwards HTTP straight to the Router
replica's own server; the suite's shared app (tests/e2e/serve_config.tiny.yaml, the same ingress settings) runs
behind it, so every e2e test goes through HAProxy (test_haproxy_ingress.py checks how). Serve's own proxy actor,
one setting away, must behave the same: streaming, errors, and a client that goes away mid-turn. A machine that
cannot provide the configured ingress stops the start with a message naming what to change.

This module starts apps of its own and takes no part of the shared one, so that it runs beside its modules. The
Serve-proxy app runs two Engine replicas (the suite's only app with more than one): it also shows that a Responses
chain, and a fork of it, reach the replica that holds their prefix's KV cache."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cluster.local import free_port, joined_ray, kill_session, serve_app, with_own_side_ports
from deployments.ingress import serve_applies_controller_options
from tests.e2e.conftest import AUTH, MODEL, REPO, TINY_CONFIG, ServeApp, app_env
from tests.e2e.processes import named, session_processes
from tests.e2e.session_calls import create_session, cut_a_turn_short, get_session

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not serve_applies_controller_options(),
        reason="LOUD SKIP: this Ray has no HAProxy ingress (controller_options); the suite ran on Serve's proxy",
    ),
]


def _config(path: Path, port: int, **env_vars: str) -> Path:
    """The suite's tiny config (serve_config.yaml's ingress) on `port`, with `env_vars` over its controller
    environment, and HAProxy's other ports moved too: the session's shared app may hold the default ones."""
    spec = yaml.safe_load((REPO / TINY_CONFIG).read_text())
    spec["http_options"] = {**spec["http_options"], "port": port}
    spec["controller_options"]["runtime_env"]["env_vars"].update(env_vars)
    path.write_text(yaml.safe_dump(with_own_side_ports(spec)))
    return path


# The failed start comes first, before the Serve-proxy app below starts: a Ray starting beside that app's
# idle replicas takes half as long again on a 2-core machine.
def _failed_start(config: Path, model_dir: Path) -> str:
    """`serve run CONFIG` on a Ray of its own, expected to exit at start; returns its output."""
    serve_bin = Path(sys.executable).parent / "serve"
    process = subprocess.Popen(
        [str(serve_bin), "run", "--address", "local", str(config)],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **app_env(model_dir)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"serve run did not stop at start:\n{output[-4000:]}")
    finally:
        kill_session(process.pid)
    assert process.returncode != 0
    return output


def _ingress_error(output: str) -> str:
    """The check's message: from its first line to the end of its list."""
    start = output.rindex("the serve config asks for an ingress")
    lines = output[start:].splitlines()
    end = next((i for i, line in enumerate(lines[1:], 1) if not line.startswith("- ")), len(lines))
    return "\n".join(lines[:end])


def test_a_machine_without_the_ingress_stops_the_start_naming_what_to_change(
    model_dir: Path, tmp_path: Path
) -> None:
    # Both problems at once (one `serve run`, one Ray start): the check lists every problem it finds.
    port = free_port()
    missing = tmp_path / "no-haproxy-here"
    config = _config(
        tmp_path / "serve_config.yaml", port, RAY_SERVE_HAPROXY_BINARY_PATH=str(missing)
    )
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        output = _failed_start(config, model_dir)
    assert _ingress_error(output) == (
        "the serve config asks for an ingress (HAProxy) this machine cannot provide:\n"
        f"- RAY_SERVE_HAPROXY_BINARY_PATH='{missing}' does not point to an executable file. "
        'Or use Serve\'s own proxy instead: set RAY_SERVE_ENABLE_HA_PROXY: "0" in '
        "controller_options.runtime_env.env_vars.\n"
        f"- HAProxy's HTTP frontend cannot bind 127.0.0.1:{port}: the port is in use. "
        "Stop what listens there or change http_options.port."
    )


@pytest.fixture(scope="module")
def serve_proxy_app(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeApp]:
    port = free_port()
    workdir = tmp_path_factory.mktemp("serve-proxy")
    config = _config(workdir / "serve-proxy.yaml", port, RAY_SERVE_ENABLE_HA_PROXY="0")
    # Two Engine replicas in Ray's logical CPUs of a 2-core machine (each still runs one torch thread).
    engine = {"num_replicas": 2, "num_cpus_per_replica": 0.5}
    with serve_app(
        config,
        port=port,
        args={"engine": engine},
        env=app_env(model_dir),
        ready_headers=AUTH,
        workdir=workdir,
    ) as app:
        processes = session_processes(app.process.pid)
        assert not named(processes, "haproxy"), "HAProxy runs although the config turned it off"
        assert named(processes, "ProxyActor")
        yield app


@pytest.fixture(scope="module")
def serve_proxy_url(serve_proxy_app: ServeApp) -> str:
    return serve_proxy_app.base_url


def _client(base_url: str) -> Any:
    import openai

    return openai.OpenAI(
        base_url=f"{base_url}/v1",
        api_key=AUTH["authorization"].split()[1],
        max_retries=0,
        timeout=60,
    )


def test_streamed_and_whole_replies_agree_behind_serves_proxy(serve_proxy_url: str) -> None:
    client = _client(serve_proxy_url)
    messages = [{"role": "user", "content": "hello there"}]
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0
    )
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    assert len(chunks) > 2  # a role chunk, text chunks, a finish chunk
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        whole.choices[0].message.content
    )
    assert whole.usage.completion_tokens == 12


def test_bad_input_is_a_400_naming_the_field_behind_serves_proxy(serve_proxy_url: str) -> None:
    reply = httpx.post(
        f"{serve_proxy_url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -1},
        headers=AUTH,
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "max_tokens"


def test_a_client_gone_mid_turn_frees_the_session_behind_serves_proxy(
    serve_proxy_url: str,
) -> None:
    session_id = create_session(serve_proxy_url)
    # The proxy passes the disconnect on: the Router cancels the turn and releases the session.
    cut_a_turn_short(serve_proxy_url, session_id, "a long one")
    view = get_session(serve_proxy_url, session_id).json()
    assert view["num_turns"] == 1  # the cut turn left no trace; the 2-token one is kept
    assert [m["content"] for m in view["messages"][::2]] == ["a long one"]


@pytest.fixture(scope="module")
def engine_stats(serve_proxy_app: ServeApp) -> Iterator[Callable[[str], Any]]:
    """`Engine.stats` of the replica that owns a session id, as Serve's handle routes it (the same ring the
    Router's own engine client uses), from a driver joined to the Serve-proxy app's cluster."""
    from ray import serve

    with joined_ray(serve_proxy_app.ray_address):
        engine = serve.get_deployment_handle("Engine", app_name="shepherd")
        yield lambda session_id: engine.options(session_id=session_id).stats.remote().result()


def _instructions(k: int) -> str:
    """A system prompt of its own per chain, long enough to fill whole KV pages (64 tokens) that the engine
    can share: only the replica that served the chain holds them."""
    return f"Chain {k}. You answer in one word. " + " ".join(
        f"rule {j}: keep the prefix warm on its replica" for j in range(12)
    )


def test_response_chains_and_forks_continue_on_the_replica_that_holds_their_prefix(
    serve_proxy_app: ServeApp, engine_stats: Callable[[str], Any], tokenizer: Any
) -> None:
    client = _client(serve_proxy_app.base_url)

    def respond(text: str, instructions: str, previous: Any = None) -> Any:
        return client.responses.create(
            model=MODEL,
            input=text,
            instructions=instructions,
            previous_response_id=previous.id if previous is not None else None,
            max_output_tokens=4,
            temperature=0,
            extra_body={"return_token_ids": True},
        )

    # 1) Chain roots until two of them belong to different replicas (a chain is routed by its root's id).
    roots: dict[str, tuple[Any, str]] = {}
    for k in range(16):
        root = respond("start", _instructions(k))
        roots.setdefault(engine_stats(root.id).replica_id, (root, _instructions(k)))
        if len(roots) == 2:
            break
    assert len(roots) == 2, "16 chains all hashed to one replica"

    # 2) Continue each chain twice, and fork the first: each continuation is served by the replica that
    # served its chain so far, from that replica's KV cache, and no other replica sees it.
    (first_id, (first, first_instructions)), (second_id, _) = roots.items()
    before_all = {
        replica_id: engine_stats(root.id).executor for replica_id, (root, _) in roots.items()
    }
    served: dict[str, list[Any]] = {replica_id: [] for replica_id in roots}
    for replica_id, texts in ((first_id, ["next", "and then"]), (second_id, ["next", "and then"])):
        parent, instructions = roots[replica_id]
        root_id = parent.id  # the chain's routing key, whichever turn it is at
        for text in texts:
            before = engine_stats(root_id).executor
            parent = respond(text, instructions, parent)
            after = engine_stats(root_id)
            assert after.replica_id == replica_id
            assert after.executor.num_submitted_requests == before.num_submitted_requests + 1
            assert after.executor.num_cached_prompt_tokens > before.num_cached_prompt_tokens, text
            assert parent.usage.input_tokens_details.cached_tokens > 0
            served[replica_id].append(parent)
    before = engine_stats(first.id).executor
    fork = respond("fork", first_instructions, first)
    after = engine_stats(first.id)
    assert after.replica_id == first_id
    assert after.executor.num_cached_prompt_tokens > before.num_cached_prompt_tokens
    served[first_id].append(fork)
    for replica_id, (root, _) in roots.items():
        stats = engine_stats(root.id).executor
        added = stats.num_submitted_requests - before_all[replica_id].num_submitted_requests
        assert added == len(served[replica_id]), (replica_id, added)

    # 3) The fork and the branch it left continue from the same ids: the parent's exact prompt, then its
    # reply's exact ids (the ids of the reply's text where the decoding hid a special token).
    branch = served[first_id][0]
    parent_prompt, parent_output = (
        first.model_extra[key] for key in ("prompt_token_ids", "output_token_ids")
    )
    num_kept = branch.usage.input_tokens_details.cached_tokens
    assert fork.usage.input_tokens_details.cached_tokens == num_kept > len(parent_prompt)
    fork_ids, branch_ids = (
        fork.model_extra["prompt_token_ids"],
        branch.model_extra["prompt_token_ids"],
    )
    assert fork_ids[:num_kept] == branch_ids[:num_kept] and fork_ids != branch_ids
    assert fork_ids[: len(parent_prompt)] == parent_prompt
    if tokenizer.decode(parent_output, skip_special_tokens=False) == first.output_text:
        assert fork_ids[:num_kept] == parent_prompt + parent_output
    # The fork's greedy reply is what the same ids give without any stored state.
    replay = client.completions.create(model=MODEL, prompt=fork_ids, max_tokens=4, temperature=0)
    assert replay.choices[0].text == fork.output_text
