"""Builds the embedded default model offline: a BPE tokenizer trained here and a seeded random Llama.

Its text is meaningless; it exists so that `serve run serve_config.yaml` and the tests work with no download.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "shepherd-tiny"
# Bump when the recipe changes so caches built by older code are not reused.
RECIPE_VERSION = 1
DEFAULT_SEED = 0
CONTEXT_WINDOW = 2048
VOCAB_SIZE = 1024
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]
_TEMPLATE_PATH = Path(__file__).parent / "assets" / "chatml_tools.jinja"

_WORDS = (
    "the a an of to in and is it you that he was for on are with as his they be at one have this from "
    "or had by hot word but what some we can out other were all there when up use your how said each "
    "she which do their time if will way about many then them write would like so these her long make "
    "thing see him two has look more day could go come did number sound no most people my over know "
    "water than call first who may down side been now find any new work part take get place made live "
    "where after back little only round man year came show every good me give our under name very "
    "through just form sentence great think say help low line differ turn cause much mean before move "
    "right boy old too same tell does set three want air well also play small end put home read hand "
    "port large spell add even land here must big high such follow act why ask men change went light "
    "session token cache engine replica router stream batch prefix tensor parallel shepherd serve"
).split()
_EXTRA = (
    "café naïve über straße façade 東京 北京 中文 日本語 한국어 Ελληνικά русский "
    "😀 🚀 ✓ → ≤ ≥ ∑ π € £ ¥ "
    "def class return import from async await yield lambda None True False {} [] () <> == != "
    '{"name": "get_weather", "arguments": {"city": "Paris"}} 0 1 2 3 4 5 6 7 8 9 10 42 100 2048'
).split()


def default_cache_dir() -> Path:
    """`$SHEPHERD_CACHE_DIR`, else `$XDG_CACHE_HOME/shepherd-serve`, else `~/.cache/shepherd-serve`."""
    if env := os.environ.get("SHEPHERD_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shepherd-serve"


def embedded_model_dir(cache_dir: Path | None = None, seed: int = DEFAULT_SEED) -> Path:
    return (
        cache_dir or default_cache_dir()
    ) / f"{EMBEDDED_MODEL_NAME}-r{RECIPE_VERSION}-seed{seed}"


def ensure_embedded_model(cache_dir: Path | None = None, seed: int = DEFAULT_SEED) -> Path:
    """Returns the model directory, building it first if no complete build is cached."""
    return build_once(
        embedded_model_dir(cache_dir, seed), lambda staging: build_embedded_model(staging, seed)
    )


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Returns `target`, first running `build(staging_dir)` unless a complete build (a config.json) is there.

    Safe to call from several processes at once: a file lock serialises builders and the finished
    directory appears atomically (rename), so readers never see a half-written model.
    """
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build(staging)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _progress(step: int, total: int, what: str) -> None:
    print(
        f"[shepherd] building embedded model ({step}/{total}): {what}", file=sys.stderr, flush=True
    )


def generate_corpus(seed: int, num_lines: int = 4000) -> list[str]:
    """Deterministic training text: English-like word salad with multilingual, emoji and code fragments."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), rng.choice(_EXTRA))
        line = " ".join(words)
        lines.append(line[0].upper() + line[1:] + rng.choice([".", "?", "!", ":"]))
    return lines


def build_embedded_model(out_dir: Path, seed: int = DEFAULT_SEED) -> None:
    """Writes tokenizer + model + generation config into `out_dir` (no network)."""
    # Heavy imports stay local: the router imports this module only to resolve paths.
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    _progress(1, 3, "training a byte-level BPE tokenizer")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(generate_corpus(seed), trainer=trainer)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=CONTEXT_WINDOW,
    )
    hf_tokenizer.chat_template = _TEMPLATE_PATH.read_text()
    hf_tokenizer.save_pretrained(out_dir)

    _progress(2, 3, "initialising a seeded Llama")
    config = LlamaConfig(
        vocab_size=len(hf_tokenizer),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT_WINDOW,
        eos_token_id=hf_tokenizer.eos_token_id,
        pad_token_id=hf_tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        # Default init (0.02) leaves the residual stream dominated by the input embedding, so greedy decoding
        # repeats one token forever; a wider init makes outputs depend on the context.
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=hf_tokenizer.eos_token_id, pad_token_id=hf_tokenizer.pad_token_id
    )
    _progress(3, 3, f"saving to {out_dir}")
    model.save_pretrained(out_dir)
