"""Exception tree and its single mapping onto OpenAI-shaped HTTP errors.

ServingError
├── RequestError (400)          bad input; `param` names the field
│   └── ContextLengthExceeded   prompt + max_tokens > context window
├── NotFoundError (404)         unknown model or session
├── ConflictError (409)         session already generating
├── OverloadedError (503)       queue full; `retry_after_s`
└── EngineError (500)           the engine failed a request
    └── EngineDead (503)        the engine stopped; fails check_health
"""

from __future__ import annotations

from typing import ClassVar


class ServingError(Exception):
    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def __reduce__(self) -> tuple[object, ...]:
        # Errors cross Ray process boundaries; keep keyword-only fields through pickling.
        return (_rebuild, (type(self), self.message, self.param, self.code))


def _rebuild(
    cls: type[ServingError], message: str, param: str | None, code: str | None
) -> ServingError:
    return cls(message, param=param, code=code)


class RequestError(ServingError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(RequestError):
    def __init__(
        self, message: str, *, param: str | None = "messages", code: str | None = None
    ) -> None:
        super().__init__(message, param=param, code=code or "context_length_exceeded")


class NotFoundError(ServingError):
    status_code = 404
    error_type = "not_found_error"


class ConflictError(ServingError):
    status_code = 409
    error_type = "conflict_error"


class OverloadedError(ServingError):
    status_code = 503
    error_type = "overloaded_error"


class EngineError(ServingError):
    status_code = 500
    error_type = "engine_error"


class EngineDead(EngineError):
    status_code = 503


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
