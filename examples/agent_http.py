"""A tool-using agent over HTTP with the `openai` client, on a server-side session.

    python -m examples.agent_http --base-url http://127.0.0.1:8000 --workspace . \
        "Read README.md and tell me in one sentence what this project is."

It needs a model whose chat template has a tool-call format (docs/model-preparation.md); the embedded
default model never calls tools, so with it the loop ends after one meaningless reply.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any, cast

from openai import OpenAI

from examples.agent import SYSTEM_PROMPT, TOOLS, Message, Toolbox, run_agent


# The sessions routes are not part of OpenAI's API; the client's generic `post`/`get`/`delete` reach them
# with the same base URL and key (cast_to=object returns the JSON as it came).
def create_session(client: OpenAI) -> dict[str, Any]:
    """A session holding the system prompt and the tools; its `model` field names the served model."""
    body = {"system_prompt": SYSTEM_PROMPT, "tools": TOOLS}
    return cast(dict[str, Any], client.post("/sessions", body=body, cast_to=object))


def get_session(client: OpenAI, session_id: str) -> dict[str, Any]:
    return cast(dict[str, Any], client.get(f"/sessions/{session_id}", cast_to=object))


def delete_session(client: OpenAI, session_id: str) -> None:
    client.delete(f"/sessions/{session_id}", cast_to=object)


def turn_sender(
    client: OpenAI, session: dict[str, Any], **options: Any
) -> Callable[[list[Message]], Message]:
    """`send(messages) -> assistant message`: one turn on the session (`options`: max_tokens, ...)."""
    options = {name: value for name, value in options.items() if value is not None}

    def send(messages: list[Message]) -> Message:
        reply = client.chat.completions.create(
            model=session["model"],
            messages=messages,  # type: ignore[arg-type]
            extra_body={"session_id": session["id"]},
            **options,
        )
        message: Message = reply.choices[0].message.model_dump(exclude_none=True)
        return message

    return send


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("task", help="what to ask the agent")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=os.environ.get("SHEPHERD_API_KEY", "unused"))
    parser.add_argument("--workspace", default=".", help="the directory read_file may read")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument(
        "--keep-session", action="store_true", help="do not delete the session at the end"
    )
    args = parser.parse_args(argv)

    client = OpenAI(base_url=f"{args.base_url.rstrip('/')}/v1", api_key=args.api_key)
    session = create_session(client)
    try:
        send = turn_sender(
            client, session, max_tokens=args.max_tokens, temperature=args.temperature
        )
        print(run_agent(send, args.task, Toolbox(args.workspace), max_steps=args.max_steps))
    finally:
        if args.keep_session:
            print(f"session: {session['id']}")
        else:
            delete_session(client, session["id"])


if __name__ == "__main__":
    main()
