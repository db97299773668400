from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from deployments.embedded_model import build_embedded_model, generate_corpus
from deployments.templating import ChatTemplate


def _digest(directory: Path, name: str) -> str:
    return hashlib.sha256((directory / name).read_bytes()).hexdigest()


def test_same_seed_builds_identical_tokenizer_and_weights(model_dir: Path, tmp_path: Path) -> None:
    build_embedded_model(tmp_path, seed=0)
    for name in ("tokenizer.json", "model.safetensors", "config.json"):
        assert _digest(tmp_path, name) == _digest(model_dir, name), name


def test_other_seed_gives_other_corpus() -> None:
    assert generate_corpus(0) == generate_corpus(0)
    assert generate_corpus(0) != generate_corpus(1)


def test_chat_template_renders_system_prompt_and_tools(tokenizer: Any) -> None:
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    ids = ChatTemplate(tokenizer).render(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What time is it?"},
        ],
        tools=[tool],
    )
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert '"name": "get_time"' in text
    assert text.endswith("<|im_start|>user\nWhat time is it?<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_renders_tool_calls_and_results(tokenizer: Any) -> None:
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "w", "arguments": '{"city": "Oslo"}'}}
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]
    text = tokenizer.decode(ChatTemplate(tokenizer).render(messages))
    assert '<tool_call>\n{"name": "w", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>" in text
