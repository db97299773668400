"""API keys: who is calling, compared in constant time; sessions belong to the key that created them."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Sequence
from typing import ClassVar

from deployments.errors import ServingError

logger = logging.getLogger(__name__)

ANONYMOUS = "anonymous"


class AuthenticationError(ServingError):
    status_code = 401
    error_type = "authentication_error"


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

    def owner_of(self, authorization: str | None) -> str:
        """The owner id for an `Authorization: Bearer <key>` header (a hash: keys are never stored)."""
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
        return "key_" + hashlib.sha256(key).hexdigest()[:24]


def _bearer(authorization: str | None) -> bytes:
    if not authorization:
        return b""
    scheme, _, value = authorization.partition(" ")
    return value.strip().encode() if scheme.lower() == "bearer" else b""
