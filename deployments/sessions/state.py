"""What a session is, as stored: its messages and the exact token ids the engine has seen."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from deployments.token_packing import pack_token_ids, unpack_token_ids


def new_session_id() -> str:
    """160 bits from the OS CSPRNG, URL-safe."""
    return "sess_" + secrets.token_urlsafe(20)


@dataclass(slots=True)
class Eviction:
    """One eviction: which messages left the context window, and when."""

    at_turn: int
    num_messages: int
    num_tokens_freed: int
    roles: list[str]
    created_at: float = field(default_factory=time.time)


@dataclass(slots=True)
class SessionState:
    """One conversation. `messages` excludes the system prompt (kept apart, never evicted).

    `prompt_text`/`token_ids` are the exact text and ids the engine last saw (prompt + generated ids): the
    next turn appends only its newly templated suffix to them, so the engine's prefix cache hits.
    `version` increases on every save (optimistic concurrency between router replicas).
    `head_response_id` is the stored response (`nodes.py`) whose exact ids these are, when the last turn was a
    Responses API turn; any other change clears it.
    """

    session_id: str
    owner: str
    model: str
    system_prompt: str | None = None
    tools: list[dict[str, Any]] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)
    prompt_text: str = ""
    token_ids: list[int] = field(default_factory=list)
    num_turns: int = 0
    evictions: list[Eviction] = field(default_factory=list)
    num_template_breaks: int = 0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    version: int = 0
    head_response_id: str | None = None

    def to_json(self) -> str:
        # Shallow on purpose: `asdict` deep-copies every token id (10x slower for a long session).
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["evictions"] = [asdict(e) for e in self.evictions]
        # Packed: every turn saves the whole history's ids, and JSON numbers cost ~1 ms per 6k ids.
        data["token_ids"] = pack_token_ids(self.token_ids)
        # ASCII escapes keep lone surrogates (valid JSON, invalid UTF-8) storable.
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SessionState:
        data = json.loads(text)
        data["evictions"] = [Eviction(**e) for e in data.get("evictions", [])]
        data["token_ids"] = unpack_token_ids(data.get("token_ids", []))
        return cls(**data)
