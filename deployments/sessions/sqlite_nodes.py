"""Response nodes in the SQLite session store (`nodes.ResponseNodeStore`): one row per node, parent-linked."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

from deployments.sessions.nodes import ResponseNode
from deployments.sessions.store import expiry_cutoff

NODE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS response_nodes (response_id TEXT PRIMARY KEY, owner TEXT NOT NULL, "
    "parent_id TEXT, updated_at REAL NOT NULL, is_deleted INTEGER NOT NULL DEFAULT 0, data TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS response_nodes_parent ON response_nodes (parent_id)",
    "CREATE INDEX IF NOT EXISTS response_nodes_updated_at ON response_nodes (updated_at)",
)

# The node and its token ancestors, nearest first.
_CHAIN = (
    "WITH RECURSIVE chain(id, depth) AS (SELECT ?, 0 UNION ALL SELECT r.parent_id, c.depth + 1 "
    "FROM response_nodes r JOIN chain c ON r.response_id = c.id WHERE r.parent_id IS NOT NULL) "
)


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[None]:
    # BEGIN IMMEDIATE takes the write lock up front, so read-check-write is atomic across processes.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # a check raised, or COMMIT itself failed
            conn.execute("ROLLBACK")
        raise


class SQLiteNodes:
    """The node half of `SQLiteSessionStore` (mixed into it): the same file, connection and worker thread."""

    idle_ttl_s: float | None
    _call: Callable[..., Coroutine[Any, Any, Any]]
    _connection: Callable[[], sqlite3.Connection]
    _has_node_tables = False  # created on first use, so opening a store stays as it was

    async def save_node(self, node: ResponseNode) -> bool:
        is_saved: bool = await self._call(self._save_node, node.to_json(), node, time.time())
        return is_saved

    def _save_node(self, data: str, node: ResponseNode, now: float) -> bool:
        conn = self._nodes_connection()
        with immediate(conn):
            if node.parent_id is not None:
                row = conn.execute(
                    "SELECT 1 FROM response_nodes WHERE response_id = ? AND updated_at >= ?",
                    (node.parent_id, expiry_cutoff(self.idle_ttl_s, now)),
                ).fetchone()
                if row is None:
                    return False
            conn.execute(
                "INSERT INTO response_nodes (response_id, owner, parent_id, updated_at, data) "
                "VALUES (?, ?, ?, ?, ?)",
                (node.response_id, node.owner, node.parent_id, now, data),
            )
            if node.parent_id is not None:
                conn.execute(
                    _CHAIN + "UPDATE response_nodes SET updated_at = ? "
                    "WHERE response_id IN (SELECT id FROM chain)",
                    (node.parent_id, now),
                )
        return True

    async def load_chain(self, response_id: str) -> list[ResponseNode]:
        chain: list[ResponseNode] = await self._call(self._load_chain, response_id)
        return chain

    def _load_chain(self, response_id: str) -> list[ResponseNode]:
        rows = (
            self._nodes_connection()
            .execute(
                _CHAIN + "SELECT r.updated_at, r.is_deleted, r.parent_id, r.data FROM chain c "
                "JOIN response_nodes r ON r.response_id = c.id ORDER BY c.depth",
                (response_id,),
            )
            .fetchall()
        )
        cutoff = expiry_cutoff(self.idle_ttl_s, time.time())
        # Ancestors are refreshed whenever a node below them is saved, so a live head means a live chain; a
        # missing base (its parent row is gone) means a broken one.
        if not rows or rows[0][0] < cutoff or rows[-1][2] is not None:
            return []
        return [
            ResponseNode.from_json(data, is_deleted=bool(deleted)) for _, deleted, _, data in rows
        ]

    async def delete_node(self, response_id: str) -> bool:
        is_deleted: bool = await self._call(self._delete_node, response_id)
        return is_deleted

    def _delete_node(self, response_id: str) -> bool:
        conn = self._nodes_connection()
        with immediate(conn):
            row = conn.execute(
                "SELECT updated_at, is_deleted FROM response_nodes WHERE response_id = ?",
                (response_id,),
            ).fetchone()
            if row is None or row[1] or row[0] < expiry_cutoff(self.idle_ttl_s, time.time()):
                return False
            conn.execute(
                "UPDATE response_nodes SET is_deleted = 1 WHERE response_id = ?", (response_id,)
            )
            # Remove what no node needs any more: this node, then each deleted ancestor left childless.
            node_id: str | None = response_id
            while node_id is not None:
                found = conn.execute(
                    "SELECT is_deleted, parent_id FROM response_nodes WHERE response_id = ?",
                    (node_id,),
                ).fetchone()
                has_children = conn.execute(
                    "SELECT 1 FROM response_nodes WHERE parent_id = ? LIMIT 1", (node_id,)
                ).fetchone()
                if found is None or not found[0] or has_children is not None:
                    break
                conn.execute("DELETE FROM response_nodes WHERE response_id = ?", (node_id,))
                node_id = found[1]
        return True

    def _purge_expired_nodes(self, cutoff: float) -> int:
        """Called inside the store's purge transaction."""
        return int(
            self._nodes_connection()
            .execute("DELETE FROM response_nodes WHERE updated_at < ?", (cutoff,))
            .rowcount
        )

    def _nodes_connection(self) -> sqlite3.Connection:
        conn = self._connection()
        if not getattr(self, "_has_node_tables", False):
            for statement in NODE_SCHEMA:
                conn.execute(statement)
            self._has_node_tables = True
        return conn
