"""Request models: what they refuse before anything runs, each as a 400 naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from deployments.errors import RequestError
from deployments.protocol import ChatCompletionRequest, CreateSessionRequest, parse_request

MESSAGES = [{"role": "user", "content": "hi"}]


def refused(model: Any, body: dict[str, Any]) -> RequestError:
    with pytest.raises(RequestError) as raised:
        parse_request(model, body)
    assert raised.value.status_code == 400
    return raised.value


def test_an_empty_session_id_is_a_400_not_a_stateless_chat() -> None:
    error = refused(ChatCompletionRequest, {"model": "m", "messages": MESSAGES, "session_id": ""})
    assert error.param == "session_id"


def test_a_non_finite_number_in_a_tool_schema_is_a_400_naming_the_tool() -> None:
    """HTTP bodies never carry NaN past `limits.parse_json`; a handle caller's dict can."""
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"t": {"maximum": float("nan")}}},
        },
    }
    error = refused(ChatCompletionRequest, {"model": "m", "messages": MESSAGES, "tools": [tool]})
    assert error.param == "tools.0.function.parameters"
    assert "finite" in error.message and "get_weather" in error.message
    assert refused(CreateSessionRequest, {"tools": [tool]}).param == "tools.0.function.parameters"


def test_session_metadata_is_capped_as_openai_caps_it() -> None:
    long_value = refused(CreateSessionRequest, {"metadata": {"user": "x" * 513}})
    assert long_value.param == "metadata" and "513 characters" in long_value.message
    assert refused(CreateSessionRequest, {"metadata": {"k" * 65: "v"}}).param == "metadata"
    ok = parse_request(CreateSessionRequest, {"metadata": {"k" * 64: "v" * 512}})
    assert ok.metadata == {"k" * 64: "v" * 512}


def test_min_tokens_is_bounded() -> None:
    body = {"model": "m", "messages": MESSAGES, "min_tokens": 10**30}
    assert refused(ChatCompletionRequest, body).param == "min_tokens"
