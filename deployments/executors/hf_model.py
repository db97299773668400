"""The transformers model and its continuous-batching manager, as every tensor-parallel rank builds them.

The executor (hf.py) and the ranks it spawns (hf_tp.py) both build from here, so neither imports the other's
module for it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, cast

from deployments.config import TransformersEngineConfig
from deployments.errors import EngineError
from deployments.executors.hf_attention import use_varlen_attention
from deployments.executors.hf_cache import resolve_num_blocks

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.generation.continuous_batching import ContinuousBatchingManager

# The base GenerationConfig must hold non-default values so that CB creates the per-request temperature,
# top-k and top-p processors at all (transformers PR #45553); every request then overrides all three.
_BASE_TEMPERATURE = 0.7
_BASE_TOP_K = 50
_BASE_TOP_P = 0.9


# Continuous batching with per-request sampling, prefix sharing and register_result_handler. The
# router needs far less (TensorRT-LLM 1.2 pins transformers==4.57.3), so the package allows older
# versions and this engine checks its own minimum when a replica starts.
MIN_TRANSFORMERS_VERSION = (5, 24)


def check_transformers_version(version: str | None = None) -> None:
    """Raises EngineError naming the installed and the needed transformers."""
    import transformers

    found = version or str(transformers.__version__)
    parts = tuple(int(p) for p in found.split(".")[:2] if p.isdigit())
    if parts < MIN_TRANSFORMERS_VERSION:
        needed = ".".join(map(str, MIN_TRANSFORMERS_VERSION))
        raise EngineError(
            f"engine.kind: transformers needs transformers>={needed} (continuous batching), but "
            f"{found} is installed (TensorRT-LLM images pin their own): install "
            f"'shepherd-serve[cb]' in another environment, or use engine.kind: trtllm here"
        )


def resolve_device(config: TransformersEngineConfig) -> str:
    if config.device != "auto":
        return config.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    model_dir: str,
    config: TransformersEngineConfig,
    device: str,
    *,
    rank: int = 0,
    device_ids: list[int] | None = None,
) -> PreTrainedModel:
    """The model in eval mode on `device`; with `config.tensor_parallel_size` > 1, this rank's shard.

    Args:
        rank, device_ids: tensor parallel only: this process's rank (torch.distributed is initialized) and
            the CUDA ordinal of each rank (empty on the CPU).
    """
    import torch
    from transformers import AutoModelForCausalLM, DistributedConfig

    dtype = {
        "auto": "auto",
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[config.dtype]
    tp_size = config.tensor_parallel_size
    # The varlen kernel is switched to once the model is loaded (hf_attention.use_varlen_attention says why).
    is_varlen = config.attn_implementation == "varlen"
    load_attention = "sdpa" if is_varlen else config.attn_implementation
    if tp_size == 1:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=load_attention
        )
        if is_varlen:
            use_varlen_attention(model)
        # Any: the decorator on transformers' `to` hides its signature from mypy.
        return cast("PreTrainedModel", cast(Any, model).to(device).eval())
    # transformers binds each rank to the CUDA device numbered LOCAL_RANK (distributed/utils.py
    # `_bind_local_device`), which is a torchrun convention; a spawned rank names its device here.
    previous = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = str(device_ids[rank] if device_ids else 0)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=dtype,
            attn_implementation=load_attention,
            distributed_config=DistributedConfig(tp_size=tp_size),
        )
        if is_varlen:
            use_varlen_attention(model)
    finally:
        if previous is None:
            del os.environ["LOCAL_RANK"]
        else:
            os.environ["LOCAL_RANK"] = previous
    return cast("PreTrainedModel", cast(Any, model).eval())


def runs_processors(config: TransformersEngineConfig, device: str) -> bool:
    """Whether this engine runs our per-request processors (seeds, penalties, logit_bias, top logprobs,
    grammars). Not with greedy only (nothing to process), not inside a CUDA graph (it would capture one
    request mix), and not across tensor-parallel ranks: every rank samples its own copy of each token, and
    the processors' state (grammars, seeded generators) lives on the replica only, so the ranks would diverge.
    """
    return (
        config.sampling != "greedy"
        and not _uses_cuda_graph(config, device)
        and config.tensor_parallel_size == 1
    )


def _uses_cuda_graph(config: TransformersEngineConfig, device: str) -> bool:
    return config.use_cuda_graph if device != "cpu" else False


def create_manager(
    model: PreTrainedModel,
    config: TransformersEngineConfig,
    device: str,
    gpu_fraction: float = 1.0,
    *,
    has_processors: bool = False,
) -> ContinuousBatchingManager:
    """The continuous-batching manager, not started; every tensor-parallel rank builds the same one.

    Args:
        gpu_fraction: the share of its GPU this replica holds, which `num_blocks: auto` sizes the cache from.
        has_processors: our processors will be attached (`runs_processors`): they report the logprobs, and
            read each request's previous token before the next step is prepared.
    """
    from transformers import ContinuousBatchingConfig, GenerationConfig

    is_greedy_only = config.sampling == "greedy"
    # Greedy only: no processors at all, CB takes the argmax of the logits (transformers serve's default).
    sampling: dict[str, Any] = (
        {"do_sample": False}
        if is_greedy_only
        else {
            "do_sample": True,
            "temperature": _BASE_TEMPERATURE,
            "top_k": _BASE_TOP_K,
            "top_p": _BASE_TOP_P,
        }
    )
    generation_config = GenerationConfig(
        **sampling,
        max_new_tokens=16,
        eos_token_id=-1,
        pad_token_id=model.config.pad_token_id or 0,
    )
    cb_config = ContinuousBatchingConfig(
        num_blocks=resolve_num_blocks(model, config, device, gpu_fraction),
        max_batch_tokens=config.max_batch_tokens,
        page_size=config.page_size,
        max_requests_per_batch=config.max_requests_per_batch,
        allow_block_sharing=config.enable_prefix_sharing,
        per_request_processors=not is_greedy_only,
        # Without our processors the sampled token's logprob comes from transformers; with them, the
        # processors report the model's own logprobs.
        return_logprobs=not has_processors,
        use_cuda_graph=_uses_cuda_graph(config, device),
        use_async_batching=False if has_processors else None,
        scheduler_type=config.scheduler,
    )
    # Any: mypy reads the mixin's method through torch's `Module.__getattr__`.
    manager = cast(Any, model).init_continuous_batching(
        generation_config=generation_config, continuous_batching_config=cb_config
    )
    return cast("ContinuousBatchingManager", manager)
