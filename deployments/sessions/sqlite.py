"""The SQLite session store: one file in WAL mode, shared by the router replicas of one host."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ParamSpec, TypeVar

from deployments.errors import ConflictError, OverloadedError, TooManySessions
from deployments.sessions.sqlite_nodes import SQLiteNodes, immediate
from deployments.sessions.state import SessionState
from deployments.sessions.store import (
    CONFLICT_MESSAGE,
    GONE_MESSAGE,
    check_ttl,
    expiry_cutoff,
    new_lease_token,
    stamped,
)

P = ParamSpec("P")
T = TypeVar("T")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS sessions (session_id TEXT PRIMARY KEY, owner TEXT NOT NULL, "
    "updated_at REAL NOT NULL, version INTEGER NOT NULL, data TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS sessions_owner ON sessions (owner, updated_at)",
    "CREATE INDEX IF NOT EXISTS sessions_updated_at ON sessions (updated_at)",
    "CREATE TABLE IF NOT EXISTS leases (session_id TEXT PRIMARY KEY, token TEXT NOT NULL, "
    "expires_at REAL NOT NULL)",
)


class SQLiteSessionStore(SQLiteNodes):
    """One SQLite file in WAL mode; several processes (router replicas) may open the same file. Response
    nodes live in the same file (`sqlite_nodes.py`).

    Threading: one connection, used only by one dedicated worker thread, so calls run one at a time off the
    event loop. The connection opens lazily on that thread at the first call.
    """

    def __init__(self, path: str, *, idle_ttl_s: float | None, busy_timeout_s: float = 5.0) -> None:
        self.path = path
        self.idle_ttl_s = idle_ttl_s
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="sqlite-session-store"
        )
        self._conn: sqlite3.Connection | None = None  # worker thread only
        self._is_closed = False

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if self._is_closed:
            raise RuntimeError("SQLiteSessionStore is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, functools.partial(fn, *args, **kwargs)
            )
        except sqlite3.OperationalError as e:
            # busy_timeout elapsed while other replicas held the write lock.
            if "locked" in str(e) or "busy" in str(e):
                raise OverloadedError(f"session store busy: {e}") from e
            raise

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit transactions; every write below opens BEGIN IMMEDIATE itself.
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            conn.execute("PRAGMA journal_mode = WAL")
            # In WAL mode NORMAL survives process crashes; only a power loss can drop the last commits.
            conn.execute("PRAGMA synchronous = NORMAL")
            with immediate(conn):
                for statement in _SCHEMA:
                    conn.execute(statement)
            self._conn = conn
        return self._conn

    async def create(self, state: SessionState, *, max_sessions_per_owner: int | None) -> None:
        now = time.time()
        data = stamped(state, version=1, updated_at=now)
        await self._call(
            self._create, state.session_id, state.owner, data, now, max_sessions_per_owner
        )
        state.version, state.updated_at = 1, now

    def _create(
        self, session_id: str, owner: str, data: str, now: float, max_sessions: int | None
    ) -> None:
        conn = self._connection()
        cutoff = expiry_cutoff(self.idle_ttl_s, now)
        with immediate(conn):
            row = conn.execute(
                "SELECT updated_at FROM sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
            if row is not None and row[0] >= cutoff:
                raise ConflictError(f"session {session_id} already exists", code="session_exists")
            if max_sessions is not None:
                (num_live,) = conn.execute(
                    "SELECT COUNT(*) FROM sessions WHERE owner = ? AND updated_at >= ?",
                    (owner, cutoff),
                ).fetchone()
                if num_live >= max_sessions:
                    raise TooManySessions(
                        f"owner already has {num_live} sessions (limit {max_sessions}); delete one first",
                        code="too_many_sessions",
                    )
            conn.execute(
                "INSERT OR REPLACE INTO sessions (session_id, owner, updated_at, version, data) "
                "VALUES (?, ?, ?, 1, ?)",
                (session_id, owner, now, data),
            )

    async def load(self, session_id: str) -> SessionState | None:
        return await self._call(self._load, session_id)

    def _load(self, session_id: str) -> SessionState | None:
        conn = self._connection()
        now = time.time()
        row = conn.execute(
            "SELECT updated_at, version, data FROM sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
        if row is None:
            return None
        updated_at, version, data = row
        cutoff = expiry_cutoff(self.idle_ttl_s, now)
        if updated_at < cutoff:
            # Re-check inside the delete: another replica may have saved it since the read.
            with immediate(conn):
                conn.execute(
                    "DELETE FROM sessions WHERE session_id = ? AND updated_at < ?",
                    (session_id, cutoff),
                )
            return None
        state = SessionState.from_json(data)
        state.version = version
        return state

    async def version_of(self, session_id: str) -> int | None:
        return await self._call(self._version_of, session_id)

    def _version_of(self, session_id: str) -> int | None:
        row = (
            self._connection()
            .execute(
                "SELECT version FROM sessions WHERE session_id = ? AND updated_at >= ?",
                (session_id, expiry_cutoff(self.idle_ttl_s, time.time())),
            )
            .fetchone()
        )
        return None if row is None else int(row[0])

    async def save(self, state: SessionState) -> None:
        now = time.time()
        version = state.version + 1
        data = stamped(state, version=version, updated_at=now)
        await self._call(self._save, state.session_id, state.version, data, now)
        state.version, state.updated_at = version, now

    def _save(self, session_id: str, expected_version: int, data: str, now: float) -> None:
        conn = self._connection()
        with immediate(conn):
            row = conn.execute(
                "SELECT version FROM sessions WHERE session_id = ? AND updated_at >= ?",
                (session_id, expiry_cutoff(self.idle_ttl_s, now)),
            ).fetchone()
            if row is None:
                raise ConflictError(GONE_MESSAGE.format(session_id), code="session_gone")
            if row[0] != expected_version:
                raise ConflictError(CONFLICT_MESSAGE.format(session_id), code="version_conflict")
            conn.execute(
                "UPDATE sessions SET updated_at = ?, version = ?, data = ? WHERE session_id = ?",
                (now, expected_version + 1, data, session_id),
            )

    async def delete(self, session_id: str) -> bool:
        return await self._call(self._delete, session_id)

    def _delete(self, session_id: str) -> bool:
        conn = self._connection()
        with immediate(conn):
            row = conn.execute(
                "SELECT updated_at FROM sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
            conn.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
            conn.execute("DELETE FROM leases WHERE session_id = ?", (session_id,))
        return row is not None and row[0] >= expiry_cutoff(self.idle_ttl_s, time.time())

    async def count_for_owner(self, owner: str) -> int:
        return await self._call(self._count_for_owner, owner)

    def _count_for_owner(self, owner: str) -> int:
        (num_live,) = (
            self._connection()
            .execute(
                "SELECT COUNT(*) FROM sessions WHERE owner = ? AND updated_at >= ?",
                (owner, expiry_cutoff(self.idle_ttl_s, time.time())),
            )
            .fetchone()
        )
        return int(num_live)

    async def acquire_turn(self, session_id: str, *, ttl_s: float, holder: str = "") -> str | None:
        check_ttl(ttl_s)
        return await self._call(self._acquire_turn, session_id, ttl_s, holder)

    def _acquire_turn(self, session_id: str, ttl_s: float, holder: str) -> str | None:
        conn = self._connection()
        now = time.time()
        with immediate(conn):
            row = conn.execute(
                "SELECT expires_at FROM leases WHERE session_id = ?", (session_id,)
            ).fetchone()
            if row is not None and row[0] > now:
                return None
            token = new_lease_token(holder)
            conn.execute(
                "INSERT OR REPLACE INTO leases (session_id, token, expires_at) VALUES (?, ?, ?)",
                (session_id, token, now + ttl_s),
            )
        return token

    async def renew_turns(self, leases: Mapping[str, str], *, ttl_s: float) -> list[str]:
        check_ttl(ttl_s)
        if not leases:
            return []
        return await self._call(self._renew_turns, dict(leases), ttl_s)

    def _renew_turns(self, leases: dict[str, str], ttl_s: float) -> list[str]:
        conn = self._connection()
        now = time.time()
        lost = []
        with immediate(conn):
            for session_id, token in leases.items():
                renewed = conn.execute(
                    "UPDATE leases SET expires_at = ? "
                    "WHERE session_id = ? AND token = ? AND expires_at > ?",
                    (now + ttl_s, session_id, token, now),
                ).rowcount
                if not renewed:
                    lost.append(session_id)
        return lost

    async def release_turn(self, session_id: str, token: str) -> None:
        await self._call(self._release_turn, session_id, token)

    def _release_turn(self, session_id: str, token: str) -> None:
        self._connection().execute(
            "DELETE FROM leases WHERE session_id = ? AND token = ?", (session_id, token)
        )

    async def purge_expired(self) -> int:
        return await self._call(self._purge_expired)

    def _purge_expired(self) -> int:
        conn = self._connection()
        now = time.time()
        with immediate(conn):
            num_purged = conn.execute(
                "DELETE FROM sessions WHERE updated_at < ?", (expiry_cutoff(self.idle_ttl_s, now),)
            ).rowcount
            self._purge_expired_nodes(expiry_cutoff(self.idle_ttl_s, now))
            conn.execute("DELETE FROM leases WHERE expires_at <= ?", (now,))
        return int(num_purged)

    async def close(self) -> None:
        if self._is_closed:
            return
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close)
        self._is_closed = True
        self._executor.shutdown(wait=False)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
