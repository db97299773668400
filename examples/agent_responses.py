"""The same agent on the OpenAI Responses API, run by the `openai-agents` SDK: no Shepherd extension at all.

    python -m examples.agent_responses --base-url http://127.0.0.1:8000 --workspace . \
        "Read README.md and tell me in one sentence what this project is."

The SDK's `Runner` drives the loop (model turn, local tool calls, next turn). With `auto_previous_response_id`
each turn sends only its new items and names the previous response; the server continues from the exact token
ids the engine saw (`input_tokens_details.cached_tokens` in each response's usage says how many). It needs a
model that calls tools (docs/model-preparation.md); the embedded default model never does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from examples.agent import SYSTEM_PROMPT, Toolbox, calculate


def build_agent(base_url: str, api_key: str, model: str, toolbox: Toolbox) -> Any:
    """An `agents.Agent` whose model is this server's Responses API, with the example's two tools."""
    from agents import Agent, OpenAIResponsesModel, function_tool
    from openai import AsyncOpenAI

    @function_tool
    def read_file(path: str) -> str:
        """Read a UTF-8 text file from the workspace (a path relative to it)."""
        return toolbox.read_file(path)

    @function_tool(name_override="calculate")
    def calculate_tool(expression: str) -> str:
        """Evaluate an arithmetic expression: numbers, + - * / // % **, parentheses."""
        return repr(calculate(expression))

    client = AsyncOpenAI(base_url=f"{base_url.rstrip('/')}/v1", api_key=api_key)
    return Agent(
        name="shepherd",
        instructions=SYSTEM_PROMPT,
        tools=[read_file, calculate_tool],
        model=OpenAIResponsesModel(model=model, openai_client=client),
    )


async def run(agent: Any, task: str, max_turns: int) -> Any:
    """One task to its final answer; each model turn continues the previous response on the server."""
    from agents import Runner

    return await Runner.run(agent, task, max_turns=max_turns, auto_previous_response_id=True)


def main(argv: list[str] | None = None) -> None:
    from agents import set_tracing_disabled

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("task", help="what to ask the agent")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=os.environ.get("SHEPHERD_API_KEY", "none"))
    parser.add_argument("--model", default="shepherd-tiny", help="the served model name")
    parser.add_argument("--workspace", default=".", help="the directory read_file may read")
    parser.add_argument("--max-turns", type=int, default=8)
    args = parser.parse_args(argv)
    set_tracing_disabled(True)  # the SDK would otherwise send traces to OpenAI's servers
    agent = build_agent(args.base_url, args.api_key, args.model, Toolbox(args.workspace))
    result = asyncio.run(run(agent, args.task, args.max_turns))
    print(result.final_output)


if __name__ == "__main__":
    main()
