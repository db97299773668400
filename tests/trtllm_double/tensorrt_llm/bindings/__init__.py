"""Mirrors `tensorrt_llm.bindings`; only the `executor` submodule is doubled."""

from tensorrt_llm.bindings import executor

__all__ = ["executor"]
