"""The error tree: statuses, Retry-After, the OpenAI error body, and errors that cross processes."""

from __future__ import annotations

import pickle

from deployments.errors import (
    ERROR_CLASSES,
    EngineDead,
    NotFoundError,
    OverloadedError,
    PayloadTooLarge,
    ServingError,
    error_headers,
    to_error_body,
)


def test_retry_after_only_for_retryable_errors() -> None:
    assert error_headers(EngineDead("gone")) == {"retry-after": "1"}
    assert error_headers(OverloadedError("full"), 0.2) == {"retry-after": "1"}
    assert error_headers(NotFoundError("no")) == {}
    assert error_headers(PayloadTooLarge("big")) == {}
    error = OverloadedError("full", retry_after_s=4)
    assert error.status_code == 503 and error_headers(error)["retry-after"] == "4"
    assert to_error_body(error)["error"]["type"] == "overloaded_error"  # type: ignore[index]


def test_errors_keep_their_fields_through_pickling_and_rebuild_by_name() -> None:
    error = OverloadedError("full", param="x", code="engine_overloaded", retry_after_s=3)
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.message, copy.param, copy.code, copy.retry_after_s) == (
        OverloadedError,
        "full",
        "x",
        "engine_overloaded",
        3,
    )
    assert ERROR_CLASSES["EngineDead"] is EngineDead and all(
        issubclass(cls, ServingError) for cls in ERROR_CLASSES.values()
    )
