"""SessionStore against real backends: a SQLite file in tmp_path and a redis-server process on loopback."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import pytest

from cluster.local import redis_server
from deployments.config import SessionStoreConfig
from deployments.errors import ConflictError, OverloadedError, TooManySessions
from deployments.sessions.backends import open_session_store
from deployments.sessions.cache import CachedSessionStore
from deployments.sessions.redis import RedisSessionStore
from deployments.sessions.sqlite import SQLiteSessionStore
from deployments.sessions.state import Eviction, SessionState, new_session_id
from deployments.sessions.store import SessionStore, lease_holder

T = TypeVar("T")
OpenStore = Callable[..., SessionStore]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


def new_state(owner: str = "alice", **fields: Any) -> SessionState:
    fields.setdefault("session_id", new_session_id())
    return SessionState(owner=owner, model="shepherd-tiny", **fields)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if shutil.which("redis-server") is None:
        pytest.skip(
            "REDIS BACKEND UNTESTED: redis-server is not on PATH (apt-get install redis-server)"
        )
    pytest.importorskip(
        "redis", reason="REDIS BACKEND UNTESTED: redis-py is not installed (pip install redis)"
    )
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(params=["sqlite", "redis"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> OpenStore:
    """Each call opens a new store object on the same backing data, like another router replica would."""
    if request.param == "sqlite":
        path = str(tmp_path / "sessions.sqlite3")
        return lambda idle_ttl_s=None: SQLiteSessionStore(path, idle_ttl_s=idle_ttl_s)
    url = request.getfixturevalue("redis_url")
    prefix = f"test:{uuid.uuid4().hex}:"  # one key space per test: no flushing between tests
    return lambda idle_ttl_s=None: RedisSessionStore(url, idle_ttl_s=idle_ttl_s, key_prefix=prefix)


async def close_all(*stores: SessionStore) -> None:
    for store in stores:
        await store.close()


def test_create_load_save_delete_roundtrip_keeps_every_field(open_store: OpenStore) -> None:
    state = new_state(
        system_prompt="Tu es un assistant. 你好 🚀",
        tools=[
            {
                "type": "function",
                "function": {"name": "get_weather", "parameters": {"type": "object"}},
            }
        ],
        metadata={"tenant": "ünïcødé", "lang": "日本語"},
        messages=[
            {"role": "user", "content": "naïve café → ≤ ∑ π 😀 עברית"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "call_1", "type": "function"}],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21.5}\n\ttabs'},
        ],
        prompt_text="<|im_start|>user\nnaïve café 😀<|im_end|>\n",
        token_ids=[1, 2, 3, 1023, 0, 65535],
        num_turns=3,
        evictions=[
            Eviction(
                at_turn=2,
                num_messages=2,
                num_tokens_freed=40,
                roles=["user", "assistant"],
                created_at=1.5,
            ),
            Eviction(at_turn=3, num_messages=1, num_tokens_freed=7, roles=["tool"]),
        ],
        num_template_breaks=1,
    )

    async def main() -> None:
        store = open_store()
        try:
            await store.create(state, max_sessions_per_owner=None)
            assert state.version == 1
            assert await store.load(state.session_id) == state
            assert await store.version_of(state.session_id) == 1

            state.messages.append({"role": "assistant", "content": "ça va ✓"})
            state.token_ids.extend([7, 8])
            state.num_turns += 1
            before = state.updated_at
            await store.save(state)
            assert state.version == 2 and state.updated_at >= before
            assert await store.load(state.session_id) == state

            with pytest.raises(ConflictError) as exc:
                await store.create(
                    new_state(session_id=state.session_id), max_sessions_per_owner=None
                )
            assert exc.value.code == "session_exists"

            assert await store.delete(state.session_id) is True
            assert await store.load(state.session_id) is None
            assert await store.version_of(state.session_id) is None
            assert await store.delete(state.session_id) is False
            assert await store.load("sess_missing") is None
        finally:
            await store.close()

    run(main())


def test_second_writer_with_stale_version_gets_conflict(open_store: OpenStore) -> None:
    async def main() -> None:
        replica_a, replica_b = open_store(), open_store()
        try:
            state = new_state()
            await replica_a.create(state, max_sessions_per_owner=None)
            seen_by_a = await replica_a.load(state.session_id)
            seen_by_b = await replica_b.load(state.session_id)
            assert seen_by_a is not None and seen_by_b is not None

            seen_by_a.messages.append({"role": "user", "content": "from a"})
            await replica_a.save(seen_by_a)
            seen_by_b.messages.append({"role": "user", "content": "from b"})
            with pytest.raises(ConflictError) as exc:
                await replica_b.save(seen_by_b)
            assert exc.value.code == "version_conflict" and exc.value.status_code == 409
            assert seen_by_b.version == 1  # untouched on failure

            stored = await replica_b.load(state.session_id)
            assert stored is not None and stored.version == 2
            assert stored.messages == [{"role": "user", "content": "from a"}]
        finally:
            await close_all(replica_a, replica_b)

    run(main())


def test_concurrent_read_modify_write_loses_no_update(open_store: OpenStore) -> None:
    num_increments = 8

    async def increment(store: SessionStore, session_id: str) -> None:
        for _ in range(num_increments):
            while True:
                state = await store.load(session_id)
                assert state is not None
                state.num_turns += 1
                try:
                    await store.save(state)
                    break
                except ConflictError:
                    continue

    async def main() -> None:
        replicas = [open_store(), open_store(), open_store()]
        try:
            state = new_state()
            await replicas[0].create(state, max_sessions_per_owner=None)
            await asyncio.gather(*(increment(r, state.session_id) for r in replicas))
            final = await replicas[0].load(state.session_id)
            assert final is not None
            assert final.num_turns == num_increments * len(replicas)
            assert final.version == 1 + num_increments * len(replicas)
        finally:
            await close_all(*replicas)

    run(main())


def test_idle_sessions_expire_unless_saved(open_store: OpenStore) -> None:
    async def main() -> None:
        store = open_store(idle_ttl_s=0.5)
        try:
            idle, active = new_state(), new_state()
            for state in (idle, active):
                await store.create(state, max_sessions_per_owner=None)
            await asyncio.sleep(0.3)
            await store.save(active)  # a save restarts the idle clock
            await asyncio.sleep(0.3)

            assert await store.load(idle.session_id) is None
            assert await store.version_of(idle.session_id) is None
            with pytest.raises(ConflictError) as exc:
                await store.save(idle)
            assert exc.value.code == "session_gone"
            loaded = await store.load(active.session_id)
            assert loaded is not None and loaded.version == 2
            assert await store.count_for_owner("alice") == 1

            await asyncio.sleep(0.6)
            await store.purge_expired()
            assert await store.count_for_owner("alice") == 0
            assert await store.load(active.session_id) is None
            assert await store.delete(active.session_id) is False
        finally:
            await store.close()

    run(main())


def test_owner_limit_counts_only_live_sessions(open_store: OpenStore) -> None:
    async def main() -> None:
        store = open_store(idle_ttl_s=0.4)
        try:
            first, second = new_state(), new_state()
            await store.create(first, max_sessions_per_owner=2)
            await store.create(second, max_sessions_per_owner=2)
            with pytest.raises(TooManySessions) as exc:
                await store.create(new_state(), max_sessions_per_owner=2)
            assert exc.value.status_code == 429 and exc.value.error_type == "rate_limit_error"
            await store.create(new_state(owner="bob"), max_sessions_per_owner=2)
            assert await store.count_for_owner("alice") == 2

            assert await store.delete(first.session_id) is True
            await store.create(new_state(), max_sessions_per_owner=2)

            await asyncio.sleep(0.5)
            assert await store.count_for_owner("alice") == 0
            for _ in range(2):
                await store.create(new_state(), max_sessions_per_owner=2)
            assert await store.count_for_owner("alice") == 2
        finally:
            await store.close()

    run(main())


def test_turn_lease_is_exclusive_expires_and_only_holder_releases(open_store: OpenStore) -> None:
    async def main() -> None:
        replica_a, replica_b = open_store(), open_store()
        try:
            session_id = new_session_id()
            token_a = await replica_a.acquire_turn(session_id, ttl_s=0.3)
            assert token_a is not None
            assert await replica_b.acquire_turn(session_id, ttl_s=0.3) is None
            await replica_b.release_turn(session_id, "not-the-token")
            assert await replica_b.acquire_turn(session_id, ttl_s=0.3) is None

            await asyncio.sleep(0.35)
            token_b = await replica_b.acquire_turn(session_id, ttl_s=5)
            assert token_b is not None and token_b != token_a
            await replica_a.release_turn(session_id, token_a)  # a late release of an expired lease
            assert await replica_a.acquire_turn(session_id, ttl_s=5) is None

            await replica_b.release_turn(session_id, token_b)
            assert await replica_a.acquire_turn(session_id, ttl_s=5) is not None
            assert (
                await replica_a.acquire_turn(new_session_id(), ttl_s=5) is not None
            )  # leases are per session
        finally:
            await close_all(replica_a, replica_b)

    run(main())


def test_a_renewed_lease_outlives_its_ttl_and_a_lost_one_is_reported(open_store: OpenStore) -> None:
    async def main() -> None:
        replica_a, replica_b = open_store(), open_store()
        try:
            kept, dropped = new_session_id(), new_session_id()
            token = await replica_a.acquire_turn(kept, ttl_s=0.3, holder="router-a")
            stale = await replica_a.acquire_turn(dropped, ttl_s=0.3, holder="router-a")
            assert token is not None and stale is not None
            assert lease_holder(token) == "router-a"
            for _ in range(4):  # 0.6 s, twice the TTL: each renewal extends it
                await asyncio.sleep(0.15)
                assert await replica_a.renew_turns({kept: token}, ttl_s=0.3) == []
            assert await replica_b.acquire_turn(kept, ttl_s=5, holder="router-b") is None
            # The other lease ran out and another holder took it: renewing it now fails.
            successor = await replica_b.acquire_turn(dropped, ttl_s=5, holder="router-b")
            assert successor is not None
            assert await replica_a.renew_turns({kept: token, dropped: stale}, ttl_s=0.3) == [
                dropped
            ]
            assert await replica_a.renew_turns({}, ttl_s=0.3) == []
        finally:
            await close_all(replica_a, replica_b)

    run(main())


def test_a_dead_holders_lease_is_free_after_its_ttl_across_a_restart(open_store: OpenStore) -> None:
    """A router that dies mid-turn never releases; a fresh store (a restarted app) takes over after the TTL."""

    async def main() -> None:
        crashed = open_store()
        session_id = new_session_id()
        assert await crashed.acquire_turn(session_id, ttl_s=0.3, holder="router-a") is not None
        await crashed.close()  # no release: the process is gone
        restarted = open_store()
        try:
            assert await restarted.acquire_turn(session_id, ttl_s=5, holder="router-b") is None
            await asyncio.sleep(0.35)
            assert await restarted.acquire_turn(session_id, ttl_s=5, holder="router-b") is not None
        finally:
            await restarted.close()

    run(main())


def test_cached_store_never_serves_a_version_another_replica_replaced(
    open_store: OpenStore,
) -> None:
    async def main() -> None:
        cached, other = CachedSessionStore(open_store(), max_entries=2), open_store()
        try:
            state = new_state(messages=[{"role": "user", "content": "v1"}])
            await cached.create(state, max_sessions_per_owner=None)
            hit = await cached.load(state.session_id)
            assert hit == state
            assert hit is not None
            hit.messages.append({"role": "user", "content": "mutated by a caller, never saved"})
            assert await cached.load(state.session_id) == state  # loads hand out copies

            remote = await other.load(state.session_id)
            assert remote is not None
            remote.messages = [{"role": "user", "content": "v2 from another replica"}]
            await other.save(remote)
            fresh = await cached.load(state.session_id)
            assert fresh == remote and fresh is not None and fresh.version == 2

            with pytest.raises(ConflictError):
                await cached.save(state)  # still at version 1
            fresh.num_turns = 9
            await cached.save(fresh)
            from_other = await other.load(state.session_id)
            assert from_other is not None and from_other.num_turns == 9 and from_other.version == 3

            for _ in range(3):  # push the entry out of the 2-entry LRU and back
                await cached.create(new_state(), max_sessions_per_owner=None)
            assert await cached.load(state.session_id) == from_other

            assert await other.delete(state.session_id) is True
            assert await cached.load(state.session_id) is None
        finally:
            await close_all(cached, other)

    run(main())


def test_sqlite_sessions_survive_reopening_the_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nested" / "sessions.sqlite3")

    async def main() -> None:
        state = new_state(messages=[{"role": "user", "content": "persist me 💾"}], token_ids=[5, 6])
        first = SQLiteSessionStore(path, idle_ttl_s=None)
        await first.create(state, max_sessions_per_owner=None)
        await first.save(state)
        await first.close()

        reopened = SQLiteSessionStore(path, idle_ttl_s=None)
        try:
            assert await reopened.load(state.session_id) == state
            await reopened.save(state)
            assert state.version == 3
        finally:
            await reopened.close()

    run(main())


def test_sqlite_waits_for_another_writer_without_blocking_the_loop(tmp_path: Path) -> None:
    path = str(tmp_path / "sessions.sqlite3")

    async def main() -> None:
        patient = SQLiteSessionStore(path, idle_ttl_s=None, busy_timeout_s=5)
        impatient = SQLiteSessionStore(path, idle_ttl_s=None, busy_timeout_s=0.05)
        other_process = sqlite3.connect(path, isolation_level=None)
        try:
            state = new_state()
            await patient.create(state, max_sessions_per_owner=None)
            other_process.execute("BEGIN IMMEDIATE")  # another replica holds the write lock

            with pytest.raises(OverloadedError):
                await impatient.save(state)
            save = asyncio.create_task(patient.save(state))
            num_ticks = 0
            for _ in range(10):
                await asyncio.sleep(0.02)
                num_ticks += 1
            assert not save.done() and num_ticks == 10
            other_process.execute("COMMIT")
            await save
            assert state.version == 2
        finally:
            other_process.close()
            await close_all(patient, impatient)

    run(main())


def test_open_session_store_builds_the_configured_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHEPHERD_CACHE_DIR", str(tmp_path / "cache"))
    default = open_session_store(SessionStoreConfig())
    assert isinstance(default, CachedSessionStore) and isinstance(default.inner, SQLiteSessionStore)
    assert default.inner.path == str(tmp_path / "cache" / "sessions.sqlite3")
    assert default.inner.idle_ttl_s == 86400

    uncached = open_session_store(
        SessionStoreConfig(sqlite_path=str(tmp_path / "s.db"), cache_entries=0)
    )
    assert isinstance(uncached, SQLiteSessionStore)

    async def roundtrip() -> None:
        state = new_state()
        await default.create(state, max_sessions_per_owner=1)
        assert await default.load(state.session_id) == state
        await close_all(default, uncached)

    run(roundtrip())

    with pytest.raises(pydantic.ValidationError, match="redis_url"):
        SessionStoreConfig(kind="redis")
    with pytest.raises(pydantic.ValidationError):
        SessionStoreConfig(sqlite_path="x", unknown=1)  # type: ignore[call-arg]
    with pytest.raises(pydantic.ValidationError):
        SessionStoreConfig(idle_ttl_s=0)
    assert all(field.description for field in SessionStoreConfig.model_fields.values())


def test_token_ids_are_stored_packed_and_rows_with_plain_lists_still_load() -> None:
    state = new_state(token_ids=list(range(300)))
    stored = json.loads(state.to_json())
    assert isinstance(stored["token_ids"], str)  # packed (token_packing.py), not 300 JSON numbers
    assert SessionState.from_json(state.to_json()) == state
    stored["token_ids"] = list(range(300))  # a row written before packing
    assert SessionState.from_json(json.dumps(stored)) == state
