"""The same agent from another Ray job: turns go to the Router through a Ray Serve handle, not HTTP.

    python -m examples.agent_handle --address auto --workspace . \
        "Read README.md and tell me in one sentence what this project is."

The driver joins the cluster that runs the app (`--address`: "auto" on one of its nodes, or the GCS
address) and needs this repository on its path, so that it can receive the Router's errors as
`deployments.errors` classes. Request bodies and replies are the HTTP API's, as dicts.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from typing import Any

from examples.agent import SYSTEM_PROMPT, TOOLS, Message, Toolbox, run_agent


def create_session(router: Any, api_key: str | None) -> dict[str, Any]:
    """A session holding the system prompt and the tools; its `model` field names the served model."""
    body = {"system_prompt": SYSTEM_PROMPT, "tools": TOOLS}
    session: dict[str, Any] = router.create_session.remote(body, api_key=api_key).result()
    return session


def get_session(router: Any, session_id: str, api_key: str | None) -> dict[str, Any]:
    session: dict[str, Any] = router.get_session.remote(session_id, api_key=api_key).result()
    return session


def delete_session(router: Any, session_id: str, api_key: str | None) -> None:
    router.delete_session.remote(session_id, api_key=api_key).result()


def turn_sender(
    router: Any, session: dict[str, Any], api_key: str | None, **options: Any
) -> Callable[[list[Message]], Message]:
    """`send(messages) -> assistant message`: one turn on the session (`options`: max_tokens, ...)."""
    options = {name: value for name, value in options.items() if value is not None}

    def send(messages: list[Message]) -> Message:
        body = {
            "model": session["model"],
            "session_id": session["id"],
            "messages": messages,
            **options,
        }
        reply = router.chat.remote(body, api_key=api_key).result()
        message: Message = reply["choices"][0]["message"]
        return message

    return send


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("task", help="what to ask the agent")
    parser.add_argument("--address", default="auto", help="the Ray cluster to join")
    parser.add_argument(
        "--app", default="shepherd", help="the application name in the serve config"
    )
    parser.add_argument("--api-key", default=os.environ.get("SHEPHERD_API_KEY"))
    parser.add_argument("--workspace", default=".", help="the directory read_file may read")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument(
        "--keep-session", action="store_true", help="do not delete the session at the end"
    )
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    ray.init(address=args.address, logging_level=logging.ERROR, log_to_driver=False)
    router = serve.get_app_handle(args.app)
    session = create_session(router, args.api_key)
    try:
        send = turn_sender(
            router, session, args.api_key, max_tokens=args.max_tokens, temperature=args.temperature
        )
        print(run_agent(send, args.task, Toolbox(args.workspace), max_steps=args.max_steps))
    finally:
        if args.keep_session:
            print(f"session: {session['id']}")
        else:
            delete_session(router, session["id"], args.api_key)


if __name__ == "__main__":
    main()
