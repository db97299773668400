"""A pure-Python double of TensorRT-LLM 1.2.x; tests put it on sys.path.

`tensorrt_llm.bindings.executor` (+ `.kv_cache`) and `bin/executorWorker` double the C++ Executor
binding; `tensorrt_llm.LLM` / `tensorrt_llm.llmapi` double the LLM API on the PyTorch backend. The
"model" is a deterministic hash of the last tokens, so tests can predict outputs and KV block
hashes.
"""

__version__ = "1.2.1"
IS_SHEPHERD_DOUBLE = True


def __getattr__(name: str) -> object:
    # `tensorrt_llm/__init__.py` exports LLM and SamplingParams; imported lazily here so that the
    # bindings alone import without the LLM API (and without pydantic).
    if name in ("LLM", "SamplingParams"):
        from tensorrt_llm import llmapi

        return getattr(llmapi, name)
    raise AttributeError(name)
