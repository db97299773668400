"""Stored responses as nodes of a tree of token spans: what a node is, and what a store does with nodes.

A node is one stored response. It knows its token parent (the node whose exact prompt+completion ids begin its
own) and keeps only the span it added: its new prompt suffix, its completion, and the messages of both. A
chain's ids are the spans from its base (a node with no token parent, which holds all of its ids) down to its
head; two responses that continue the same node share everything above it, in storage and on the engine.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field, fields
from typing import Any, Protocol


def new_response_id() -> str:
    """160 bits from the OS CSPRNG; OpenAI's `resp_` prefix."""
    return "resp_" + secrets.token_hex(20)


@dataclass(slots=True)
class ResponseNode:
    """One stored response (see the module docstring).

    `root_id` is the chain's routing key: the first response of the chain, or the conversation it was made
    in, so a chain and its forks reach the engine replica that holds their common prefix.
    `is_stored` is False for a response created with `store: false`: only its id and owner are kept, so that
    continuing it can be refused with a clear message rather than "not found".
    `is_deleted` is set by the store: a deleted node answers 404, but its span stays while other nodes
    continue from it.
    """

    response_id: str
    owner: str
    root_id: str
    parent_id: str | None = None
    span_text: str = ""
    span_token_ids: list[int] = field(default_factory=list)
    span_messages: list[dict[str, Any]] = field(default_factory=list)
    response: dict[str, Any] | None = None  # the Response object as it was answered
    input_items: list[dict[str, Any]] = field(default_factory=list)
    conversation_id: str | None = None
    is_stored: bool = True
    is_deleted: bool = False
    created_at: float = field(default_factory=time.time)

    def to_json(self) -> str:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "is_deleted"}
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, *, is_deleted: bool = False) -> ResponseNode:
        return cls(**json.loads(text), is_deleted=is_deleted)


class ResponseNodeStore(Protocol):
    """Response nodes in the session store (`sqlite_nodes.py`, `redis_nodes.py`), per owner, with the store's
    idle TTL.

    Expiry: saving a node refreshes the idle TTL of every node above it, so a node never expires before a
    node that continues from it; a chain whose head is live is whole.
    Threading: coroutines for the router's event loop, like the rest of the store.
    """

    async def save_node(self, node: ResponseNode) -> bool:
        """Stores a new node and refreshes its ancestors' idle TTL.

        Returns: False, storing nothing, when `node.parent_id` names a node that is gone (expired or removed).
        """
        ...

    async def load_chain(self, response_id: str) -> list[ResponseNode]:
        """The node and its token ancestors, newest first, ending with the base node (no parent); deleted
        nodes included (`is_deleted`). Empty when the node is gone or its chain is broken."""
        ...

    async def delete_node(self, response_id: str) -> bool:
        """Marks the node deleted, then removes it, and deleted ancestors, once no node continues from them.

        Returns: True if a live, not yet deleted node was deleted.
        """
        ...
