"""Bad input, generated and hand-written: never a 5xx, never a hang, and the server still serves afterwards.

The generated part fuzzes every route of the app's own OpenAPI schema with schemathesis (positive and
negative cases, >= 1,000 in all, deterministic: `derandomize=True`). The handlers read raw JSON, so the
served schema has no request bodies; they are added here from the `deployments.protocol` models, unless
the schema already declares one. Positive bodies are bounded so the CPU model answers fast (`model` is the
served one and `max_tokens <= 8`, `n <= 2`); negative bodies are not bounded at all.

`SHEPHERD_FUZZ_BASE_URL` points the module at an already running server instead of the suite's app.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import AUTH, MODEL

# `target` takes the shared app through getfixturevalue (or another server): tests/conftest.py cannot see it.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("shared-serve-app")]

REQUEST_TIMEOUT_S = 30.0
OK_MESSAGES = [{"role": "user", "content": "hi"}]
# (method, path) -> (positive, negative) examples; paths without inputs only have one distinct case.
ROUTES: dict[tuple[str, str], tuple[int, int]] = {
    # Chat bodies are the costliest to draw (about 0.15 s each on a 2-core machine, in Hypothesis itself).
    ("POST", "/v1/chat/completions"): (150, 150),
    ("POST", "/v1/completions"): (130, 130),
    ("POST", "/tokenize"): (70, 70),
    ("POST", "/detokenize"): (50, 50),
    ("POST", "/v1/sessions"): (50, 50),
    # A path parameter is any string: there is no negative case to generate for it.
    ("GET", "/v1/sessions/{session_id}"): (80, 0),
    ("DELETE", "/v1/sessions/{session_id}"): (80, 0),
    ("POST", "/v1/responses"): (40, 40),
    ("GET", "/v1/responses/{response_id}"): (15, 0),
    ("DELETE", "/v1/responses/{response_id}"): (15, 0),
    ("GET", "/v1/responses/{response_id}/input_items"): (15, 0),
    ("POST", "/v1/conversations"): (20, 20),
    ("GET", "/v1/conversations/{conversation_id}"): (15, 0),
    ("POST", "/v1/conversations/{conversation_id}"): (15, 15),
    ("DELETE", "/v1/conversations/{conversation_id}"): (15, 0),
    ("GET", "/v1/conversations/{conversation_id}/items"): (15, 0),
    ("POST", "/v1/conversations/{conversation_id}/items"): (15, 15),
    ("GET", "/v1/conversations/{conversation_id}/items/{item_id}"): (15, 0),
    ("DELETE", "/v1/conversations/{conversation_id}/items/{item_id}"): (15, 0),
    ("GET", "/v1/models"): (5, 0),
    ("GET", "/health"): (5, 0),
    ("GET", "/metrics"): (5, 0),
}
MIN_TOTAL_CASES = 1000
BODY_MODELS = {
    "/v1/chat/completions": "ChatCompletionRequest",
    "/v1/completions": "CompletionRequest",
    "/tokenize": "TokenizeRequest",
    "/detokenize": "DetokenizeRequest",
    "/v1/sessions": "CreateSessionRequest",
    "/v1/responses": "protocol_responses:ResponsesRequest",
    "/v1/conversations": "protocol_responses:ConversationCreateRequest",
    "/v1/conversations/{conversation_id}": "protocol_responses:ConversationUpdateRequest",
    "/v1/conversations/{conversation_id}/items": "protocol_responses:ItemsCreateRequest",
}
# Positive bodies reach the engine: keep each generation short (see the module docstring).
POSITIVE_BOUNDS: dict[str, dict[str, Any]] = {
    "model": {"const": MODEL},
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": 8},
    "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": 8},
    "max_output_tokens": {"type": "integer", "minimum": 1, "maximum": 8},
    "n": {"type": "integer", "minimum": 1, "maximum": 2},
}
executed: dict[str, int] = {}


# ---- the target and its schema -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def target(request: pytest.FixtureRequest) -> str:
    url = os.environ.get("SHEPHERD_FUZZ_BASE_URL")
    return url.rstrip("/") if url else str(request.getfixturevalue("base_url"))


@pytest.fixture(scope="module")
def served_schema(target: str) -> dict[str, Any]:
    response = httpx.get(f"{target}/openapi.json", timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, response.text
    schema: dict[str, Any] = response.json()
    return schema


def with_bodies(served: dict[str, Any], *, positive: bool) -> dict[str, Any]:
    """The served schema plus JSON request bodies from the protocol models (bounded when `positive`)."""
    import importlib

    schema = copy.deepcopy(served)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, model_name in BODY_MODELS.items():
        operation = schema["paths"].get(path, {}).get("post")
        if operation is None or "requestBody" in operation:
            continue
        module, _, model_name = model_name.rpartition(":")
        models = importlib.import_module(f"deployments.{module or 'protocol'}")
        body = getattr(models, model_name).model_json_schema(
            ref_template="#/components/schemas/{model}"
        )
        components.update(body.pop("$defs", {}))
        if positive and "model" in body.get("properties", {}):
            body["properties"].update(
                {k: v for k, v in POSITIVE_BOUNDS.items() if k in body["properties"]}
            )
            for bound in ("max_tokens", "max_output_tokens"):
                if bound in body["properties"]:
                    body["required"] = sorted({*body.get("required", []), bound})
        components[model_name] = body
        operation["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model_name}"}}
            },
        }
    return schema


@pytest.fixture(scope="module")
def schemas(served_schema: dict[str, Any]) -> dict[str, Any]:
    import schemathesis

    return {
        mode: schemathesis.openapi.from_dict(
            with_bodies(served_schema, positive=mode == "positive")
        )
        for mode in ("positive", "negative")
    }


def is_openai_error(response: Any) -> bool:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)


# ---- generated cases --------------------------------------------------------------------------------------
def test_every_route_of_the_schema_is_fuzzed(served_schema: dict[str, Any]) -> None:
    served = {
        (method.upper(), path) for path, ops in served_schema["paths"].items() for method in ops
    }
    assert served <= set(ROUTES), f"add to ROUTES: {sorted(served - set(ROUTES))}"


@pytest.mark.parametrize(("method", "path"), list(ROUTES), ids=[f"{m} {p}" for m, p in ROUTES])
def test_generated_requests_never_get_a_5xx_or_hang(
    schemas: dict[str, Any], served_schema: dict[str, Any], target: str, method: str, path: str
) -> None:
    import requests  # schemathesis's transport
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    if method.lower() not in served_schema["paths"].get(path, {}):
        pytest.skip(f"{method} {path} is not in this server's schema")
    failures: list[str] = []
    label = f"{method} {path}"
    session = requests.Session()
    for mode, max_examples in zip(("positive", "negative"), ROUTES[(method, path)], strict=True):
        if max_examples == 0:
            continue
        operation = schemas[mode][path][method]
        strategy = operation.as_strategy(generation_mode=GenerationMode(mode))

        @settings(
            max_examples=max_examples,
            derandomize=True,
            database=None,
            deadline=None,
            # No shrinking: every failure is collected below, with its curl command.
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def run(case: Any) -> None:
            executed[label] = executed.get(label, 0) + 1
            started = time.monotonic()
            try:
                response = case.call(
                    base_url=target, session=session, headers=AUTH, timeout=REQUEST_TIMEOUT_S
                )
            except Exception as error:  # a timeout or a dropped connection is a failure too
                failures.append(f"{type(error).__name__}: {error}\n  {case.as_curl_command()}")
                return
            elapsed = time.monotonic() - started
            if response.status_code >= 500:
                failures.append(
                    f"{response.status_code} {response.text[:300]}\n  {case.as_curl_command()}"
                )
            elif method == "POST" and response.status_code >= 400 and not is_openai_error(response):
                failures.append(f"not OpenAI-shaped: {response.status_code} {response.text[:300]}")
            elif elapsed > REQUEST_TIMEOUT_S:
                failures.append(f"took {elapsed:.1f} s\n  {case.as_curl_command()}")

        run()
    assert not failures, f"{len(failures)} failing cases, first ones:\n" + "\n".join(failures[:5])


def test_zz_at_least_1000_cases_ran_and_the_server_still_serves(
    target: str, served_schema: dict[str, Any], request: pytest.FixtureRequest
) -> None:
    selected = [
        item.callspec.params
        for item in request.session.items
        if getattr(item, "originalname", None)
        == test_generated_requests_never_get_a_5xx_or_hang.__name__
    ]
    if len(selected) < len(ROUTES):
        pytest.skip("only part of the fuzz was selected (a -k selection)")
    # Every route the server serves must have been fuzzed; one that was selected but never ran fails here.
    served = [
        f"{params['method']} {params['path']}"
        for params in selected
        if params["method"].lower() in served_schema["paths"].get(params["path"], {})
    ]
    assert served and all(executed.get(label, 0) > 0 for label in served), (served, executed)
    total = sum(executed.values())
    print(f"fuzz: {total} generated cases", json.dumps(executed))
    assert total >= MIN_TOTAL_CASES, executed
    assert_still_serving(target)


def assert_still_serving(base_url: str) -> None:
    assert (
        httpx.get(f"{base_url}/v1/models", headers=AUTH, timeout=REQUEST_TIMEOUT_S).status_code
        == 200
    )
    body = {"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 4}
    reply = httpx.post(
        f"{base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=REQUEST_TIMEOUT_S
    )
    assert reply.status_code == 200, reply.text
    with httpx.stream(
        "POST",
        f"{base_url}/v1/chat/completions",
        json={**body, "stream": True},
        headers=AUTH,
        timeout=30,
    ) as stream:
        lines = [line for line in stream.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


# ---- hand-written cases -----------------------------------------------------------------------------------
def post_raw(
    base_url: str, path: str, content: bytes, content_type: str = "application/json"
) -> httpx.Response:
    headers = {**AUTH, "content-type": content_type}
    return httpx.post(
        f"{base_url}{path}", content=content, headers=headers, timeout=REQUEST_TIMEOUT_S
    )


def chat_bytes(**overrides: Any) -> bytes:
    # json.dumps escapes lone surrogates as "\udXXX", exactly what a buggy client puts on the wire.
    return json.dumps(
        {"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 2, **overrides}
    ).encode()


def deep(levels: int) -> Any:
    value: Any = []
    for _ in range(levels):
        value = [value]
    return value


BAD_BODIES: list[tuple[str, str, bytes, str]] = [
    ("deeply nested array", "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, "deeper"),
    (
        "deeply nested object",
        "/v1/chat/completions",
        b'{"a":' * 5000 + b"1" + b"}" * 5000,
        "deeper",
    ),
    (
        "deep tools",
        "/v1/chat/completions",
        chat_bytes(tools=[{"type": "function", "x": deep(500)}]),
        "deeper",
    ),
    (
        "deep session tools",
        "/v1/sessions",
        json.dumps({"tools": [{"x": deep(900)}]}).encode(),
        "deeper",
    ),
    (
        "invalid UTF-8",
        "/v1/chat/completions",
        b'{"model": "x", "messages": [{"content": "\xff\xfe"}]}',
        "JSON",
    ),
    ("truncated JSON", "/v1/completions", b'{"model": "shepherd-tiny", "prompt": "a', "JSON"),
    (
        "lone surrogate in a message",
        "/v1/chat/completions",
        chat_bytes(messages=[{"role": "user", "content": "\ud800"}]),
        "surrogate",
    ),
    (
        "lone surrogate in a prompt",
        "/v1/completions",
        json.dumps({"model": MODEL, "prompt": "a\udfff"}).encode(),
        "surrogate",
    ),
    (
        "lone surrogate in a stop string",
        "/v1/chat/completions",
        chat_bytes(stop=["\udc00"]),
        "surrogate",
    ),
    (
        "lone surrogate in session metadata",
        "/v1/sessions",
        json.dumps({"metadata": {"k": "\ud800"}}).encode(),
        "surrogate",
    ),
    (
        "lone surrogate in a system prompt",
        "/v1/sessions",
        json.dumps({"system_prompt": "\ud800"}).encode(),
        "surrogate",
    ),
    (
        "NaN temperature",
        "/v1/chat/completions",
        chat_bytes().replace(b'"max_tokens"', b'"temperature": NaN, "max_tokens"'),
        "temperature",
    ),
    (
        "Infinity penalty",
        "/v1/chat/completions",
        chat_bytes().replace(b'"max_tokens"', b'"presence_penalty": Infinity, "max_tokens"'),
        "presence_penalty",
    ),
    ("negative max_tokens", "/v1/chat/completions", chat_bytes(max_tokens=-1), "max_tokens"),
    ("huge max_tokens", "/v1/chat/completions", chat_bytes(max_tokens=10**30), "max_tokens"),
    (
        "huge max_completion_tokens",
        "/v1/chat/completions",
        chat_bytes(max_completion_tokens=10**30),
        "max_tokens",
    ),
    ("huge top_k", "/v1/chat/completions", chat_bytes(top_k=10**30), "top_k"),
    ("top_k past int64", "/v1/chat/completions", chat_bytes(top_k=2**63), "top_k"),
    ("huge temperature", "/v1/chat/completions", chat_bytes(temperature=1e308), "temperature"),
    ("huge n", "/v1/chat/completions", chat_bytes(n=10**9), "n"),
    (
        "huge token id",
        "/v1/completions",
        json.dumps({"model": MODEL, "prompt": [2**70]}).encode(),
        "prompt",
    ),
    (
        "negative token id",
        "/v1/completions",
        json.dumps({"model": MODEL, "prompt": [-1]}).encode(),
        "prompt",
    ),
    ("a number as the session id", "/v1/chat/completions", chat_bytes(session_id=5), "session_id"),
    ("form-encoded body", "/v1/chat/completions", b"model=shepherd-tiny&messages=hi", "JSON"),
    ("a JSON array body", "/v1/completions", b"[1, 2, 3]", "object"),
]


@pytest.mark.parametrize(
    ("name", "path", "content", "mentions"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES]
)
def test_bad_body_is_a_clear_400(
    target: str, name: str, path: str, content: bytes, mentions: str
) -> None:
    content_type = (
        "application/x-www-form-urlencoded" if name == "form-encoded body" else "application/json"
    )
    response = post_raw(target, path, content, content_type)
    assert response.status_code == 400, response.text[:500]
    assert is_openai_error(response) and mentions in response.json()["error"]["message"], (
        response.text[:500]
    )


def test_body_over_the_size_cap_is_a_413_before_it_is_read(target: str) -> None:
    huge = b'{"model": "shepherd-tiny", "prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    started = time.monotonic()
    response = post_raw(target, "/v1/completions", huge)
    assert response.status_code == 413, response.text[:300]
    assert response.json()["error"]["code"] == "request_too_large"
    assert time.monotonic() - started < 20


def test_json_with_a_wrong_content_type_is_read_as_json(target: str) -> None:
    """Lenient like the OpenAI API: the body decides; text/plain JSON works, non-JSON is a 400 (above)."""
    response = post_raw(target, "/v1/chat/completions", chat_bytes(), "text/plain")
    assert response.status_code == 200, response.text[:300]


@pytest.mark.parametrize(
    "session_id",
    ["sess_not_ours_" + "x" * 20, "x" * 10_000, "../../etc/passwd", "' OR 1=1 --", "%00"],
)
def test_session_ids_that_are_not_ours_are_404(target: str, session_id: str) -> None:
    chat = httpx.post(
        f"{target}/v1/chat/completions",
        json={"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 2, "session_id": session_id},
        headers=AUTH,
        timeout=REQUEST_TIMEOUT_S,
    )
    assert chat.status_code == 404 and chat.json()["error"]["code"] == "session_not_found", (
        chat.text[:300]
    )
    by_header = httpx.post(
        f"{target}/v1/chat/completions",
        json={"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 2},
        headers={**AUTH, "x-session-id": session_id.encode("latin-1", "replace").decode("latin-1")},
        timeout=REQUEST_TIMEOUT_S,
    )
    assert by_header.status_code == 404, by_header.text[:300]
    view = httpx.get(f"{target}/v1/sessions/{session_id}", headers=AUTH, timeout=REQUEST_TIMEOUT_S)
    assert view.status_code < 500  # 404, or a 307/404 from path normalisation of "../"


def test_a_stalled_upload_does_not_hold_the_server(target: str) -> None:
    """A client that declares a body and never sends it: other requests keep being served meanwhile."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(target)
    with socket.create_connection((parts.hostname, parts.port or 80), timeout=5) as stalled:
        stalled.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: {AUTH['authorization']}\r\nContent-Length: 1000\r\n\r\n{{".encode()
        )
        assert_still_serving(target)


def test_cors_is_off_by_default(target: str) -> None:
    origin = {"origin": "https://evil.example"}
    preflight = httpx.options(
        f"{target}/v1/chat/completions",
        headers={**origin, "access-control-request-method": "POST"},
        timeout=REQUEST_TIMEOUT_S,
    )
    simple = httpx.get(f"{target}/v1/models", headers={**AUTH, **origin}, timeout=REQUEST_TIMEOUT_S)
    for response in (preflight, simple):
        assert response.status_code < 500
        assert not any(h.startswith("access-control-") for h in response.headers), response.headers


@pytest.fixture(scope="module", autouse=True)
def still_serving_after_the_module(target: str) -> Iterator[None]:
    """Later modules share the app: wait (bounded) until it serves, should a case have broken it."""
    yield
    deadline = time.monotonic() + 90
    while True:
        try:
            assert_still_serving(target)
            return
        except (AssertionError, httpx.HTTPError):
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
