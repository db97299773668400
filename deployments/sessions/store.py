"""Where sessions live between turns: the async `SessionStore` protocol every backend meets (`sqlite.py`,
`redis.py`, and the LRU `cache.py` in front of either; `backends.py` opens the configured one)."""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Mapping
from typing import Protocol

from deployments.sessions.nodes import ResponseNodeStore
from deployments.sessions.state import SessionState


class SessionStore(ResponseNodeStore, Protocol):
    """Session persistence shared by every router replica (and the Responses API's nodes, `nodes.py`).

    Expiry: a session whose `updated_at` is more than `idle_ttl_s` old is gone for every method
    (`load`/`version_of` return None, `save` conflicts, counts skip it), whether or not it was purged yet.
    Threading: every method is a coroutine for the router's event loop; none blocks it.
    """

    async def create(self, state: SessionState, *, max_sessions_per_owner: int | None) -> None:
        """Stores a new session and sets `state.version = 1` and `state.updated_at` (in place).

        Raises:
            TooManySessions: the owner already has `max_sessions_per_owner` live sessions.
            ConflictError: a live session with this id exists (code `session_exists`).
        """
        ...

    async def load(self, session_id: str) -> SessionState | None: ...

    async def version_of(self, session_id: str) -> int | None:
        """The stored version without the payload (a cache's freshness check); None when gone."""
        ...

    async def save(self, state: SessionState) -> None:
        """Stores `state` if the stored version still equals `state.version`, then increments
        `state.version` and sets `state.updated_at` (in place, only on success).

        Raises:
            ConflictError: another writer saved first (code `version_conflict`) or the session is gone
                (deleted or expired; code `session_gone`).
        """
        ...

    async def delete(self, session_id: str) -> bool:
        """Deletes the session and its lease; True if a live session was deleted."""
        ...

    async def count_for_owner(self, owner: str) -> int: ...

    async def acquire_turn(self, session_id: str, *, ttl_s: float, holder: str = "") -> str | None:
        """Takes the session's generating lease for `ttl_s` seconds across replicas, for `holder` (the
        router replica running the turn, carried in the token). A holder keeps its lease with
        `renew_turns` while the turn runs; a lease whose holder died is free once its TTL runs out.

        Returns: a token for `renew_turns`/`release_turn`, or None while another unexpired lease exists.
        """
        ...

    async def renew_turns(self, leases: Mapping[str, str], *, ttl_s: float) -> list[str]:
        """Extends each lease (session id -> token) still held by its token to `ttl_s` from now.

        Returns: the session ids whose lease was lost (expired and possibly taken by another turn).
        """
        ...

    async def release_turn(self, session_id: str, token: str) -> None:
        """Drops the lease if `token` still holds it (a late release never frees a successor's lease)."""
        ...

    async def purge_expired(self) -> int:
        """Deletes what idle expiry left behind; returns how many expired session records were removed."""
        ...

    async def close(self) -> None: ...


def expiry_cutoff(idle_ttl_s: float | None, now: float) -> float:
    """Sessions with `updated_at >= cutoff` are live."""
    return -math.inf if idle_ttl_s is None else now - idle_ttl_s


def stamped(state: SessionState, *, version: int, updated_at: float) -> str:
    """The JSON of `state` as it will be after a successful write (the caller's object is untouched)."""
    return dataclasses.replace(state, version=version, updated_at=updated_at).to_json()


def new_lease_token(holder: str = "") -> str:
    """Random, and naming its holder (for logs): `holder/random`."""
    return f"{holder}/{secrets.token_urlsafe(16)}"


def lease_holder(token: str) -> str:
    return token.rpartition("/")[0]


def check_ttl(ttl_s: float) -> None:
    if not ttl_s > 0:
        raise ValueError(f"lease ttl_s must be > 0, got {ttl_s}")


CONFLICT_MESSAGE = "session {} was saved by another request; reload it and retry"
GONE_MESSAGE = "session {} was deleted or expired"
