"""The one prompt path of the Router: the model's tokenizer and chat template, text to ids and back.

Sessions and session-less requests both render through `ChatTemplate`; a session continues from the exact
ids the engine saw (`continue_from`), and every request stops on the same end-of-turn ids (`stop_ids`).
Text that came from a client (message contents, names, tool calls and tool schemas) never becomes a special
token: only the template's own markers are encoded as special ids (`RenderedPrompt`).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from jinja2 import TemplateError

from deployments.errors import ContextLengthExceeded, RequestError

P = ParamSpec("P")
T = TypeVar("T")

# Work on more characters than this is rendered and tokenized on a worker thread (tokenizers release the GIL
# while they encode), so that the Router's loop keeps answering other requests meanwhile.
OFF_LOOP_CHARS = 16_384

# Chat models end a turn with one of these as well as (or instead of) their EOS token.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>")


# Model types for which AutoTokenizer takes tokenizer_config.json's `tokenizer_class` as it is: transformers
# maps no tokenizer of its own to them and keeps no override for them (tests/unit/test_templating.py reads
# both tables). Both models the project ships (the embedded one, SmolLM2 from its GGUF) are llama.
_TYPES_THAT_KEEP_THE_DECLARED_TOKENIZER = frozenset({"llama"})


def load_tokenizer(path: str | Path) -> Any:
    """A fast (Rust) tokenizer: incremental detokenization needs `tokenizers`' DecodeStream.

    A directory that declares the plain `TokenizersBackend`, for a model type AutoTokenizer does not remap, is
    loaded with that class directly: AutoTokenizer resolves to the same class and call, but on the way
    imports torch through transformers' model configurations (3 s of CPU per Router start on a 2-core
    machine, in a process that never uses torch).
    """
    if _declares_plain_backend(Path(path)):
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        tokenizer = TokenizersBackend.from_pretrained(str(path))
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{path}: a fast tokenizer (tokenizer.json) is required")
    return tokenizer


def _declares_plain_backend(path: Path) -> bool:
    """Whether AutoTokenizer would load `path` as `TokenizersBackend.from_pretrained(path)`, as far as the
    directory's own files decide it: the declared class, no remote code, a type without an override."""
    try:
        tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
        model_config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        tokenizer_config.get("tokenizer_class") == "TokenizersBackend"
        and "auto_map" not in tokenizer_config
        and "auto_map" not in model_config
        and model_config.get("model_type") in _TYPES_THAT_KEEP_THE_DECLARED_TOKENIZER
    )


async def off_loop(num_chars: int, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`fn(*args, **kwargs)`, on a worker thread when it works on more than OFF_LOOP_CHARS characters
    (a thread hop costs more than rendering a short conversation)."""
    if num_chars <= OFF_LOOP_CHARS:
        return fn(*args, **kwargs)
    if num_chars <= TRIM_CHARS:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return await asyncio.to_thread(_then_trim, functools.partial(fn, *args, **kwargs))


# After work on more characters than this, the heap is trimmed: glibc keeps what a large tokenization grew
# (in the worker thread's own arena) instead of returning it, and the Router's memory would only grow
# (300 MiB after five 600k-character prompts on the embedded model; flat with the trim).
TRIM_CHARS = 1 << 18


def _then_trim(work: Callable[[], T]) -> T:
    try:
        return work()
    finally:
        trim = _malloc_trim()
        if trim is not None:
            trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None on another C library."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def declared_end_token_ids(model_dir: str | Path) -> list[int]:
    """The end-of-turn ids a model declares: `eos_token_id` (one id or a list) of its generation_config.json,
    else of its config.json; [] when neither names any."""
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if not path.is_file():
            continue
        value = json.loads(path.read_text()).get("eos_token_id")
        values = value if isinstance(value, list) else [value]
        token_ids = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
        if token_ids:
            return token_ids
    return []


def stop_token_ids(tokenizer: Any) -> tuple[int | None, tuple[tuple[int, ...], ...]]:
    """(end_id, extra single-token stop sequences): the ids the model declares (a model with several EOS ids
    stops on any), and the usual chat end tokens its vocabulary has."""
    end_id = tokenizer.eos_token_id
    extra: list[tuple[int, ...]] = []
    common = [tokenizer.convert_tokens_to_ids(token) for token in _END_OF_TURN_TOKENS]
    known = [t for t in common if isinstance(t, int) and t != tokenizer.unk_token_id]
    for token_id in [*declared_end_token_ids(tokenizer.name_or_path), *known]:
        if token_id != end_id and (token_id,) not in extra:
            extra.append((token_id,))
    return end_id, tuple(extra)


# The most code points one character's canonical decomposition has (U+1F82): NFC/NFKC composition shrinks a
# text by at most this factor.
_MAX_COMPOSITION = 4


def max_chars_per_token(spec: dict[str, Any]) -> int | None:
    """An upper bound on how many characters of input text one token can stand for, from a `tokenizer.json`
    spec; None when this tokenizer may drop or merge text without bound (then no bound is applied).

    A token covers a piece of the normalized, pre-tokenized text; its vocabulary string is at least that long
    (byte-level BPE writes one character per byte, SentencePiece one per character, byte-fallback six per
    byte). So a text of N characters needs at least N / (longest vocabulary string * what the normalizer may
    shrink it by) tokens, however it is tokenized. Tokenizers that can drop text (strip, whitespace-removing
    pre-tokenizers, a fused unknown token, added tokens that swallow whitespace) get None.
    """
    factor = _shrink_factor(spec.get("normalizer"))
    if factor is None or not _keeps_text(spec.get("pre_tokenizer")):
        return None
    model = spec.get("model") or {}
    kind = model.get("type")
    if kind == "BPE":
        if model.get("fuse_unk") and not model.get("byte_fallback"):
            return None
        vocab: Sequence[str] = list(model.get("vocab") or {})
    elif kind == "Unigram" and model.get("byte_fallback"):
        vocab = [piece for piece, _ in model.get("vocab") or []]
    else:
        return (
            None  # WordPiece, WordLevel, Unigram without byte fallback: one unknown token per word
        )
    added = spec.get("added_tokens") or []
    if any(token.get("lstrip") or token.get("rstrip") for token in added):
        return None
    longest = max((len(piece) for piece in [*vocab, *(t["content"] for t in added)]), default=0)
    return longest * factor if longest else None


def _shrink_factor(normalizer: dict[str, Any] | None) -> int | None:
    if normalizer is None:
        return 1
    kind = normalizer.get("type")
    if kind == "Sequence":
        factor = 1
        for step in normalizer.get("normalizers") or []:
            step_factor = _shrink_factor(step)
            if step_factor is None:
                return None
            factor *= step_factor
        return factor
    if kind in ("NFD", "NFKD", "Lowercase", "Prepend"):
        return 1
    if kind in ("NFC", "NFKC"):
        return _MAX_COMPOSITION
    if kind == "Replace":
        pattern, content = normalizer.get("pattern") or {}, normalizer.get("content", "")
        text = pattern.get("String")
        if text is not None and content and len(content) >= len(text):
            return 1
    return (
        None  # Strip, StripAccents, BertNormalizer, Precompiled, regex replacements: may drop text
    )


def _keeps_text(pre_tokenizer: dict[str, Any] | None) -> bool:
    if pre_tokenizer is None:
        return True
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        return all(_keeps_text(step) for step in pre_tokenizer.get("pretokenizers") or [])
    if kind == "Split":
        return pre_tokenizer.get("behavior") != "Removed"
    return kind in ("ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts")


def _trie_pattern(words: Sequence[str]) -> str:
    """One regex for a set of literal strings, factored by common prefix: a text full of near misses
    ("<|<|<|...") is scanned in linear time, as an alternation of 256 special tokens would not be."""
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def build(node: dict[str, Any]) -> str:
        branches = [re.escape(char) + build(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return build(trie)


@dataclass(frozen=True, slots=True)
class RenderedPrompt:
    """A chat template's output: the text, and where the template's own special tokens are in it.

    `markers` is None when no client text held a special token's text: every special token in `text` is then
    the template's, and the text encodes as a whole. Otherwise it lists the template's special tokens as
    (start, end, token id), and the text between them encodes with special tokens split (as plain text).
    """

    text: str
    markers: tuple[tuple[int, int, int], ...] | None = None


class ChatTemplate:
    """Renders OpenAI messages with the model's own chat template into prompt token ids, and owns every other
    text<->ids step of the Router (plain prompts, decoding, the end-of-turn ids).

    A tokenizer without a chat template still serves plain prompts; rendering then raises a 400.
    """

    def __init__(self, tokenizer: Any) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.end_id, self.stop_sequences = stop_token_ids(tokenizer)
        self.vocab_size = len(tokenizer)
        backend_json = tokenizer.backend_tokenizer.to_str()
        spec = json.loads(backend_json)
        self.max_chars_per_token = max_chars_per_token(spec)
        # Special tokens (control tokens), and a copy of the tokenizer that reads their text as plain text.
        # A copy, because transformers sets `encode_special_tokens` on the shared one on every call.
        self._special_ids = {
            token["content"]: token["id"] for token in spec["added_tokens"] if token["special"]
        }
        self._specials = re.compile(_trie_pattern(list(self._special_ids)) or "(?!)")
        self._text_tokenizer = Tokenizer.from_str(backend_json)
        self._text_tokenizer.encode_special_tokens = True
        # Client text is rendered with each special token's text replaced by a placeholder no client can
        # guess (random per replica, ASCII letters and digits, so template filters leave it alone).
        nonce = secrets.token_hex(8)
        self._names = list(self._special_ids)
        self._index_of = {name: index for index, name in enumerate(self._names)}
        self._placeholder = re.compile(f"SHEPHERD{nonce}S([0-9]+)E")
        self._nonce = nonce

    # ---- chat ------------------------------------------------------------------------------------------
    def render(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        return self.encode_rendered(
            self.render_prompt(messages, tools=tools, add_generation_prompt=add_generation_prompt)
        )

    def render_text(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        return self.render_prompt(
            messages, tools=tools, add_generation_prompt=add_generation_prompt
        ).text

    def render_prompt(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> RenderedPrompt:
        """The template's rendering, knowing which special tokens are the template's own.

        Client text holding a special token's text is rendered with a placeholder in its place, so every
        special token left in the output is the template's; the placeholders then get their text back.
        """
        if not self.has_template:
            raise RequestError(
                "this model has no chat template; use /v1/completions", param="messages"
            )
        shielded = self._shield([list(messages), list(tools) if tools else None])
        try:
            text = str(
                self.tokenizer.apply_chat_template(
                    shielded[0] if shielded else list(messages),
                    tools=(shielded[1] if shielded else list(tools) if tools else None),
                    add_generation_prompt=add_generation_prompt,
                    tokenize=False,
                )
            )
        except (TemplateError, ValueError, TypeError) as error:
            raise RequestError(
                f"the chat template rejected the messages: {error}", param="messages"
            ) from error
        if shielded is None:
            return RenderedPrompt(text)
        return self._unshield(text)

    def encode(self, rendered: str) -> list[int]:
        """Ids of rendered template text: special tokens come from the template itself, none are added."""
        return list(self.tokenizer.encode(rendered, add_special_tokens=False))

    def encode_text(self, text: str) -> list[int]:
        """Ids of client text (a reply kept in a session): special tokens' text stays plain text."""
        return list(self._text_tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_rendered(self, prompt: RenderedPrompt, *, start: int = 0) -> list[int]:
        """The ids of `prompt.text[start:]`, with only the template's markers as special ids.

        Encoding between the markers gives the ids a whole-text encoding would: a tokenizer splits its text
        at special tokens before anything else.
        """
        if prompt.markers is None:
            return self.encode(prompt.text[start:])
        pieces: list[str] = []
        marker_ids: list[int] = []
        position = start
        for begin, end, token_id in prompt.markers:
            if end <= start:
                continue
            if begin < start:
                raise ValueError("start falls inside a special token")
            pieces.append(prompt.text[position:begin])
            marker_ids.append(token_id)
            position = end
        pieces.append(prompt.text[position:])
        encoded = self._text_tokenizer.encode_batch(pieces, add_special_tokens=False)
        token_ids: list[int] = []
        for index, encoding in enumerate(encoded):
            token_ids.extend(encoding.ids)
            if index < len(marker_ids):
                token_ids.append(marker_ids[index])
        return token_ids

    def continue_from(
        self, stored_text: str, stored_ids: list[int], prompt: RenderedPrompt
    ) -> list[int] | None:
        """The prompt's ids as the stored ids plus the ids of the new suffix, when the rendering begins with
        the stored text (the engine's KV cache then hits exactly); None when the template broke the prefix."""
        if not stored_text or not prompt.text.startswith(stored_text):
            return None
        try:
            return stored_ids + self.encode_rendered(prompt, start=len(stored_text))
        except ValueError:
            return None  # the stored text ends inside one of the template's markers

    def check_fits(self, num_chars: int, max_model_len: int, *, param: str = "messages") -> None:
        """Refuses (400) text that cannot fit the context window however it is tokenized, before any of it
        is tokenized (`max_chars_per_token`)."""
        bound = self.max_chars_per_token
        if bound is not None and num_chars > max_model_len * bound:
            raise ContextLengthExceeded(
                f"the {param} have {num_chars} characters; this model's context window of "
                f"{max_model_len} tokens holds at most {max_model_len * bound} (one token is at most "
                f"{bound} characters)",
                param=param,
            )

    def _shield(self, value: Any) -> Any:
        """`value` with special tokens' text in every string replaced by placeholders; None when no string
        holds any (the usual case, which costs one scan per string)."""
        if not self._special_ids:
            return None
        found = False

        def shield(node: Any) -> Any:
            nonlocal found
            if isinstance(node, str):
                if self._specials.search(node) is None:
                    return node
                found = True
                return self._specials.sub(self._placeholder_of, node)
            if isinstance(node, dict):
                return {key: shield(item) for key, item in node.items()}
            if isinstance(node, list | tuple):
                return [shield(item) for item in node]
            return node

        shielded = shield(value)
        return shielded if found else None

    def _placeholder_of(self, match: re.Match[str]) -> str:
        return f"SHEPHERD{self._nonce}S{self._index_of[match.group()]}E"

    def _unshield(self, text: str) -> RenderedPrompt:
        """Restores the placeholders of a shielded rendering and records where the template's markers are."""
        out: list[str] = []
        markers: list[tuple[int, int, int]] = []
        position = 0
        last = 0
        for match in self._specials.finditer(text):
            piece = self._restore(text[last : match.start()])
            out.append(piece)
            position += len(piece)
            marker = match.group()
            markers.append((position, position + len(marker), self._special_ids[marker]))
            out.append(marker)
            position += len(marker)
            last = match.end()
        out.append(self._restore(text[last:]))
        return RenderedPrompt("".join(out), tuple(markers))

    def _restore(self, piece: str) -> str:
        restored = self._placeholder.sub(lambda match: self._names[int(match.group(1))], piece)
        if self._nonce in restored:
            # The template changed a placeholder (an upper-casing filter, say): its text cannot be restored
            # safely, so refuse rather than let a special token through.
            raise RequestError(
                "the chat template transforms message text that contains special-token text; remove it",
                param="messages",
            )
        return restored

    def system_ids(self, system_prompt: str, tools: Sequence[dict[str, Any]] | None) -> list[int]:
        """The ids of a system prompt (and tools) rendered alone: a session's retained KV prefix."""
        return list(
            self._system_ids(system_prompt, json.dumps(tools, sort_keys=True) if tools else None)
        )

    @functools.lru_cache(maxsize=256)  # noqa: B019  # one template per Router replica, for its lifetime
    def _system_ids(self, system_prompt: str, tools_json: str | None) -> tuple[int, ...]:
        tools = json.loads(tools_json) if tools_json else None
        messages = [{"role": "system", "content": system_prompt}]
        return tuple(self.render(messages, tools=tools, add_generation_prompt=False))

    # ---- plain prompts ---------------------------------------------------------------------------------
    def encode_prompt(
        self, prompt: str | list[int], *, add_special_tokens: bool = True
    ) -> list[int]:
        """A completion prompt: text to ids, or ids checked against the vocabulary."""
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        bad = next((token_id for token_id in prompt if not 0 <= token_id < self.vocab_size), None)
        if bad is not None:
            raise RequestError(
                f"prompt: token id {bad} is outside the vocabulary [0, {self.vocab_size})",
                param="prompt",
            )
        return list(prompt)

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens))
