"""What both example agents share: local tools, running a reply's tool calls, and the agent loop itself.

The model only asks for a tool call. The client runs it and sends the result back as a `role: tool`
message on the next turn of the same server-side session. The loop is the same whether turns travel over
HTTP (`agent_http.py`) or through a Ray Serve handle (`agent_handle.py`): only `send` differs.
"""

from __future__ import annotations

import ast
import json
import operator
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Message = dict[str, Any]

SYSTEM_PROMPT = (
    "You are a careful assistant with tools. Read files with read_file and compute with calculate "
    "instead of guessing. Answer briefly once you know the answer."
)

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a UTF-8 text file from the workspace.",
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "A path relative to the workspace."}
                },
                "required": ["path"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "calculate",
            "description": "Evaluate an arithmetic expression: numbers, + - * / // % **, parentheses.",
            "parameters": {
                "type": "object",
                "properties": {
                    "expression": {"type": "string", "description": "e.g. (17 + 4) * 3"}
                },
                "required": ["expression"],
            },
        },
    },
]

MAX_FILE_CHARS = 20_000
MAX_EXPONENT = 1_000
_OPERATORS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def calculate(expression: str) -> int | float:
    """Arithmetic only: the expression is parsed, never `eval`ed."""

    def value(node: ast.AST) -> int | float:
        # `type(...) in`, not isinstance: True and False are no numbers here.
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            number: int | float = node.value  # type: ignore[assignment]
            return number
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))  # type: ignore[no-any-return]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise ValueError(f"exponent {right} is too large")
            return _OPERATORS[type(node.op)](left, right)  # type: ignore[no-any-return]
        raise ValueError(f"not arithmetic: {ast.unparse(node)!r}")

    return value(ast.parse(expression, mode="eval").body)


class Toolbox:
    """The tools the model may call, bound to one workspace directory (nothing outside it is readable)."""

    def __init__(self, workspace: str | Path) -> None:
        self.workspace = Path(workspace).resolve()
        self._tools: dict[str, Callable[..., str]] = {
            "read_file": self.read_file,
            "calculate": lambda expression: repr(calculate(expression)),
        }

    def read_file(self, path: str) -> str:
        target = (self.workspace / path).resolve()
        if not target.is_relative_to(self.workspace):
            raise ValueError(f"{path!r} is outside the workspace")
        text = target.read_text(encoding="utf-8")
        return text if len(text) <= MAX_FILE_CHARS else text[:MAX_FILE_CHARS] + "\n[truncated]"

    def run(self, call: Message) -> Message:
        """One tool call, as OpenAI sends it, to its `role: tool` result message.

        A failure (unknown tool, bad arguments, a missing file) becomes the result's text rather than an
        exception, so the model can read it and try again.
        """
        function = call["function"]
        try:
            tool = self._tools[function["name"]]
            arguments = json.loads(function.get("arguments") or "{}")
            content = tool(**arguments)
        except Exception as error:  # the model sees what went wrong
            content = f"error: {type(error).__name__}: {error}"
        print(
            f"[tool] {function['name']}({function.get('arguments')}) -> {content[:80]!r}",
            file=sys.stderr,
        )
        return {"role": "tool", "tool_call_id": call["id"], "content": content}


def next_messages(reply: Message, toolbox: Toolbox, *, is_recorded: bool = True) -> list[Message]:
    """The next turn's messages after an assistant `reply` that asked for tools: one result per call.

    A session stores every reply the server generated, tool calls included, so for such a reply
    (`is_recorded=True`) only the results are sent. A call the server never produced (for example a
    scripted one) must be sent along with its results: `is_recorded=False`.
    """
    results = [toolbox.run(call) for call in reply.get("tool_calls") or []]
    return results if is_recorded else [reply, *results]


def run_agent(
    send: Callable[[list[Message]], Message], task: str, toolbox: Toolbox, *, max_steps: int = 8
) -> str:
    """Runs `task` to an answer: send a turn, run the tools the model asks for, send their results, repeat.

    Args:
        send: sends one turn's new messages on the session and returns the assistant message (a dict).
        max_steps: turns before giving up; each turn is one model reply.
    Returns:
        The text of the first reply that asks for no tool.
    """
    messages: list[Message] = [{"role": "user", "content": task}]
    for _ in range(max_steps):
        reply = send(messages)
        if not reply.get("tool_calls"):
            return str(reply.get("content") or "")
        messages = next_messages(reply, toolbox)
    raise RuntimeError(f"no answer after {max_steps} model replies")
