"""Where sessions live between turns: SQLite or Redis behind one async `SessionStore`, plus an LRU cache."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import math
import secrets
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal, ParamSpec, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.embedded_model import default_cache_dir
from deployments.errors import ConflictError, OverloadedError, ServingError
from deployments.sessions.state import SessionState

if TYPE_CHECKING:
    from redis.asyncio import Redis

P = ParamSpec("P")
T = TypeVar("T")


class TooManySessions(ServingError):
    status_code = 429
    error_type = "rate_limit_error"


class SessionStore(Protocol):
    """Session persistence shared by every router replica.

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

    async def acquire_turn(self, session_id: str, *, ttl_s: float) -> str | None:
        """Takes the session's generating lease for `ttl_s` seconds across replicas.

        Returns: a token for `release_turn`, or None while another unexpired lease exists.
        """
        ...

    async def release_turn(self, session_id: str, token: str) -> None:
        """Drops the lease if `token` still holds it (a late release never frees a successor's lease)."""
        ...

    async def purge_expired(self) -> int:
        """Deletes what idle expiry left behind; returns how many expired session records were removed."""
        ...

    async def close(self) -> None: ...


def _cutoff(idle_ttl_s: float | None, now: float) -> float:
    """Sessions with `updated_at >= cutoff` are live."""
    return -math.inf if idle_ttl_s is None else now - idle_ttl_s


def _stamped(state: SessionState, *, version: int, updated_at: float) -> str:
    """The JSON of `state` as it will be after a successful write (the caller's object is untouched)."""
    return dataclasses.replace(state, version=version, updated_at=updated_at).to_json()


def _new_token() -> str:
    return secrets.token_urlsafe(16)


def _check_ttl(ttl_s: float) -> None:
    if not ttl_s > 0:
        raise ValueError(f"lease ttl_s must be > 0, got {ttl_s}")


_CONFLICT_MESSAGE = "session {} was saved by another request; reload it and retry"
_GONE_MESSAGE = "session {} was deleted or expired"


# ---------------------------------------------------------------- SQLite

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS sessions (session_id TEXT PRIMARY KEY, owner TEXT NOT NULL, "
    "updated_at REAL NOT NULL, version INTEGER NOT NULL, data TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS sessions_owner ON sessions (owner, updated_at)",
    "CREATE INDEX IF NOT EXISTS sessions_updated_at ON sessions (updated_at)",
    "CREATE TABLE IF NOT EXISTS leases (session_id TEXT PRIMARY KEY, token TEXT NOT NULL, "
    "expires_at REAL NOT NULL)",
)


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    # BEGIN IMMEDIATE takes the write lock up front, so read-check-write is atomic across processes.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # a check raised, or COMMIT itself failed
            conn.execute("ROLLBACK")
        raise


class SQLiteSessionStore:
    """One SQLite file in WAL mode; several processes (router replicas) may open the same file.

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
            with _immediate(conn):
                for statement in _SCHEMA:
                    conn.execute(statement)
            self._conn = conn
        return self._conn

    async def create(self, state: SessionState, *, max_sessions_per_owner: int | None) -> None:
        now = time.time()
        data = _stamped(state, version=1, updated_at=now)
        await self._call(
            self._create, state.session_id, state.owner, data, now, max_sessions_per_owner
        )
        state.version, state.updated_at = 1, now

    def _create(
        self, session_id: str, owner: str, data: str, now: float, max_sessions: int | None
    ) -> None:
        conn = self._connection()
        cutoff = _cutoff(self.idle_ttl_s, now)
        with _immediate(conn):
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
        cutoff = _cutoff(self.idle_ttl_s, now)
        if updated_at < cutoff:
            # Re-check inside the delete: another replica may have saved it since the read.
            with _immediate(conn):
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
                (session_id, _cutoff(self.idle_ttl_s, time.time())),
            )
            .fetchone()
        )
        return None if row is None else int(row[0])

    async def save(self, state: SessionState) -> None:
        now = time.time()
        version = state.version + 1
        data = _stamped(state, version=version, updated_at=now)
        await self._call(self._save, state.session_id, state.version, data, now)
        state.version, state.updated_at = version, now

    def _save(self, session_id: str, expected_version: int, data: str, now: float) -> None:
        conn = self._connection()
        with _immediate(conn):
            row = conn.execute(
                "SELECT version FROM sessions WHERE session_id = ? AND updated_at >= ?",
                (session_id, _cutoff(self.idle_ttl_s, now)),
            ).fetchone()
            if row is None:
                raise ConflictError(_GONE_MESSAGE.format(session_id), code="session_gone")
            if row[0] != expected_version:
                raise ConflictError(_CONFLICT_MESSAGE.format(session_id), code="version_conflict")
            conn.execute(
                "UPDATE sessions SET updated_at = ?, version = ?, data = ? WHERE session_id = ?",
                (now, expected_version + 1, data, session_id),
            )

    async def delete(self, session_id: str) -> bool:
        return await self._call(self._delete, session_id)

    def _delete(self, session_id: str) -> bool:
        conn = self._connection()
        with _immediate(conn):
            row = conn.execute(
                "SELECT updated_at FROM sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
            conn.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
            conn.execute("DELETE FROM leases WHERE session_id = ?", (session_id,))
        return row is not None and row[0] >= _cutoff(self.idle_ttl_s, time.time())

    async def count_for_owner(self, owner: str) -> int:
        return await self._call(self._count_for_owner, owner)

    def _count_for_owner(self, owner: str) -> int:
        (num_live,) = (
            self._connection()
            .execute(
                "SELECT COUNT(*) FROM sessions WHERE owner = ? AND updated_at >= ?",
                (owner, _cutoff(self.idle_ttl_s, time.time())),
            )
            .fetchone()
        )
        return int(num_live)

    async def acquire_turn(self, session_id: str, *, ttl_s: float) -> str | None:
        _check_ttl(ttl_s)
        return await self._call(self._acquire_turn, session_id, ttl_s)

    def _acquire_turn(self, session_id: str, ttl_s: float) -> str | None:
        conn = self._connection()
        now = time.time()
        with _immediate(conn):
            row = conn.execute(
                "SELECT expires_at FROM leases WHERE session_id = ?", (session_id,)
            ).fetchone()
            if row is not None and row[0] > now:
                return None
            token = _new_token()
            conn.execute(
                "INSERT OR REPLACE INTO leases (session_id, token, expires_at) VALUES (?, ?, ?)",
                (session_id, token, now + ttl_s),
            )
        return token

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
        with _immediate(conn):
            num_purged = conn.execute(
                "DELETE FROM sessions WHERE updated_at < ?", (_cutoff(self.idle_ttl_s, now),)
            ).rowcount
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


# ---------------------------------------------------------------- Redis

# KEYS: session hash, owner index. ARGV: session_id, data, owner, now, live cutoff ('' = no TTL),
# max sessions (-1 = no limit), ttl_ms (0 = no TTL). Returns 1 created, -1 exists, -2 over the limit.
_CREATE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
if ARGV[5] ~= '' then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[5]) end
local max = tonumber(ARGV[6])
if max >= 0 and redis.call('ZCARD', KEYS[2]) >= max then return -2 end
redis.call('HSET', KEYS[1], 'data', ARGV[2], 'version', '1', 'owner', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
local ttl = tonumber(ARGV[7])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return 1
"""

# KEYS: session hash, owner index. ARGV: session_id, expected version, data, now, ttl_ms (0 = no TTL).
# Returns 0 saved, -1 gone, else the stored version (a conflict).
_SAVE_LUA = """
local stored = redis.call('HGET', KEYS[1], 'version')
if not stored then return -1 end
if tonumber(stored) ~= tonumber(ARGV[2]) then return tonumber(stored) end
redis.call('HSET', KEYS[1], 'data', ARGV[3], 'version', tostring(tonumber(stored) + 1))
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
local ttl = tonumber(ARGV[5])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return 0
"""

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisSessionStore:
    """A hash per session (data, version, owner) with native idle expiry (PEXPIRE), a sorted set per owner
    scored by `updated_at` for counting, and a `SET NX PX` key per lease.

    Keys: `{prefix}session:{id}`, `{prefix}owner:{owner}`, `{prefix}lease:{id}`. The scripts touch a
    session key and an owner key together, so this targets one Redis server, not Redis Cluster.
    """

    def __init__(
        self, url: str, *, idle_ttl_s: float | None, key_prefix: str = "shepherd:"
    ) -> None:
        from redis.asyncio import Redis

        self.idle_ttl_s = idle_ttl_s
        self.key_prefix = key_prefix
        self._redis: Redis = Redis.from_url(url, decode_responses=True)
        self._create_script = self._redis.register_script(_CREATE_LUA)
        self._save_script = self._redis.register_script(_SAVE_LUA)
        self._release_script = self._redis.register_script(_RELEASE_LUA)
        self._ttl_ms = 0 if idle_ttl_s is None else max(1, round(idle_ttl_s * 1000))

    def _session_key(self, session_id: str) -> str:
        return f"{self.key_prefix}session:{session_id}"

    def _owner_key(self, owner: str) -> str:
        return f"{self.key_prefix}owner:{owner}"

    def _lease_key(self, session_id: str) -> str:
        return f"{self.key_prefix}lease:{session_id}"

    async def create(self, state: SessionState, *, max_sessions_per_owner: int | None) -> None:
        now = time.time()
        cutoff = "" if self.idle_ttl_s is None else repr(now - self.idle_ttl_s)
        result = await self._create_script(
            keys=[self._session_key(state.session_id), self._owner_key(state.owner)],
            args=[
                state.session_id,
                _stamped(state, version=1, updated_at=now),
                state.owner,
                repr(now),
                cutoff,
                -1 if max_sessions_per_owner is None else max_sessions_per_owner,
                self._ttl_ms,
            ],
        )
        if result == -1:
            raise ConflictError(f"session {state.session_id} already exists", code="session_exists")
        if result == -2:
            raise TooManySessions(
                f"owner already has {max_sessions_per_owner} sessions (the limit); delete one first",
                code="too_many_sessions",
            )
        state.version, state.updated_at = 1, now

    async def load(self, session_id: str) -> SessionState | None:
        data, version = await self._redis.hmget(self._session_key(session_id), ["data", "version"])
        if data is None or version is None:
            return None
        state = SessionState.from_json(_text(data))
        state.version = int(version)
        return state

    async def version_of(self, session_id: str) -> int | None:
        version = await self._redis.hget(self._session_key(session_id), "version")
        return None if version is None else int(version)

    async def save(self, state: SessionState) -> None:
        now = time.time()
        version = state.version + 1
        result = await self._save_script(
            keys=[self._session_key(state.session_id), self._owner_key(state.owner)],
            args=[
                state.session_id,
                state.version,
                _stamped(state, version=version, updated_at=now),
                repr(now),
                self._ttl_ms,
            ],
        )
        if result == -1:
            raise ConflictError(_GONE_MESSAGE.format(state.session_id), code="session_gone")
        if result != 0:
            raise ConflictError(_CONFLICT_MESSAGE.format(state.session_id), code="version_conflict")
        state.version, state.updated_at = version, now

    async def delete(self, session_id: str) -> bool:
        key = self._session_key(session_id)
        owner = await self._redis.hget(key, "owner")
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(key, self._lease_key(session_id))
            if owner is not None:
                pipe.zrem(self._owner_key(_text(owner)), session_id)
            results = await pipe.execute()
        return owner is not None and results[0] > 0

    async def count_for_owner(self, owner: str) -> int:
        if self.idle_ttl_s is None:
            return int(await self._redis.zcard(self._owner_key(owner)))
        cutoff = time.time() - self.idle_ttl_s
        return int(await self._redis.zcount(self._owner_key(owner), cutoff, "+inf"))

    async def acquire_turn(self, session_id: str, *, ttl_s: float) -> str | None:
        _check_ttl(ttl_s)
        token = _new_token()
        is_set = await self._redis.set(
            self._lease_key(session_id), token, nx=True, px=max(1, round(ttl_s * 1000))
        )
        return token if is_set else None

    async def release_turn(self, session_id: str, token: str) -> None:
        await self._release_script(keys=[self._lease_key(session_id)], args=[token])

    async def purge_expired(self) -> int:
        # Session and lease keys expire natively; only owner-index entries of expired sessions remain.
        if self.idle_ttl_s is None:
            return 0
        cutoff = f"({time.time() - self.idle_ttl_s!r}"
        num_purged = 0
        async for key in self._redis.scan_iter(
            match=_glob_escape(self.key_prefix) + "owner:*", count=500
        ):
            num_purged += int(await self._redis.zremrangebyscore(key, "-inf", cutoff))
        return num_purged

    async def close(self) -> None:
        await self._redis.aclose()


# ---------------------------------------------------------------- cache


def _copy(state: SessionState) -> SessionState:
    # Callers mutate what they load, so the cache hands out and keeps copies. Token ids are flat ints: list()
    # copies them ~30x faster than deepcopy.
    clone = copy.deepcopy(dataclasses.replace(state, token_ids=[]))
    clone.token_ids = list(state.token_ids)
    return clone


class CachedSessionStore:
    """An LRU of recently used sessions in front of a shared store.

    Every `load` asks the inner store for the current version first (`version_of`, no payload) and serves
    the cached copy only when it matches, so another replica's save is never hidden. Loads return copies.
    """

    def __init__(self, inner: SessionStore, max_entries: int = 1024) -> None:
        if max_entries <= 0:
            raise ValueError(f"max_entries must be > 0, got {max_entries}")
        self.inner = inner
        self.max_entries = max_entries
        self._entries: OrderedDict[str, SessionState] = OrderedDict()

    def _put(self, state: SessionState) -> None:
        cached = self._entries.get(state.session_id)
        # A slow load may finish after a newer save was cached; keep the newer one.
        if cached is not None and cached.version > state.version:
            return
        self._entries[state.session_id] = _copy(state)
        self._entries.move_to_end(state.session_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def create(self, state: SessionState, *, max_sessions_per_owner: int | None) -> None:
        await self.inner.create(state, max_sessions_per_owner=max_sessions_per_owner)
        self._put(state)

    async def load(self, session_id: str) -> SessionState | None:
        version = await self.inner.version_of(session_id)
        if version is None:
            self._entries.pop(session_id, None)
            return None
        cached = self._entries.get(session_id)
        if cached is not None and cached.version == version:
            self._entries.move_to_end(session_id)
            return _copy(cached)
        state = await self.inner.load(session_id)
        if state is None:
            self._entries.pop(session_id, None)
            return None
        self._put(state)
        return state

    async def version_of(self, session_id: str) -> int | None:
        return await self.inner.version_of(session_id)

    async def save(self, state: SessionState) -> None:
        try:
            await self.inner.save(state)
        except ConflictError:
            self._entries.pop(state.session_id, None)
            raise
        self._put(state)

    async def delete(self, session_id: str) -> bool:
        self._entries.pop(session_id, None)
        return await self.inner.delete(session_id)

    async def count_for_owner(self, owner: str) -> int:
        return await self.inner.count_for_owner(owner)

    async def acquire_turn(self, session_id: str, *, ttl_s: float) -> str | None:
        return await self.inner.acquire_turn(session_id, ttl_s=ttl_s)

    async def release_turn(self, session_id: str, token: str) -> None:
        await self.inner.release_turn(session_id, token)

    async def purge_expired(self) -> int:
        return await self.inner.purge_expired()

    async def close(self) -> None:
        self._entries.clear()
        await self.inner.close()


# ---------------------------------------------------------------- config


class SessionStoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["sqlite", "redis"] = Field(
        default="sqlite",
        description="`sqlite`: one file shared by the replicas of one host. `redis`: shared across hosts.",
    )
    sqlite_path: str | None = Field(
        default=None, description="The SQLite file; defaults to <cache dir>/sessions.sqlite3."
    )
    redis_url: str | None = Field(
        default=None, description="A redis:// or rediss:// URL; required when kind is `redis`."
    )
    idle_ttl_s: float | None = Field(
        default=86400.0,
        gt=0,
        description="Seconds without a save before a session expires; None: never.",
    )
    cache_entries: int = Field(
        default=1024,
        ge=0,
        description="Sessions kept in each router replica's LRU cache; 0 disables it.",
    )

    @model_validator(mode="after")
    def _check_backend(self) -> SessionStoreConfig:
        if self.kind == "redis" and not self.redis_url:
            raise ValueError("redis_url is required when kind is 'redis'")
        return self


def open_session_store(config: SessionStoreConfig) -> SessionStore:
    """Builds the configured store; connects lazily, so it is safe to call on the event loop."""
    store: SessionStore
    if config.kind == "redis":
        assert config.redis_url is not None  # the validator guarantees it
        store = RedisSessionStore(config.redis_url, idle_ttl_s=config.idle_ttl_s)
    else:
        path = config.sqlite_path or str(default_cache_dir() / "sessions.sqlite3")
        store = SQLiteSessionStore(path, idle_ttl_s=config.idle_ttl_s)
    if config.cache_entries > 0:
        store = CachedSessionStore(store, max_entries=config.cache_entries)
    return store
