"""Response nodes in the real session stores (a SQLite file, a redis-server): chains, forks, deletion, expiry."""

# ruff: noqa: F811  (the tests take the store fixtures imported below as arguments)
from __future__ import annotations

import time
from typing import Any

from deployments.sessions.cache import CachedSessionStore
from deployments.sessions.nodes import ResponseNode, new_response_id
from tests.unit.test_session_store import (  # noqa: F401  (fixtures)
    OpenStore,
    open_store,
    redis_url,
    run,
)


def node(
    parent: ResponseNode | None, text: str, owner: str = "alice", **fields: Any
) -> ResponseNode:
    response_id = new_response_id()
    return ResponseNode(
        response_id,
        owner=owner,
        root_id=parent.root_id if parent else response_id,
        parent_id=parent.response_id if parent else None,
        span_text=text,
        span_token_ids=[ord(c) for c in text],
        span_messages=[{"role": "user", "content": text, "id": "msg_" + text}],
        response={"id": response_id, "output_text": text},
        **fields,
    )


def texts(chain: list[ResponseNode]) -> str:
    return "".join(n.span_text for n in reversed(chain))


def test_a_chain_loads_newest_first_and_forks_share_their_parent(open_store: OpenStore) -> None:
    async def main() -> None:
        replica_a, replica_b = open_store(), CachedSessionStore(open_store())
        try:
            root = node(None, "ab")
            middle = node(root, "cd")
            left, right = node(middle, "ef"), node(middle, "XY")
            for each in (root, middle, left, right):
                assert await replica_a.save_node(each)
            left_chain = await replica_b.load_chain(left.response_id)
            assert [n.response_id for n in left_chain] == [
                left.response_id,
                middle.response_id,
                root.response_id,
            ]
            assert texts(left_chain) == "abcdef" and left_chain[0] == left
            assert texts(await replica_b.load_chain(right.response_id)) == "abcdXY"
            assert await replica_b.load_chain("resp_missing") == []
        finally:
            await replica_a.close()
            await replica_b.close()

    run(main())


def test_a_node_whose_parent_is_gone_is_not_stored(open_store: OpenStore) -> None:
    async def main() -> None:
        store = open_store()
        try:
            orphan = node(node(None, "never saved"), "child")
            assert await store.save_node(orphan) is False
            assert await store.load_chain(orphan.response_id) == []
        finally:
            await store.close()

    run(main())


def test_deleting_a_node_keeps_what_its_children_continue_from(open_store: OpenStore) -> None:
    async def main() -> None:
        store = open_store()
        try:
            root = node(None, "ab")
            middle = node(root, "cd")
            child = node(middle, "ef")
            for each in (root, middle, child):
                await store.save_node(each)
            assert await store.delete_node(middle.response_id) is True
            assert await store.delete_node(middle.response_id) is False  # deleted before
            chain = await store.load_chain(child.response_id)
            assert texts(chain) == "abcdef" and chain[1].is_deleted and not chain[0].is_deleted
            middle_chain = await store.load_chain(middle.response_id)
            assert middle_chain and middle_chain[0].is_deleted  # kept for the child, flagged

            # The last node that needed it goes: the deleted middle goes with it; the live root stays.
            assert await store.delete_node(child.response_id) is True
            assert await store.load_chain(child.response_id) == []
            assert await store.load_chain(middle.response_id) == []
            assert texts(await store.load_chain(root.response_id)) == "ab"
        finally:
            await store.close()

    run(main())


def test_a_new_node_refreshes_its_ancestors_idle_ttl(open_store: OpenStore) -> None:
    async def main() -> None:
        store = open_store(idle_ttl_s=1.5)
        try:
            root = node(None, "ab")
            await store.save_node(root)
            time.sleep(1.0)
            child = node(root, "cd")
            await store.save_node(child)  # the root's TTL starts over
            time.sleep(1.0)
            assert texts(await store.load_chain(child.response_id)) == "abcd"
            time.sleep(0.8)
            assert await store.load_chain(child.response_id) == []
            assert await store.load_chain(root.response_id) == []
            assert await store.save_node(node(child, "late")) is False
        finally:
            await store.close()

    run(main())


def test_an_unstored_response_keeps_only_its_id_and_owner(open_store: OpenStore) -> None:
    async def main() -> None:
        store = open_store()
        try:
            tombstone = ResponseNode(new_response_id(), owner="bob", root_id="r", is_stored=False)
            await store.save_node(tombstone)
            [loaded] = await store.load_chain(tombstone.response_id)
            assert loaded.is_stored is False and loaded.owner == "bob" and loaded.response is None
        finally:
            await store.close()

    run(main())


def test_purge_removes_expired_nodes_from_sqlite(tmp_path: Any) -> None:
    from deployments.sessions.sqlite import SQLiteSessionStore

    async def main() -> None:
        store = SQLiteSessionStore(str(tmp_path / "s.sqlite3"), idle_ttl_s=0.2)
        try:
            await store.save_node(node(None, "old"))
            time.sleep(0.3)
            await store.purge_expired()
            conn = store._connection()
            assert conn.execute("SELECT COUNT(*) FROM response_nodes").fetchone()[0] == 0
        finally:
            await store.close()

    run(main())


def test_nodes_survive_a_reopened_sqlite_store(tmp_path: Any) -> None:
    from deployments.sessions.sqlite import SQLiteSessionStore

    path = str(tmp_path / "s.sqlite3")
    root = node(None, "persisted")

    async def save() -> None:
        store = SQLiteSessionStore(path, idle_ttl_s=None)
        await store.save_node(root)
        await store.close()

    async def load() -> list[ResponseNode]:
        store = SQLiteSessionStore(path, idle_ttl_s=None)
        try:
            return await store.load_chain(root.response_id)
        finally:
            await store.close()

    run(save())
    assert run(load()) == [root]
