"""The Redis session store: shared by router replicas across hosts; check-and-write steps are Lua scripts."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from deployments.errors import ConflictError, TooManySessions
from deployments.sessions.redis_nodes import RedisNodes
from deployments.sessions.state import SessionState
from deployments.sessions.store import (
    CONFLICT_MESSAGE,
    GONE_MESSAGE,
    check_ttl,
    new_lease_token,
    stamped,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis

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

# KEYS: lease. ARGV: token, ttl_ms. Returns 1 renewed, 0 lost (expired, or another turn's now).
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisSessionStore(RedisNodes):
    """A hash per session (data, version, owner) with native idle expiry (PEXPIRE), a sorted set per owner
    scored by `updated_at` for counting, and a `SET NX PX` key per lease. Response nodes: `redis_nodes.py`.

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
        self._renew_script = self._redis.register_script(_RENEW_LUA)
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
                stamped(state, version=1, updated_at=now),
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
                stamped(state, version=version, updated_at=now),
                repr(now),
                self._ttl_ms,
            ],
        )
        if result == -1:
            raise ConflictError(GONE_MESSAGE.format(state.session_id), code="session_gone")
        if result != 0:
            raise ConflictError(CONFLICT_MESSAGE.format(state.session_id), code="version_conflict")
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

    async def acquire_turn(self, session_id: str, *, ttl_s: float, holder: str = "") -> str | None:
        check_ttl(ttl_s)
        token = new_lease_token(holder)
        is_set = await self._redis.set(
            self._lease_key(session_id), token, nx=True, px=max(1, round(ttl_s * 1000))
        )
        return token if is_set else None

    async def renew_turns(self, leases: Mapping[str, str], *, ttl_s: float) -> list[str]:
        check_ttl(ttl_s)
        if not leases:
            return []
        ttl_ms = max(1, round(ttl_s * 1000))
        async with self._redis.pipeline(transaction=False) as pipe:
            for session_id, token in leases.items():
                await self._renew_script(
                    keys=[self._lease_key(session_id)], args=[token, ttl_ms], client=pipe
                )
            results = await pipe.execute()
        return [
            session_id for session_id, renewed in zip(leases, results, strict=True) if not renewed
        ]

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
