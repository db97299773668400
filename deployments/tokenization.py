"""Loading the tokenizer and turning prompts and chat messages into token ids (the router's only text->ids step)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from deployments.errors import RequestError


def load_tokenizer(path: str | Path) -> Any:
    """A fast (Rust) tokenizer: incremental detokenization needs `tokenizers`' DecodeStream."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{path}: a fast tokenizer (tokenizer.json) is required")
    return tokenizer


class ChatTemplate:
    """Renders OpenAI messages with the model's own chat template into prompt token ids."""

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the tokenizer has no chat template; serve /v1/completions only or add one"
            )
        self._tokenizer = tokenizer

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        return self.encode(
            self.render_text(messages, tools=tools, add_generation_prompt=add_generation_prompt)
        )

    def render_text(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        try:
            text = self._tokenizer.apply_chat_template(
                list(messages),
                tools=list(tools) if tools else None,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        except (TemplateError, ValueError, TypeError) as error:
            raise RequestError(
                f"the chat template rejected the messages: {error}", param="messages"
            ) from error
        return str(text)

    def encode(self, rendered: str) -> list[int]:
        """Ids of rendered template text: special tokens come from the template itself, none are added."""
        return list(self._tokenizer.encode(rendered, add_special_tokens=False))


def encode(tokenizer: Any, text: str, *, add_special_tokens: bool = True) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def stop_token_ids(tokenizer: Any) -> tuple[int | None, tuple[tuple[int, ...], ...]]:
    """(end_id, extra single-token stop sequences): chat models end turns with tokens other than EOS too."""
    end_id = tokenizer.eos_token_id
    extra: list[tuple[int, ...]] = []
    for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id != end_id:
            extra.append((token_id,))
    return end_id, tuple(extra)
