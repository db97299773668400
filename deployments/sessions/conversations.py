"""The Conversations API on sessions: a conversation is a session (same store, same turns, same ids), created
with items instead of a system prompt. Turns on it go through `chains.py`; this module edits its items.

Items arrive and leave as chat-template messages (the Router converts them, `protocol_responses.py`); an edit
holds the session's turn lease, so it never interleaves with a turn (409 while one runs).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from typing import Any

from deployments.errors import ConflictError, NotFoundError
from deployments.sessions.chains import check_tool_outputs
from deployments.sessions.manager import SessionManager
from deployments.sessions.state import SessionState
from deployments.sessions.store import SessionStore

Messages = list[dict[str, Any]]


def new_conversation_id() -> str:
    """160 bits from the OS CSPRNG, URL-safe; OpenAI's `conv_` prefix."""
    return "conv_" + secrets.token_urlsafe(20)


class Conversations:
    """Creates conversations and edits their items; reads and deletes go through the `SessionManager`."""

    def __init__(
        self, store: SessionStore, sessions: SessionManager, model: str, *, turn_timeout_s: float
    ) -> None:
        self._store = store
        self._sessions = sessions
        self._model = model
        self._turn_timeout_s = turn_timeout_s

    async def create(
        self, owner: str, messages: Messages, items: list[dict[str, Any]], metadata: dict[str, str]
    ) -> SessionState:
        check_tool_outputs([], items, field="items")
        return await self._sessions.create(
            owner,
            self._model,
            system_prompt=None,
            tools=None,
            metadata=metadata,
            session_id=new_conversation_id(),
            messages=messages,
        )

    async def get(self, owner: str, conversation_id: str) -> SessionState:
        try:
            return await self._sessions.get(owner, conversation_id)
        except NotFoundError as error:
            raise NotFoundError(
                f"conversation {conversation_id!r} does not exist",
                param="conversation_id",
                code="conversation_not_found",
            ) from error

    async def delete(self, owner: str, conversation_id: str) -> None:
        await self.get(owner, conversation_id)
        await self._store.delete(conversation_id)

    async def update_metadata(
        self, owner: str, conversation_id: str, metadata: dict[str, str]
    ) -> SessionState:
        def update(state: SessionState) -> None:
            state.metadata = metadata

        return await self._edit(owner, conversation_id, update)

    async def append(
        self, owner: str, conversation_id: str, messages: Messages, items: list[dict[str, Any]]
    ) -> SessionState:
        """Adds items after the last (`items` as given, to check their function call outputs); the next
        turn still continues the stored ids, which remain a prefix of the rendering."""

        def append(state: SessionState) -> None:
            check_tool_outputs(state.messages, items, field="items")
            state.messages = [*state.messages, *messages]
            state.head_response_id = None  # the head response no longer holds every message

        return await self._edit(owner, conversation_id, append)

    async def rewrite(
        self, owner: str, conversation_id: str, edit: Callable[[Messages], Messages | None]
    ) -> SessionState:
        """Replaces the messages with `edit(messages)` (None: the item is not there, 404). The stored ids
        no longer match the history, so the next turn renders it whole."""

        def rewrite(state: SessionState) -> None:
            edited = edit(list(state.messages))
            if edited is None:
                raise NotFoundError(
                    f"conversation {conversation_id!r} has no such item",
                    param="item_id",
                    code="item_not_found",
                )
            state.messages, state.prompt_text, state.token_ids = edited, "", []
            state.head_response_id = None

        return await self._edit(owner, conversation_id, rewrite)

    async def _edit(
        self, owner: str, conversation_id: str, change: Callable[[SessionState], None]
    ) -> SessionState:
        state = await self.get(owner, conversation_id)
        token = await self._store.acquire_turn(conversation_id, ttl_s=self._turn_timeout_s)
        if token is None:
            raise ConflictError(
                f"conversation {conversation_id!r} is generating a response; edit it afterwards",
                param="conversation_id",
                code="session_busy",
            )
        try:
            state = await self.get(owner, conversation_id)  # as of the lease
            change(state)
            await self._store.save(state)
            return state
        finally:
            # Shielded like a turn's release: the lease must go even when the request is cancelled.
            await asyncio.shield(self._store.release_turn(conversation_id, token))
