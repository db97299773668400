"""Opens the configured session store (`sessions.store` in serve_config.yaml)."""

from __future__ import annotations

from deployments.config import SessionStoreConfig
from deployments.embedded_model import default_cache_dir
from deployments.sessions.cache import CachedSessionStore
from deployments.sessions.redis import RedisSessionStore
from deployments.sessions.sqlite import SQLiteSessionStore
from deployments.sessions.store import SessionStore


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
