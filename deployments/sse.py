"""Server-sent-event framing for OpenAI streams."""

from __future__ import annotations

import json

from pydantic import BaseModel

DONE = b"data: [DONE]\n\n"


def encode_chunk(chunk: BaseModel) -> bytes:
    return b"data: " + chunk.model_dump_json().encode() + b"\n\n"


def encode_error(body: dict[str, object]) -> bytes:
    """An error after the stream started: the status is already 200, so the error travels as an event."""
    return b"data: " + json.dumps(body).encode() + b"\n\n"
