"""TrtllmConfig validation and the engine layout read from a trtllm-build config.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from deployments.config import TrtllmConfig
from deployments.executors.trtllm_config import parse_engine_layout, read_engine_layout

ENGINE_CONFIG = {
    "version": "1.2.1",
    "pretrained_config": {
        "architecture": "LlamaForCausalLM",
        "vocab_size": 128256,
        "mapping": {"world_size": 4, "tp_size": 2, "pp_size": 2},
    },
    "build_config": {
        "max_input_len": 4096,
        "max_seq_len": 8192,
        "max_batch_size": 64,
        "max_num_tokens": 8192,
        "plugin_config": {"tokens_per_block": 64},
    },
}


def test_layout_reads_parallelism_limits_and_block_size(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(ENGINE_CONFIG))
    layout = read_engine_layout(tmp_path)
    assert (layout.tp_size, layout.pp_size, layout.world_size) == (2, 2, 4)
    assert (layout.max_input_len, layout.max_seq_len) == (4096, 8192)
    assert (layout.tokens_per_block, layout.vocab_size) == (64, 128256)


def test_layout_defaults_for_a_single_gpu_engine_and_legacy_max_output_len() -> None:
    layout = parse_engine_layout(
        {
            "pretrained_config": {"architecture": "GPT2LMHeadModel"},
            "build_config": {"max_input_len": 100, "max_output_len": 28},
        }
    )
    assert (layout.world_size, layout.max_seq_len, layout.tokens_per_block) == (1, 128, 32)


def test_hf_checkpoint_config_is_rejected_with_a_hint() -> None:
    with pytest.raises(ValueError, match="HF checkpoint"):
        parse_engine_layout({"architectures": ["LlamaForCausalLM"], "hidden_size": 4096})


def test_missing_engine_dir_config_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_engine_layout(tmp_path)


def test_config_forbids_unknown_fields_and_checks_ranges() -> None:
    with pytest.raises(ValidationError):
        TrtllmConfig.model_validate({"enable_kv_reuse": True})
    with pytest.raises(ValidationError):
        TrtllmConfig(free_gpu_memory_fraction=1.0)
    config = TrtllmConfig.model_validate({"scheduler_policy": "max_utilization"})
    assert config.enable_chunked_context and config.enable_block_reuse
