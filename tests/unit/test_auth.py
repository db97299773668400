"""API keys: digests that never reveal the key, owners per key, constant-time checks."""

from __future__ import annotations

import pytest

from deployments.auth import ApiKeys, key_digest
from deployments.errors import AuthenticationError


def test_key_digest_hashes_bearer_keys_and_never_returns_the_key() -> None:
    assert (
        key_digest(None) is None
        and key_digest("Basic abc") is None
        and key_digest("Bearer ") is None
    )
    ident = key_digest("Bearer secret-key")
    assert (
        ident is not None and "secret" not in ident and ident == key_digest("bearer  secret-key ")
    )
    assert ident != key_digest("Bearer other-key")


def test_the_owner_is_the_keys_digest_and_a_wrong_key_is_a_401() -> None:
    keys = ApiKeys(["secret-key"])
    owner = keys.owner_of("Bearer secret-key")
    assert owner == "key_" + (key_digest("Bearer secret-key") or "")
    assert keys.owner_of("Bearer secret-key", digest=key_digest("Bearer secret-key")) == owner
    with pytest.raises(AuthenticationError) as refused:
        keys.owner_of("Bearer wrong")
    assert refused.value.status_code == 401
