"""`RequestError`: what iterating a `GenerationResult` raises for a per-request error.

tensorrt_llm/executor/executor.py `_handle_background_error` (stored copy, commit not reported by the
index: "# A per-request error, can be captured and ignored / raise RequestError(error)"): an error string from
a response becomes `RequestError(error)`, "A per-request error, can be captured and ignored".
"""


class RequestError(RuntimeError):
    """A per-request error, can be captured and ignored."""
