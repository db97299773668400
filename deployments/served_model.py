"""What the Router knows about the model it serves: its name, context window, tokenizer and chat template,
and how its tool calls are written. Built once per Router replica."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from deployments.config import AppConfig
from deployments.errors import NotFoundError
from deployments.templating import ChatTemplate, load_tokenizer
from deployments.tool_parsers import detect_family


def model_context_window(model_dir: str) -> int | None:
    """The context window a Hugging Face config.json (or a trtllm-build engine config.json) declares."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        return None
    config = json.loads(path.read_text())
    build = config.get("build_config") or {}
    for value in (build.get("max_seq_len"), config.get("max_position_embeddings")):
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass(frozen=True, slots=True)
class ServedModel:
    name: str
    max_model_len: int
    template: ChatTemplate
    # How tool calls are read from generated text; None: this model's template shows no known format.
    tool_parser_family: str | None

    @classmethod
    def load(cls, config: AppConfig, model_dir: str, tokenizer_dir: str) -> ServedModel:
        template = ChatTemplate(load_tokenizer(tokenizer_dir))
        window = config.model.max_model_len or model_context_window(model_dir)
        if window is None:
            raise ValueError(
                f"{model_dir}: no context window in config.json; set model.max_model_len"
            )
        configured = config.router.tool_parser
        chat_template = str(getattr(template.tokenizer, "chat_template", "") or "")
        return cls(
            name=config.model.served_model_name or Path(model_dir).name,
            max_model_len=window,
            template=template,
            tool_parser_family=detect_family(chat_template) if configured == "auto" else configured,
        )

    def check_name(self, model: str | None) -> None:
        """A request naming another model is a 404, as OpenAI answers."""
        if model is not None and model != self.name:
            raise NotFoundError(
                f"the model {model!r} does not exist; this server serves {self.name!r}",
                param="model",
                code="model_not_found",
            )
