"""The engine channel's wire format: length-prefixed JSON frames, and what a GenerateRequest looks like on it.

Frames are a 4-byte big-endian length, then a JSON array:
  router -> engine   ["g", seq, request]   start a GenerateRequest (`request_to_wire`)
                     ["c", seq]            cancel it (the router's client went away, or a stop string)
  engine -> router   ["d", seq, token_ids, finish_reason, logprobs, num_prompt_tokens, num_cached_tokens,
                      top_logprobs]
                     ["e", seq, error_class, message, param, code]
JSON, not pickle: whoever reaches the port can start a generation, never run code (the same network
trust as Ray's own ports; the socket binds the node's Ray address, not every interface).

Each replica announces `WIRE_VERSION` next to its address. During a rolling upgrade that changes the wire, a
router streams directly only from replicas of its own version; Serve's handle path reaches the rest
(`client.py`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import struct
from typing import Any

from deployments.errors import ERROR_CLASSES, EngineError, ServingError
from deployments.messages import (
    FinishReason,
    GenerateRequest,
    GuidedDecodingSpec,
    RetentionRange,
    SamplingParams,
    TokenDelta,
)
from deployments.token_packing import pack_token_ids, unpack_token_ids

_HEADER = struct.Struct(">I")
_MAX_FRAME_BYTES = 64 << 20  # a prompt of a million token ids fits; a corrupt length does not
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, check_circular=False)
# Bump when frames change meaning while the messages keep their fields, types and finish reasons; a change
# of those changes the fingerprint by itself (annotations are strings here: the same in every process).
# 2: a request's prompt travels packed (`token_packing.py`).
_WIRE_REVISION = 2
_WIRE_LAYOUT = (
    *(
        (cls.__name__, tuple((f.name, str(f.type)) for f in dataclasses.fields(cls)))
        for cls in (GenerateRequest, SamplingParams, GuidedDecodingSpec, RetentionRange, TokenDelta)
    ),
    ("FinishReason", tuple(reason.value for reason in FinishReason)),
)
WIRE_VERSION = f"{_WIRE_REVISION}-" + hashlib.sha256(repr(_WIRE_LAYOUT).encode()).hexdigest()[:12]


def request_to_wire(request: GenerateRequest) -> dict[str, Any]:
    retention = request.retention
    guided = request.guided_decoding
    return {
        "request_id": request.request_id,
        # Packed: the prompt grows with a session's history, and JSON numbers cost ~1 ms per 6k ids.
        "prompt_token_ids": pack_token_ids(request.prompt_token_ids),
        "max_tokens": request.max_tokens,
        # By position, in field order: `request_from_wire` rebuilds them with `SamplingParams(*...)`.
        "sampling": list(dataclasses.astuple(request.sampling)),
        "end_id": request.end_id,
        "pad_id": request.pad_id,
        "stop_token_sequences": request.stop_token_sequences,
        "return_logprobs": request.return_logprobs,
        "session_id": request.session_id,
        "retention": None if retention is None else list(dataclasses.astuple(retention)),
        "num_top_logprobs": request.num_top_logprobs,
        "guided_decoding": None if guided is None else [guided.kind, guided.grammar],
    }


def request_from_wire(wire: dict[str, Any]) -> GenerateRequest:
    retention = wire["retention"]
    guided = wire["guided_decoding"]
    sampling = list(wire["sampling"])
    # `logit_bias` (the last field) arrives as lists; the contract holds tuples.
    sampling[-1] = tuple((int(token_id), float(bias)) for token_id, bias in sampling[-1])
    return GenerateRequest(
        request_id=wire["request_id"],
        prompt_token_ids=unpack_token_ids(wire["prompt_token_ids"]),
        max_tokens=wire["max_tokens"],
        sampling=SamplingParams(*sampling),
        end_id=wire["end_id"],
        pad_id=wire["pad_id"],
        stop_token_sequences=tuple(tuple(seq) for seq in wire["stop_token_sequences"]),
        return_logprobs=wire["return_logprobs"],
        session_id=wire["session_id"],
        retention=None if retention is None else RetentionRange(*retention),
        num_top_logprobs=wire["num_top_logprobs"],
        guided_decoding=None if guided is None else GuidedDecodingSpec(*guided),
    )


def encode_frame(frame: list[Any]) -> bytes:
    payload = _ENCODER.encode(frame).encode()
    return _HEADER.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> list[Any]:
    """Raises asyncio.IncompleteReadError at the end of the stream, ValueError on a malformed frame."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > _MAX_FRAME_BYTES:
        raise ValueError(f"frame of {size} bytes exceeds {_MAX_FRAME_BYTES}")
    frame = json.loads(await reader.readexactly(size))
    if not isinstance(frame, list) or len(frame) < 2:
        raise ValueError("a frame is a JSON array [kind, seq, ...]")
    return frame


def error_from_wire(frame: list[Any]) -> ServingError:
    _, _, class_name, message, param, code = frame
    return ERROR_CLASSES.get(class_name, EngineError)(message, param=param, code=code)


def error_frame(seq: int, error: ServingError) -> list[Any]:
    return ["e", seq, type(error).__name__, error.message, error.param, error.code]
