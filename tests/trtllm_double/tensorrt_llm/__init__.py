"""A pure-Python double of TensorRT-LLM 1.2.x's executor bindings; tests put it on sys.path.

Only `tensorrt_llm.bindings.executor` (+ `.kv_cache`) and `bin/executorWorker` exist. The "model" is
a deterministic hash of the last tokens, so tests can predict outputs and KV block hashes.
"""

__version__ = "1.2.1"
IS_SHEPHERD_DOUBLE = True
