"""Double of `tensorrt_llm.llmapi` (PyTorch backend): `LLM`, `KvCacheConfig`, `SamplingParams`,
`KvCacheRetentionConfig` (the binding's class, re-exported as `llmapi.llm_utils` does)."""

from tensorrt_llm.bindings.executor import KvCacheRetentionConfig

from ..executor.result import CompletionOutput
from ..sampling_params import GuidedDecodingParams, SamplingParams
from .llm import LLM, RequestOutput
from .llm_args import KvCacheConfig

__all__ = [
    "LLM",
    "CompletionOutput",
    "GuidedDecodingParams",
    "KvCacheConfig",
    "KvCacheRetentionConfig",
    "RequestOutput",
    "SamplingParams",
]
