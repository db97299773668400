"""Bad input gets an OpenAI-shaped 4xx naming the field: never a 5xx, never a hung stream."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.e2e.conftest import AUTH, MODEL

pytestmark = pytest.mark.e2e
OK_MESSAGES = [{"role": "user", "content": "hi"}]

CASES = [
    ("missing messages", {"model": MODEL}, 400, "messages"),
    ("empty messages", {"model": MODEL, "messages": []}, 400, "messages"),
    ("unknown model", {"model": "gpt-9", "messages": OK_MESSAGES}, 404, "model"),
    (
        "max_tokens zero",
        {"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 0},
        400,
        "max_tokens",
    ),
    (
        "max_tokens negative",
        {"model": MODEL, "messages": OK_MESSAGES, "max_tokens": -5},
        400,
        "max_tokens",
    ),
    (
        "temperature negative",
        {"model": MODEL, "messages": OK_MESSAGES, "temperature": -0.1},
        400,
        "temperature",
    ),
    ("top_p zero", {"model": MODEL, "messages": OK_MESSAGES, "top_p": 0}, 400, "top_p"),
    ("top_p above one", {"model": MODEL, "messages": OK_MESSAGES, "top_p": 1.5}, 400, "top_p"),
    (
        "bad role",
        {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages.0.role",
    ),
    (
        "max_tokens over window",
        {"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 5000},
        400,
        "max_tokens",
    ),
    ("seed unsupported", {"model": MODEL, "messages": OK_MESSAGES, "seed": 7}, 400, "seed"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("name", "body", "status", "param"), CASES, ids=[c[0] for c in CASES])
def test_bad_chat_request_is_refused_naming_the_field(
    base_url: str, name: str, body: dict[str, Any], status: int, param: str, stream: bool
) -> None:
    response = httpx.post(
        f"{base_url}/v1/chat/completions", json={**body, "stream": stream}, timeout=30, headers=AUTH
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert param.split(".")[0] in error["message"]


def test_invalid_json_is_a_400(base_url: str) -> None:
    response = httpx.post(
        f"{base_url}/v1/chat/completions",
        content=b"{not json",
        headers={**AUTH, "content-type": "application/json"},
    )
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]


def test_body_that_is_not_an_object_is_a_400(base_url: str) -> None:
    response = httpx.post(f"{base_url}/v1/chat/completions", json=[1, 2], headers=AUTH)
    assert response.status_code == 400


def test_prompt_longer_than_the_context_window(base_url: str) -> None:
    long_text = "token cache engine replica " * 1200
    body = {"model": MODEL, "messages": [{"role": "user", "content": long_text}], "stream": True}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=30, headers=AUTH)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "messages"


def test_openai_client_sees_a_bad_request_error(client: Any) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=OK_MESSAGES, temperature=-1)
    assert "temperature" in str(raised.value)


def test_completions_reject_suffix_and_out_of_vocabulary_ids(base_url: str) -> None:
    url = f"{base_url}/v1/completions"
    suffix = httpx.post(url, json={"model": MODEL, "prompt": "a", "suffix": "b"}, headers=AUTH)
    assert suffix.status_code == 400 and suffix.json()["error"]["param"] == "suffix"
    oov = httpx.post(url, json={"model": MODEL, "prompt": [1, 99999]}, headers=AUTH)
    assert oov.status_code == 400 and oov.json()["error"]["param"] == "prompt"
