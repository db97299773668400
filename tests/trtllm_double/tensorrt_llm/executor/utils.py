"""`RequestError`: what iterating a `GenerationResult` raises for a per-request error.

tensorrt_llm/executor/executor.py `_handle_background_error` (1.1/1.2 line): an error string from
a response becomes `RequestError(error)`, "A per-request error, can be captured and ignored".
"""


class RequestError(RuntimeError):
    """A per-request error, can be captured and ignored."""
