"""Every exception the server raises, and the one mapping onto OpenAI-shaped HTTP errors.

ServingError (500)
├── RequestError (400)             bad input; `param` names the field
│   ├── ContextLengthExceeded      prompt + max_tokens > context window
│   ├── RequestTimeout (408)       the request body stopped arriving
│   └── PayloadTooLarge (413)      the request body is over the cap
├── AuthenticationError (401)      no or a wrong API key
├── NotFoundError (404)            unknown model or session
├── ConflictError (409)            session already generating, or saved by another request
├── TooManySessions (429)          the key holds its maximum of live sessions
├── KeyConcurrencyExceeded (429)   the key has its maximum of requests in flight; `retry_after_s`
├── OverloadedError (503)          a queue is full; `retry_after_s`
└── EngineError (500)              the engine failed a request
    └── EngineDead (503)           the engine stopped; fails check_health

Core code raises; the router's exception handler and the ASGI guard answer with `error_body` and
`error_headers`. Errors cross Ray process boundaries and the engine channel, so they rebuild by class name.
"""

from __future__ import annotations

import math
from typing import ClassVar


class ServingError(Exception):
    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    # Answers with this status carry `Retry-After` (a client should come back, not give up).
    is_retryable: ClassVar[bool] = False
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only fields survive pickling (Ray) by rebuilding through the constructor.
        return (_rebuild, (type(self), self.message, self.param, self.code, self.retry_after_s))


def _rebuild(
    cls: type[ServingError],
    message: str,
    param: str | None,
    code: str | None,
    retry_after_s: float | None,
) -> ServingError:
    return cls(message, param=param, code=code, retry_after_s=retry_after_s)


class RequestError(ServingError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(RequestError):
    default_code = "context_length_exceeded"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = "messages",
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code, retry_after_s=retry_after_s)


class RequestTimeout(RequestError):
    status_code = 408
    default_code = "request_timeout"


class PayloadTooLarge(RequestError):
    status_code = 413
    default_code = "request_too_large"


class AuthenticationError(ServingError):
    status_code = 401
    error_type = "authentication_error"


class NotFoundError(ServingError):
    status_code = 404
    error_type = "not_found_error"


class ConflictError(ServingError):
    status_code = 409
    error_type = "conflict_error"


class TooManySessions(ServingError):
    status_code = 429
    error_type = "rate_limit_error"


class KeyConcurrencyExceeded(ServingError):
    status_code = 429
    error_type = "rate_limit_error"
    is_retryable = True


class OverloadedError(ServingError):
    status_code = 503
    error_type = "overloaded_error"
    is_retryable = True


class EngineError(ServingError):
    status_code = 500
    error_type = "engine_error"


class EngineDead(EngineError):
    status_code = 503
    is_retryable = True


def _subclasses(cls: type[ServingError]) -> list[type[ServingError]]:
    return [cls, *(sub for child in cls.__subclasses__() for sub in _subclasses(child))]


# By name, for errors that cross a process boundary as data (the engine channel).
ERROR_CLASSES: dict[str, type[ServingError]] = {
    cls.__name__: cls for cls in _subclasses(ServingError)
}


def to_error_body(error: ServingError) -> dict[str, object]:
    """The OpenAI error object: {"error": {"message", "type", "param", "code"}}."""
    return {
        "error": {
            "message": error.message,
            "type": error.error_type,
            "param": error.param,
            "code": error.code if error.code is not None else error.status_code,
        }
    }


def error_headers(error: ServingError, default_retry_after_s: float = 1.0) -> dict[str, str]:
    """`Retry-After` (whole seconds, at least 1) for the errors a client should retry."""
    if not error.is_retryable:
        return {}
    seconds = error.retry_after_s or default_retry_after_s
    return {"retry-after": str(max(1, math.ceil(seconds)))}
