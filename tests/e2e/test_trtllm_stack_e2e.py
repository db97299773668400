"""The whole router stack on the TensorRT-LLM backend: real Ray Serve, HTTP, the bindings double; and, in the
same cluster, a tensor-parallel transformers engine whose rank dies.

The app runs in a subprocess (`python -m tests.e2e.test_trtllm_stack_e2e CONFIG`) with its own fresh
local Ray, because this pytest process may already drive the suite's `serve run` cluster. It serves
`build_app` with `engine.kind: trtllm` over a double engine dir whose vocabulary is the embedded
tokenizer's, and answers one JSON command per stdin line (Engine handle calls, deploying and deleting
the TP=2 apps) with one JSON line on stdout. The double appends what its engine was asked, and how each
request ended, to `$SHEPHERD_TRTLLM_DOUBLE_RECORD`, which this process reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import httpx
import psutil
import pytest
import yaml

from cluster.local import REPO, kill_session, local_ray, merge
from deployments.executors.hf_tp import RANK_MODULE
from tests.e2e.conftest import MODEL as TINY_MODEL
from tests.e2e.conftest import TINY_CONFIG
from tests.trtllm_support import (
    require_double,
    require_mpi,
    wait_until_gone,
    worker_pythonpath,
    write_double_engine,
)

pytestmark = pytest.mark.e2e

APP, APP_TP2 = "trtllm", "trtllm-tp2"
APP_TRANSFORMERS_TP2 = "transformers-tp2"
MODEL = "shepherd-tiny-trtllm"
API_KEY = "trtllm-stack-key"
REPLY_PREFIX = "TRTLLM-STACK "
SYSTEM_PROMPT = "You are a terse assistant."
START_TIMEOUT_S = 180  # generous: a loaded 2-core machine takes a minute to start Ray and Serve
# 10 ms per engine iteration: short replies take a fraction of a second, a long one takes seconds.
ENGINE_OPTIONS: dict[str, Any] = {
    "iter_latency_ms": 10.0,
    "tokens_per_block": 16,
    "num_kv_blocks": 1024,
    "max_input_len": 1024,
    "max_seq_len": 2048,
}
NUM_CANCELLED_MAX_TOKENS = 1500  # ~15 s of decoding: only a cancellation ends it within the test


# ---- the subprocess: one local Ray cluster, the apps, and a command loop -------------------------
def app_args(engine_dir: str, tokenizer_dir: str, *, num_gpus: int) -> dict[str, Any]:
    return {
        "model": {"path": engine_dir, "tokenizer_path": tokenizer_dir, "served_model_name": MODEL},
        "engine": {
            "kind": "trtllm",
            "num_gpus_per_replica": num_gpus,
            # The tokenizer beside the engine turns on guided decoding (xgrammar on the C++ runtime).
            "trtllm": {"stats_period_s": 0.05, "tokenizer_dir": tokenizer_dir},
        },
    }


def _private_channel() -> tuple[TextIO, TextIO]:
    """(commands, replies): this process's stdin and stdout moved to fds no child inherits.

    Every process below this one inherits fds 0 and 1 (Ray's daemons, its workers and, from a TP=2
    replica, Open MPI's orted), and orted forwards its stdin to rank 0: left on fd 0, a command
    could be read by orted instead of this loop. Children get /dev/null and stderr instead.
    """
    commands = os.fdopen(os.dup(0), "r")  # os.dup: not inheritable (PEP 446)
    replies = os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    return commands, replies


def _reply(replies: TextIO, payload: dict[str, Any]) -> None:
    replies.write(REPLY_PREFIX + json.dumps(payload) + "\n")
    replies.flush()


def _execute(command: dict[str, Any], config: dict[str, Any]) -> Any:
    from ray import serve

    from deployments import build_app

    op = command["op"]
    if op == "stats":
        stats = (
            serve.get_deployment_handle("Engine", app_name=command["app"]).stats.remote().result()
        )
        return dataclasses.asdict(stats.executor)
    if op == "deploy_tp2":
        args = app_args(config["engine_dir_tp2"], config["tokenizer_dir"], num_gpus=2)
        serve.run(build_app(args), name=APP_TP2, route_prefix="/tp2")
        return None
    if op == "delete_tp2":
        serve.delete(APP_TP2)  # blocks until the replica ran Engine.__del__ and exited
        return None
    if op == "deploy":
        serve.run(build_app(command["args"]), name=command["app"], route_prefix=command["prefix"])
        return None
    if op == "delete":
        serve.delete(command["app"])
        return None
    if op == "exit":
        return None
    raise ValueError(f"unknown command {op!r}")


def main() -> None:
    config = json.loads(sys.argv[1])
    commands, replies = _private_channel()
    # Fake GPUs: the double needs none, but placement reserves num_gpus_per_replica (1 for TP=1, 2 for TP=2).
    # CPUs: room for every app at once, and for a replacement Engine beside the one it replaces.
    with local_ray(num_cpus=6, num_gpus=3) as context:
        # Replica logs, for a failure's post-mortem: app.log (this process's stderr) names them.
        print(f"Ray session: {context.address_info['session_dir']}", file=sys.stderr, flush=True)
        _serve_commands(config, commands, replies)


def _serve_commands(config: dict[str, Any], commands: TextIO, replies: TextIO) -> None:
    from ray import serve

    from deployments import build_app

    try:
        serve.start(http_options={"host": "127.0.0.1", "port": config["port"]})
        args = app_args(config["engine_dir"], config["tokenizer_dir"], num_gpus=1)
        serve.run(build_app(args), name=APP, route_prefix="/")
        _reply(replies, {"ok": True, "result": {"port": config["port"], "pid": os.getpid()}})
        while line := commands.readline():
            command = json.loads(line)
            started = time.monotonic()
            try:
                _reply(replies, {"ok": True, "result": _execute(command, config)})
            except Exception:
                _reply(replies, {"ok": False, "error": traceback.format_exc()})
            elapsed_s = time.monotonic() - started
            print(f"command {command['op']} took {elapsed_s:.2f}s", file=sys.stderr, flush=True)
            if command["op"] == "exit":
                break
    finally:
        # A TP=2 replica still up would leave its MPI daemon behind (it runs in a session of its own):
        # stop it gracefully; every other process goes with the cluster.
        for name in (APP_TP2, APP_TRANSFORMERS_TP2):
            if name in serve.status().applications:
                serve.delete(name)


# ---- the pytest side -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def session_pids(session_id: int) -> dict[int, str]:
    """Live (non-zombie) processes of a session, with their command lines."""
    out = subprocess.run(
        ["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True
    ).stdout
    found = {}
    for line in out.splitlines():
        pid, sid, stat, *args = line.split(None, 3)
        if int(sid) == session_id and not stat.startswith("Z") and int(pid) != os.getpid():
            found[int(pid)] = args[0] if args else ""
    return found


class Stack:
    """The subprocess: its HTTP address, its command channel and the double's record."""

    def __init__(
        self, process: subprocess.Popen[str], port: int, record_path: Path, log_path: Path
    ) -> None:
        self.process = process
        self.base_url = f"http://127.0.0.1:{port}"
        self.record_path = record_path
        self.log_path = log_path
        self._replies: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(REPLY_PREFIX):
                self._replies.put(line.removeprefix(REPLY_PREFIX))
        self._replies.put(None)  # the subprocess closed stdout: it exited

    def wait_reply(self, timeout_s: float) -> Any:
        try:
            line = self._replies.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"no reply within {timeout_s}s:\n{self.log_tail()}") from None
        if line is None:
            raise AssertionError(
                f"the app subprocess exited ({self.process.poll()}):\n{self.log_tail()}"
            )
        reply = json.loads(line)
        assert reply["ok"], reply["error"]
        return reply["result"]

    def command(self, op: str, timeout_s: float = 60.0, **fields: Any) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        return self.wait_reply(timeout_s)

    def record(self, since: int = 0) -> list[dict[str, Any]]:
        """The double's record (enqueue, cancel, final, error events in causal order), from `since`."""
        if not self.record_path.exists():
            return []
        return [
            json.loads(line) for line in self.record_path.read_text().splitlines()[since:] if line
        ]

    def client(self, prefix: str = "") -> Any:
        from openai import OpenAI

        return OpenAI(
            base_url=f"{self.base_url}{prefix}/v1", api_key=API_KEY, max_retries=0, timeout=60
        )

    def log_tail(self) -> str:
        return self.log_path.read_text()[-4000:] if self.log_path.exists() else ""


@pytest.fixture(scope="module")
def stack(
    model_dir: Path, tokenizer: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    require_double(
        "the engine's vocabulary must be the embedded tokenizer's; the tests read the double's record"
    )
    root = tmp_path_factory.mktemp("trtllm-stack")
    vocab_size = len(tokenizer)
    engine_dir = write_double_engine(root / "engine-tp1", vocab_size=vocab_size, **ENGINE_OPTIONS)
    engine_dir_tp2 = write_double_engine(
        root / "engine-tp2", tp_size=2, vocab_size=vocab_size, **ENGINE_OPTIONS
    )
    port = _free_port()
    config = {
        "port": port,
        "engine_dir": str(engine_dir),
        "engine_dir_tp2": str(engine_dir_tp2),
        "tokenizer_dir": str(model_dir),
    }
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        "RAY_AUTH_MODE": "disabled",
        # The repo and, without the real tensorrt_llm, the double: the real module wins when installed.
        "PYTHONPATH": worker_pythonpath(),
        "SHEPHERD_CACHE_DIR": str(root / "cache"),  # a fresh SQLite session store
        "SHEPHERD_API_KEYS": API_KEY,
        "SHEPHERD_TRTLLM_DOUBLE_RECORD": str(root / "double-record.jsonl"),
        "PYTHONUNBUFFERED": "1",
    }
    log_path = root / "app.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.test_trtllm_stack_e2e", json.dumps(config)],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
        )
    app = Stack(process, port, root / "double-record.jsonl", log_path)
    # MPI daemons start their own session (orted --set-sid): find them as descendants, not by session.
    descendants: dict[int, Any] = {}
    try:
        ready = app.wait_reply(START_TIMEOUT_S)
        assert ready["port"] == port
        yield app
        descendants = descendant_processes(process.pid)
        app.command("exit", timeout_s=60)
        process.wait(timeout=30)
    finally:
        descendants = descendants or descendant_processes(process.pid)
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        process.kill()
        kill_session(process.pid)  # whatever Ray daemons the subprocess's cluster left behind
        deadline = time.monotonic() + 15
        while (left := session_pids(process.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        escaped = describe(wait_until_exited(descendants, timeout_s=5))
        for pid in escaped:
            descendants[pid].kill()  # psutil checks the start time: never a reused pid
    # No orphans: nothing of the app's session, nor any process that ever ran below the app, still runs.
    assert not left, f"processes of the app's session still run: {left}"
    assert not escaped, f"processes outside the app's session outlived it: {escaped}"


def descendant_processes(pid: int) -> dict[int, Any]:
    """The processes below `pid` now, as psutil handles (which know their start time: pids get reused)."""
    import psutil

    try:
        return {child.pid: child for child in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return {}


def wait_until_exited(processes: dict[int, Any], timeout_s: float) -> dict[int, Any]:
    """Polls until none of `processes` runs (a zombie has exited); returns those still running."""
    import psutil

    def is_running(process: Any) -> bool:
        try:
            return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout_s
    while (
        left := {pid: p for pid, p in processes.items() if is_running(p)}
    ) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def describe(processes: dict[int, Any]) -> dict[int, str]:
    described = {}
    for pid, process in processes.items():
        try:
            described[pid] = " ".join(process.cmdline())
        except Exception:  # gone meanwhile
            described[pid] = "?"
    return described


def chat(client: Any, content: str, **kwargs: Any) -> Any:
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        **{"max_tokens": 24, "temperature": 0, **kwargs},
    )


def greedy_tokens(prompt_token_ids: list[int], num_tokens: int, vocab_size: int) -> list[int]:
    """What the double's "model" decodes greedily after a prompt."""
    from tensorrt_llm.bindings.executor._engine import next_token

    context = list(prompt_token_ids)
    for _ in range(num_tokens):
        context.append(next_token(context, vocab_size=vocab_size)[0])
    return context[len(prompt_token_ids) :]


def stream_chat(client: Any, content: str, **kwargs: Any) -> tuple[list[str], list[float], Any]:
    """(content pieces, arrival time of each, the last chunk)."""
    pieces, arrivals, last = [], [], None
    for chunk in chat(
        client, content, stream=True, stream_options={"include_usage": True}, **kwargs
    ):
        last = chunk
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            arrivals.append(time.monotonic())
    return pieces, arrivals, last


def test_streamed_chat_arrives_in_pieces_and_equals_the_whole_greedy_reply(
    stack: Stack, tokenizer: Any
) -> None:
    client = stack.client()
    prompt = "Explain paged KV caches in one line."
    mark = len(stack.record())
    pieces, arrivals, last = stream_chat(client, prompt, max_tokens=32)
    whole = chat(client, prompt, max_tokens=32)
    # 32 tokens at 10 ms per engine step: several SSE chunks, spread over the decoding time.
    assert len(pieces) >= 3, pieces
    assert arrivals[-1] - arrivals[0] > 0.05
    assert "".join(pieces) == whole.choices[0].message.content
    assert last.usage.completion_tokens == whole.usage.completion_tokens == 32
    assert last.choices == [] and whole.choices[0].finish_reason == "length"
    # Both went to the double as streaming requests of one prompt, ending on the tokenizer's end id.
    asked = [e for e in stack.record(mark) if e["event"] == "enqueue"]
    assert len(asked) == 2 and asked[0]["input_token_ids"] == asked[1]["input_token_ids"]
    assert all(e["streaming"] and e["end_id"] == tokenizer.eos_token_id for e in asked)
    assert all(e["retention"] is None for e in asked)  # no session, no system prompt to pin


def test_a_json_schema_reaches_the_engine_as_its_guide_and_lark_needs_llguidance(
    stack: Stack,
) -> None:
    import openai

    client = stack.client()
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    mark = len(stack.record())
    response_format = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    chat(client, "answer in JSON", max_tokens=4, response_format=response_format)
    chat(client, "any object", max_tokens=4, response_format={"type": "json_object"})
    asked = [e["guided_decoding"] for e in stack.record(mark) if e["event"] == "enqueue"]
    assert asked == [["JSON_SCHEMA", json.dumps(schema)], ["JSON", None]]
    # A forced tool call is a Lark grammar, which xgrammar (the C++ runtime's backend) does not read.
    weather = {"type": "function", "function": {"name": "get_weather"}}
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client, "weather?", tools=[weather], tool_choice="required")
    assert refused.value.body["param"] == "tool_choice"


def test_three_session_turns_continue_exact_tokens_and_pin_the_system_prompt(
    stack: Stack, tokenizer: Any
) -> None:
    from deployments.templating import ChatTemplate

    headers = {"authorization": f"Bearer {API_KEY}"}
    created = httpx.post(
        f"{stack.base_url}/v1/sessions", json={"system_prompt": SYSTEM_PROMPT}, headers=headers
    )
    assert created.status_code == 200, created.text
    session_id = created.json()["id"]
    client = stack.client()
    mark = len(stack.record())
    replies = [
        chat(client, f"turn {k}: tell me more", max_tokens=8, extra_body={"session_id": session_id})
        for k in range(3)
    ]

    # What the engine was asked, in order: the double records every enqueued Request.
    prompts = [e["input_token_ids"] for e in stack.record(mark) if e["event"] == "enqueue"]
    assert len(prompts) == 3
    for k in range(2):
        previous, current, reply = prompts[k], prompts[k + 1], replies[k]
        # Turn k+1 starts with turn k's prompt and then the very tokens the engine generated for it.
        num_generated = reply.usage.completion_tokens
        assert current[: len(previous)] == previous
        generated = current[len(previous) : len(previous) + num_generated]
        assert generated == greedy_tokens(previous, num_generated, len(tokenizer))
        assert tokenizer.decode(current[len(previous) :]).startswith(
            reply.choices[0].message.content + "<|im_end|>"
        )
    assert all(r.model_extra["session"]["is_prefix_continued"] for r in replies[1:])
    view = httpx.get(f"{stack.base_url}/v1/sessions/{session_id}", headers=headers).json()
    assert (
        view["num_turns"] == 3
        and view["num_tokens"] == len(prompts[-1]) + replies[-1].usage.completion_tokens
    )

    # Every turn's engine Request pins the system prompt's KV blocks: [0, len(system)) at priority 100.
    system_ids = ChatTemplate(tokenizer).render(
        [{"role": "system", "content": SYSTEM_PROMPT}], add_generation_prompt=False
    )
    asked = {tuple(e["input_token_ids"]): e for e in stack.record(mark) if e["event"] == "enqueue"}
    for prompt_token_ids in prompts:
        assert prompt_token_ids[: len(system_ids)] == system_ids
        retention = asked[tuple(prompt_token_ids)]["retention"]
        assert retention == {
            "token_ranges": [[0, len(system_ids), 100]],
            "decode_retention_priority": 35,
        }


def test_client_disconnect_cancels_the_request_in_the_engine(stack: Stack) -> None:
    before = stack.command("stats", app=APP)
    mark = len(stack.record())
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "write a very long story"}],
        "max_tokens": NUM_CANCELLED_MAX_TOKENS,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"authorization": f"Bearer {API_KEY}"}
    with httpx.stream(
        "POST", f"{stack.base_url}/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
    # The connection is closed: the router cancels its engine call, the executor calls cancel_request,
    # and the double ends the request with CANCELLED long before 1,500 tokens.
    deadline = time.monotonic() + 20
    while True:
        record = stack.record(mark)
        asked = [e for e in record if e["event"] == "enqueue"]
        assert len(asked) == 1 and asked[0]["max_tokens"] == NUM_CANCELLED_MAX_TOKENS, asked
        events = [
            e
            for e in record
            if e["request_id"] == asked[0]["request_id"] and e["pid"] == asked[0]["pid"]
        ]
        finals = [e for e in events if e["event"] == "final"]
        if finals:
            break
        assert time.monotonic() < deadline, f"the engine request did not end: {events}"
        time.sleep(0.1)
    assert [e["event"] for e in events] == ["enqueue", "cancel", "final"]
    assert finals[0]["finish_reason"] == "CANCELLED"
    assert finals[0]["num_generated_tokens"] < NUM_CANCELLED_MAX_TOKENS
    deadline = time.monotonic() + 10
    while True:
        stats = stack.command("stats", app=APP)
        if (
            stats["num_cancelled_requests"] == before["num_cancelled_requests"] + 1
            and stats["num_active_requests"] == 0
        ):
            break
        assert time.monotonic() < deadline, f"the executor did not count the cancellation: {stats}"
        time.sleep(0.1)


@pytest.mark.mpi
def test_tp2_orchestrator_serves_over_http_and_its_mpi_workers_exit_with_the_app(
    stack: Stack,
) -> None:
    require_mpi()
    stack.command("deploy_tp2", timeout_s=150)
    prompt = "Explain tensor parallelism in one line."
    mark = len(stack.record())
    tp2 = stack.client("/tp2")
    pieces, _, _ = stream_chat(tp2, prompt)
    whole = chat(tp2, prompt)
    assert len(pieces) >= 3 and "".join(pieces) == whole.choices[0].message.content
    # The double's model does not depend on the layout: TP=2 replies exactly as TP=1 does.
    assert (
        whole.choices[0].message.content == chat(stack.client(), prompt).choices[0].message.content
    )

    # The TP=2 replica is the orchestrator: it enqueued in its own process and spawned the two ranks.
    # Enqueued since `mark`: TP=2 twice, then TP=1 once.
    pids = [e["pid"] for e in stack.record(mark) if e["event"] == "enqueue"]
    assert len(pids) == 3 and pids[0] == pids[1] != pids[2], pids
    tp2_pid = pids[0]
    assert tp2_pid in descendant_processes(stack.process.pid)
    mpi_processes = descendant_processes(tp2_pid)  # the MPI daemon (orted) and the ranks it started
    workers = [
        cmd for cmd in describe(mpi_processes).values() if "tensorrt_llm/bin/executorWorker" in cmd
    ]
    assert len(workers) == 2, describe(mpi_processes)

    stack.command("delete_tp2", timeout_s=60)
    left = wait_until_exited(mpi_processes, timeout_s=15)
    assert not left, f"MPI processes outlived their replica: {describe(left)}"


# ---- a tensor-parallel transformers engine whose rank dies ---------------------------------------
# It runs in this module's cluster: a cluster and `serve run` of its own cost a minute on two cores.
REPLACEMENT_TIMEOUT_S = 180.0


def rank_pids(session_id: int) -> list[int]:
    """Rank processes whose ancestry leads into the app subprocess's session (its replicas start Open MPI's
    daemon, which starts the ranks in a session of its own)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if RANK_MODULE not in (process.info["cmdline"] or []):
                continue
            if any(os.getsid(parent.pid) == session_id for parent in process.parents()):
                found.append(process.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def answer(client: Any, *, stream: bool) -> str:
    num_tokens = 8
    reply = client.chat.completions.create(
        model=TINY_MODEL,
        messages=[{"role": "user", "content": "hello there"}],
        max_tokens=num_tokens,
        temperature=0,
        stream=stream,
    )
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
    assert reply.usage.completion_tokens == num_tokens
    return str(reply.choices[0].message.content)


@pytest.mark.mpi
def test_a_tensor_parallel_replica_serves_and_is_replaced_whole_when_a_rank_dies(
    stack: Stack, model_dir: Path
) -> None:
    """The suite's tiny app with a transformers engine of two ranks on the CPU (the second spawned through
    MPI by the Engine replica): the OpenAI API end to end, a rank that dies takes its whole replica with it
    and Serve starts a new one, and no rank outlives the app."""
    require_mpi()
    import openai

    args = yaml.safe_load((REPO / TINY_CONFIG).read_text())["applications"][0]["args"]
    overrides = {
        "model": {"path": str(model_dir)},
        "engine": {
            "transformers": {"tensor_parallel_size": 2, "num_blocks": 32},
            # A dead rank fails three health checks in a row before Serve replaces the replica.
            "health_check_period_s": 0.5,
        },
    }
    stack.command(
        "deploy",
        timeout_s=START_TIMEOUT_S,
        app=APP_TRANSFORMERS_TP2,
        prefix=f"/{APP_TRANSFORMERS_TP2}",
        args=merge(args, overrides),
    )
    session_id = stack.process.pid
    client = stack.client(f"/{APP_TRANSFORMERS_TP2}")
    seen: list[int] = []
    # 1) the OpenAI API through a TP=2 replica
    whole = answer(client, stream=False)
    assert answer(client, stream=True) == whole
    ranks = rank_pids(session_id)
    assert len(ranks) == 1
    seen += ranks

    # 2) a dead rank fails the replica's health check; Serve replaces the replica with all its ranks
    os.kill(ranks[0], signal.SIGKILL)
    deadline = time.monotonic() + REPLACEMENT_TIMEOUT_S
    replaced: str | None = None
    while replaced is None and time.monotonic() < deadline:
        new_ranks = [pid for pid in rank_pids(session_id) if pid not in seen]
        if new_ranks:
            seen += new_ranks
            try:
                replaced = answer(client, stream=False)
            except openai.APIError:
                pass  # the new replica is still starting, or the router has not seen it yet
        time.sleep(0.25)
    assert replaced == whole, stack.log_tail()
    assert len(rank_pids(session_id)) == 1

    # 3) stopping the app ends every rank it ever had
    stack.command("delete", app=APP_TRANSFORMERS_TP2)
    assert wait_until_gone(seen, timeout_s=30) == []


if __name__ == "__main__":
    main()
