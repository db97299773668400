"""Double of `tensorrt_llm/llmapi/llm_args.py`: `KvCacheConfig` and the names `LLM(**kwargs)`
accepts on the PyTorch backend.

KvCacheConfig fields and defaults as read at NVIDIA/TensorRT-LLM tensorrt_llm/llmapi/llm_args.py@c40f1157
(`class KvCacheConfig(StrictBaseModel, PybindMirror)`: `free_gpu_memory_fraction=None`, the 90%
default being the C++ KvCacheConfig's that `_to_pybind` hands None to; `event_buffer_max_size=0`
disables events; `tokens_per_block=32` is the PyTorch backend's block size). That class has
validators for `max_gpu_total_bytes` and `max_attention_window` only; the fraction's range is
checked by the binding (the bindings double's `KvCacheConfig`). `StrictBaseModel` forbids unknown
fields, so a misspelt knob fails at construction. The names in TORCH_LLM_ARGS are BaseLlmArgs'
fields at the same commit (plus TorchLlmArgs' the double knows).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class KvCacheConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enable_block_reuse: bool = True
    max_tokens: int | None = None
    max_attention_window: list[int] | None = None
    sink_token_length: int | None = None
    free_gpu_memory_fraction: float | None = None
    host_cache_size: int | None = None
    onboard_blocks: bool = True
    cross_kv_cache_fraction: float | None = None
    secondary_offload_min_priority: int | None = None
    event_buffer_max_size: int = 0
    attention_dp_events_gather_period_ms: int = 5
    enable_partial_reuse: bool = True
    copy_on_partial_reuse: bool = True
    use_uvm: bool = False
    max_gpu_total_bytes: int = 0
    dtype: str = "auto"
    mamba_ssm_cache_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    tokens_per_block: int = 32


# BaseLlmArgs' fields (and those of TorchLlmArgs the double knows); BaseLLM.__init__ rejects any
# other keyword with ValueError("LLM got invalid argument: <key>").
TORCH_LLM_ARGS = frozenset(
    """model tokenizer tokenizer_mode skip_tokenizer_init trust_remote_code tensor_parallel_size
    dtype revision tokenizer_revision pipeline_parallel_size context_parallel_size gpus_per_node
    moe_cluster_parallel_size moe_tensor_parallel_size moe_expert_parallel_size
    enable_attention_dp enable_lm_head_tp_in_adp cp_config load_format
    fail_fast_on_attention_window_too_large enable_lora lora_config kv_cache_config
    enable_chunked_prefill guided_decoding_backend batched_logits_processor
    iter_stats_max_iterations request_stats_max_iterations peft_cache_config scheduler_config
    cache_transceiver_config sparse_attention_config speculative_config max_batch_size
    max_input_len max_seq_len max_beam_width max_num_tokens gather_generation_logits
    num_postprocess_workers postprocess_tokenizer_dir reasoning_parser return_perf_metrics
    orchestrator_type stream_interval cuda_graph_config attn_backend sampler_type
    disable_overlap_scheduler enable_iter_perf_stats print_iter_log backend""".split()
)
