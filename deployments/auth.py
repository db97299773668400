"""API keys: who is calling, compared in constant time; sessions belong to the key that created them."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Sequence
from typing import ClassVar

from deployments.errors import AuthenticationError

logger = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
# Where the ASGI guard leaves the request's key digest (`scope["state"]`, Starlette's `request.state`).
SCOPE_KEY_DIGEST = "shepherd_key_digest"


def _bearer(authorization: str | None) -> bytes:
    if not authorization:
        return b""
    scheme, _, value = authorization.partition(" ")
    return value.strip().encode() if scheme.lower() == "bearer" else b""


def key_digest(authorization: str | None) -> str | None:
    """A stable, non-reversible id of the bearer key (None without one); the key itself is never kept."""
    key = _bearer(authorization)
    return hashlib.sha256(key).hexdigest()[:24] if key else None


class ApiKeys:
    """Configured keys plus `$SHEPHERD_API_KEYS` (comma-separated). With none, the server is open."""

    _warned_open: ClassVar[bool] = False

    def __init__(self, keys: Sequence[str]) -> None:
        env = [k.strip() for k in os.environ.get("SHEPHERD_API_KEYS", "").split(",") if k.strip()]
        self._keys = [k.encode() for k in (*keys, *env)]
        if not self._keys and not ApiKeys._warned_open:
            ApiKeys._warned_open = True
            logger.warning(
                "no API keys configured: the server is open and all sessions share one owner"
            )

    @property
    def is_open(self) -> bool:
        return not self._keys

    def owner_of(self, authorization: str | None, *, digest: str | None = None) -> str:
        """The owner id for an `Authorization: Bearer <key>` header (a hash: keys are never stored).

        `digest` is the key's `key_digest` when the caller already has it (the HTTP guard computed it).
        """
        if self.is_open:
            return ANONYMOUS
        key = _bearer(authorization)
        # Compare against every key so timing does not reveal which one (or whether any) matched.
        matched = False
        for candidate in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise AuthenticationError(
                "a valid API key is required (Authorization: Bearer <key>)", code="invalid_api_key"
            )
        return "key_" + (digest or hashlib.sha256(key).hexdigest()[:24])
