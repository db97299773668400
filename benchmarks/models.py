"""Benchmark models: greedy decoding that never ends early, so every request yields exactly `max_tokens`.

A random model stops whenever greedy decoding happens to pick an end token, which makes output lengths (and
so throughput) depend on the server's exact numerics. Zeroing the output-embedding rows of special tokens (and
of ids the tokenizer cannot decode) gives them logit 0, which greedy decoding never picks while any other
logit is positive; with hundreds of random logits one always is. Load shapes stay exactly the model's own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def _special_ids(tokenizer_dir: Path) -> list[int]:
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    return sorted(token["id"] for token in data.get("added_tokens", []))


def _silence(model: Any, token_ids: list[int], first_undecodable: int | None) -> None:
    import torch

    with torch.no_grad():
        weight = model.get_output_embeddings().weight
        weight[token_ids] = 0
        if first_undecodable is not None:
            weight[first_undecodable:] = 0


def no_eos_copy(src: str | Path, dst: str | Path) -> Path:
    """A copy of a (small) model directory whose greedy decoding never emits a special token."""
    from transformers import AutoModelForCausalLM

    src, dst = Path(src), Path(dst)
    if (dst / "config.json").exists():
        return dst
    model = AutoModelForCausalLM.from_pretrained(src)
    _silence(model, _special_ids(src), None)
    staging = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, staging / name)
    staging.rename(dst)
    return dst


# What CPU dry runs of the GPU benchmarks build instead (two heads per tensor-parallel rank at TP=2).
TINY_SHAPE: dict[str, Any] = {
    "vocab_size": 2048,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}
LLAMA_3_2_1B_SHAPE: dict[str, Any] = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
}


def llama_1b_shaped(
    tokenizer_dir: str | Path,
    dst: str | Path,
    *,
    dtype: str = "bfloat16",
    seed: int = 0,
    shape: dict[str, Any] | None = None,
) -> Path:
    """A random-initialised model of Llama-3.2-1B's shape (1.24 B parameters, 128,256-id tied embeddings),
    saved with the embedded model's tokenizer; ids the tokenizer lacks and special ids are silenced.
    `shape` overrides dimensions (a CPU dry run uses a small one)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer_dir, dst = Path(tokenizer_dir), Path(dst)
    if (dst / "config.json").exists():
        return dst
    num_tokenizer_ids = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    config = LlamaConfig(
        **{**LLAMA_3_2_1B_SHAPE, **(shape or {})},
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    _silence(model, _special_ids(tokenizer_dir), num_tokenizer_ids)
    staging = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, staging / name)
    staging.rename(dst)
    return dst
