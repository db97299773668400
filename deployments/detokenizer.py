"""Incremental, UTF-8-safe detokenization with stop strings that never leak to the client."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers.decoders import DecodeStream

# Prompt tokens fed to the stream first, so tokenizers that decode a token differently at the start of a
# text (SentencePiece's leading space) render the first generated token as it appears mid-text.
_NUM_PREFILL_TOKENS = 4


class IncrementalDetokenizer:
    """Turns token-id deltas into text deltas.

    Text is held back while it (a) ends inside a multi-byte character (DecodeStream emits nothing yet) or
    (b) could be the start of a stop string: the last `max(len(stop)) - 1` characters stay pending until
    more text proves they are not a stop string. Once a stop string appears, everything from it on is dropped.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        stop: Sequence[str] = (),
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._backend = tokenizer._tokenizer if hasattr(tokenizer, "_tokenizer") else tokenizer
        prefill = list(prompt_token_ids[-_NUM_PREFILL_TOKENS:])
        self._stream = DecodeStream(ids=prefill or None, skip_special_tokens=skip_special_tokens)
        self._stops = [s for s in stop if s]
        self._num_held_chars = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""
        self.is_stopped = False
        self.stop_reason: str | None = None

    def feed(self, token_ids: Sequence[int]) -> str:
        """Returns the text that is now safe to emit (possibly empty)."""
        if self.is_stopped:
            return ""
        for token_id in token_ids:
            chunk = self._stream.step(self._backend, token_id)
            if chunk:
                self._pending += chunk
        if not self._pending:
            return ""
        if self._stops:
            cut = self._find_stop()
            if cut is not None:
                text, self._pending = self._pending[:cut], ""
                self.is_stopped = True
                return text
            if self._num_held_chars:
                text = self._pending[: -self._num_held_chars]
                self._pending = self._pending[len(text) :]
                return text
        text, self._pending = self._pending, ""
        return text

    def flush(self) -> str:
        """At the end of generation: release held-back text (it did not turn into a stop string)."""
        if self.is_stopped:
            return ""
        text, self._pending = self._pending, ""
        return text

    def _find_stop(self) -> int | None:
        best: int | None = None
        for stop in self._stops:
            index = self._pending.find(stop)
            if index != -1 and (best is None or index < best):
                best, self.stop_reason = index, stop
        return best
