"""What the TensorRT-LLM backends read from the model: the layout of a trtllm-build engine, and which backend
a model directory needs (`TrtllmConfig` itself is in `deployments/config.py`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from deployments.config import TrtllmConfig


@dataclass(frozen=True, slots=True)
class EngineLayout:
    """What `trtllm-build` fixed in the engine: parallelism, limits and KV block size."""

    tp_size: int
    pp_size: int
    cp_size: int
    max_input_len: int
    max_seq_len: int
    max_batch_size: int | None
    max_num_tokens: int | None
    tokens_per_block: int
    vocab_size: int | None
    architecture: str | None

    @property
    def world_size(self) -> int:
        """MPI ranks (= GPUs) one engine needs: tp * pp * cp."""
        return self.tp_size * self.pp_size * self.cp_size


# PluginConfig.tokens_per_block's default (NVIDIA/TensorRT-LLM tensorrt_llm/plugin/plugin.py@c20322ff,
# `enable_paged_kv_cache(tokens_per_block=32)`; the dataclass-era field also defaulted to 32).
_DEFAULT_TOKENS_PER_BLOCK = 32


def parse_engine_layout(raw: Mapping[str, Any]) -> EngineLayout:
    """Layout from a parsed engine config.json (the `version`/`pretrained_config`/`build_config`
    form that `GptJsonConfig::parse` reads for trtllm-build engines).

    Keys as the C++ runtime reads them (cpp/tensorrt_llm/runtime/gptJsonConfig.cpp@b57221b7, a
    pre-1.0 copy: `pretrained_config.{architecture, vocab_size, mapping.tp_size,
    mapping.pp_size}`, `build_config.{max_batch_size, max_input_len, max_output_len,
    max_num_tokens, plugin_config.tokens_per_block}`); `mapping.cp_size` and
    `build_config.max_seq_len` are the later form, not confirmed from a 1.2 commit of that file.

    Raises:
        ValueError: the file is not a trtllm-build engine config (e.g. a HF checkpoint config).
    """
    pretrained = raw.get("pretrained_config")
    build = raw.get("build_config")
    if not isinstance(pretrained, Mapping) or not isinstance(build, Mapping):
        raise ValueError(
            "not a trtllm-build engine config.json: expected 'pretrained_config' and "
            "'build_config' (is this a HF checkpoint dir instead of an engine dir?)"
        )
    mapping = pretrained.get("mapping") or {}
    tp_size = int(mapping.get("tp_size", 1))
    pp_size = int(mapping.get("pp_size", 1))
    cp_size = int(mapping.get("cp_size", 1))
    max_input_len = int(build.get("max_input_len", 0))
    max_seq_len = build.get("max_seq_len")
    if max_seq_len is None:  # pre-0.9 engines stored max_output_len instead
        max_seq_len = max_input_len + int(build.get("max_output_len", 0))
    plugin = build.get("plugin_config") or {}
    tokens_per_block = plugin.get("tokens_per_block", build.get("tokens_per_block"))
    max_batch_size = build.get("max_batch_size")
    max_num_tokens = build.get("max_num_tokens")
    vocab_size = pretrained.get("vocab_size")
    return EngineLayout(
        tp_size=tp_size,
        pp_size=pp_size,
        cp_size=cp_size,
        max_input_len=max_input_len,
        max_seq_len=int(max_seq_len),
        max_batch_size=None if max_batch_size is None else int(max_batch_size),
        max_num_tokens=None if max_num_tokens is None else int(max_num_tokens),
        tokens_per_block=int(tokens_per_block or _DEFAULT_TOKENS_PER_BLOCK),
        vocab_size=None if vocab_size is None else int(vocab_size),
        architecture=pretrained.get("architecture"),
    )


def is_engine_dir(model_dir: str | Path) -> bool:
    """True for a trtllm-build output dir (its config.json has pretrained_config and
    build_config); False for a Hugging Face checkpoint or anything else."""
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and "build_config" in raw and "pretrained_config" in raw


def resolve_backend(config: TrtllmConfig, model_dir: str | Path) -> Literal["pytorch", "tensorrt"]:
    if config.backend != "auto":
        return config.backend
    return "tensorrt" if is_engine_dir(config.engine_dir or model_dir) else "pytorch"


def has_tokenizer(directory: str | Path) -> bool:
    return any(
        (Path(directory) / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")
    )


def resolve_guided_backend(
    config: TrtllmConfig, backend: Literal["pytorch", "tensorrt"], tokenizer_dir: str | Path
) -> Literal["llguidance", "xgrammar"] | None:
    """The grammar backend (None: no guided decoding). `auto` turns it off when `tokenizer_dir` holds no
    tokenizer (an engine directory alone); a backend named explicitly then fails at load instead.

    Raises:
        ValueError: llguidance on a trtllm-build engine, which the 1.2 C++ runtime refuses
            ("LLGuidance is not supported for guided decoding in C++ runtime.", guidedDecoder.cpp).
    """
    choice = config.guided_decoding_backend
    if choice == "none":
        return None
    if choice == "auto":
        if not has_tokenizer(tokenizer_dir):
            return None
        return "llguidance" if backend == "pytorch" else "xgrammar"
    if choice == "llguidance" and backend == "tensorrt":
        raise ValueError(
            "trtllm.guided_decoding_backend: llguidance runs on the PyTorch backend only; a "
            "trtllm-build engine (the C++ runtime) supports xgrammar"
        )
    return choice


def read_engine_layout(engine_dir: str | Path) -> EngineLayout:
    """Reads `<engine_dir>/config.json`; cheap, so callers may use it at build time (placement).

    Raises:
        FileNotFoundError: no config.json; ValueError: not a trtllm-build engine config.
    """
    path = Path(engine_dir) / "config.json"
    with path.open() as f:
        raw = json.load(f)
    return parse_engine_layout(raw)
