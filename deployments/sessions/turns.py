"""Which messages leave a conversation when it outgrows the context window (pure; Shepherd's policy).

Pass 1 evicts whole completed turns (user -> assistant tool calls/results -> final answer), oldest first,
strictly before the current turn. Pass 2 evicts tool-call/result pairs inside the current turn, oldest first.
The system prompt and tools live outside `messages` and are never candidates; nor is the current user message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Message = dict[str, Any]


@dataclass(frozen=True, slots=True)
class EvictionPlan:
    kept: list[Message]
    evicted: list[Message]
    fits: bool


def _current_turn_start(messages: Sequence[Message]) -> int:
    for index in range(len(messages) - 1, -1, -1):
        if messages[index]["role"] == "user":
            return index
    return 0


def completed_turns(messages: Sequence[Message], end: int) -> list[range]:
    """Index ranges of completed turns in messages[:end]: a user message through a final assistant answer."""
    turns: list[range] = []
    start: int | None = None
    for index in range(end):
        message = messages[index]
        if message["role"] == "user":
            start = index
        elif message["role"] == "assistant" and not message.get("tool_calls") and start is not None:
            turns.append(range(start, index + 1))
            start = None
    return turns


def tool_pairs(messages: Sequence[Message], start: int) -> list[range]:
    """Ranges of an assistant tool-call message plus the tool results that answer it, from `start` on."""
    pairs: list[range] = []
    index = start
    while index < len(messages):
        if messages[index]["role"] == "assistant" and messages[index].get("tool_calls"):
            end = index + 1
            while end < len(messages) and messages[end]["role"] == "tool":
                end += 1
            # A call whose results are not in yet is what the model is working on: keep it.
            if end > index + 1:
                pairs.append(range(index, end))
            index = end
        else:
            index += 1
    return pairs


def unevictable(messages: Sequence[Message]) -> list[Message]:
    """The messages no eviction removes: the current user message and what follows it outside tool-call
    pairs. Without a user message, none (the turn may continue one that an eviction can drop)."""
    if not any(message["role"] == "user" for message in messages):
        return []
    current = _current_turn_start(messages)
    paired = {index for span in tool_pairs(messages, current + 1) for index in span}
    return [m for index, m in enumerate(messages) if index >= current and index not in paired]


def plan_eviction(
    messages: Sequence[Message], fits: Callable[[list[Message]], bool]
) -> EvictionPlan:
    """Evict the fewest candidates (in policy order) for `fits(kept)` to hold."""
    kept = list(messages)
    if fits(kept):
        return EvictionPlan(kept=kept, evicted=[], fits=True)
    current = _current_turn_start(messages)
    candidates = completed_turns(messages, current) + tool_pairs(messages, current + 1)
    removed: set[int] = set()
    for span in candidates:
        removed.update(span)
        kept = [m for i, m in enumerate(messages) if i not in removed]
        if fits(kept):
            return EvictionPlan(
                kept=kept, evicted=[m for i, m in enumerate(messages) if i in removed], fits=True
            )
    return EvictionPlan(
        kept=kept, evicted=[m for i, m in enumerate(messages) if i in removed], fits=False
    )
