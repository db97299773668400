"""Response nodes in the Redis session store (`nodes.ResponseNodeStore`): a hash per node and a set of the
nodes that continue it; walking a chain is one Lua script, so it costs one round trip however long it is.

Keys: `{prefix}response:{id}` (data, owner, parent, deleted) and `{prefix}response_children:{id}`. The scripts
follow parent links, so, like the rest of the store, this targets one Redis server, not Redis Cluster.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deployments.sessions.nodes import ResponseNode

if TYPE_CHECKING:
    from redis.asyncio import Redis

# ARGV: prefix, id, parent ('' = none), data, owner, ttl_ms (0 = no TTL). Returns 1 saved, 0 parent gone.
_SAVE_NODE_LUA = """
local p, id, parent, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[6])
if parent ~= '' and redis.call('EXISTS', p .. 'response:' .. parent) == 0 then return 0 end
local key = p .. 'response:' .. id
redis.call('HSET', key, 'data', ARGV[4], 'owner', ARGV[5], 'parent', parent, 'deleted', '0')
if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
if parent ~= '' then redis.call('SADD', p .. 'response_children:' .. parent, id) end
local node = parent
while node and node ~= '' do
  if ttl > 0 then
    redis.call('PEXPIRE', p .. 'response:' .. node, ttl)
    redis.call('PEXPIRE', p .. 'response_children:' .. node, ttl)
  end
  node = redis.call('HGET', p .. 'response:' .. node, 'parent')
end
return 1
"""

# ARGV: prefix, id. Returns [data, deleted, data, deleted, ...] from the node to its base; {} if broken.
_LOAD_CHAIN_LUA = """
local p, node, out = ARGV[1], ARGV[2], {}
while node and node ~= '' do
  local fields = redis.call('HMGET', p .. 'response:' .. node, 'data', 'deleted', 'parent')
  if not fields[1] then return {} end
  table.insert(out, fields[1])
  table.insert(out, fields[2])
  node = fields[3]
end
return out
"""

# ARGV: prefix, id. Returns 1 deleted, 0 gone or deleted before.
_DELETE_NODE_LUA = """
local p, id = ARGV[1], ARGV[2]
local key = p .. 'response:' .. id
local deleted = redis.call('HGET', key, 'deleted')
if not deleted or deleted == '1' then return 0 end
redis.call('HSET', key, 'deleted', '1')
local node = id
while node and node ~= '' do
  local node_key = p .. 'response:' .. node
  if redis.call('HGET', node_key, 'deleted') ~= '1' then break end
  if redis.call('SCARD', p .. 'response_children:' .. node) > 0 then break end
  local parent = redis.call('HGET', node_key, 'parent')
  redis.call('DEL', node_key, p .. 'response_children:' .. node)
  if parent and parent ~= '' then redis.call('SREM', p .. 'response_children:' .. parent, node) end
  node = parent
end
return 1
"""


class RedisNodes:
    """The node half of `RedisSessionStore` (mixed into it): the same client, prefix and idle TTL."""

    key_prefix: str
    _redis: Redis
    _ttl_ms: int
    _node_scripts: dict[str, Any] | None = None

    def _node_script(self, name: str) -> Any:
        if self._node_scripts is None:
            self._node_scripts = {
                "save": self._redis.register_script(_SAVE_NODE_LUA),
                "load": self._redis.register_script(_LOAD_CHAIN_LUA),
                "delete": self._redis.register_script(_DELETE_NODE_LUA),
            }
        return self._node_scripts[name]

    async def save_node(self, node: ResponseNode) -> bool:
        result = await self._node_script("save")(
            args=[
                self.key_prefix,
                node.response_id,
                node.parent_id or "",
                node.to_json(),
                node.owner,
                self._ttl_ms,
            ]
        )
        return int(result) == 1

    async def load_chain(self, response_id: str) -> list[ResponseNode]:
        values = await self._node_script("load")(args=[self.key_prefix, response_id])
        return [
            ResponseNode.from_json(_text(values[i]), is_deleted=_text(values[i + 1]) == "1")
            for i in range(0, len(values), 2)
        ]

    async def delete_node(self, response_id: str) -> bool:
        return int(await self._node_script("delete")(args=[self.key_prefix, response_id])) == 1


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
