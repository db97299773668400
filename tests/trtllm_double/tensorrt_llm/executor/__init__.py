"""Double of `tensorrt_llm.executor` (only what the LLM API's results expose)."""

from .result import CompletionOutput, GenerationResult, IterationResult, Logprob
from .utils import RequestError

__all__ = ["CompletionOutput", "GenerationResult", "IterationResult", "Logprob", "RequestError"]
