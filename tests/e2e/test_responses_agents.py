"""Function calls over the Responses API, and an `openai-agents` agent loop, against a second app on the suite's
Ray Serve whose engine answers from a script (`engine.kind: scripted`): the embedded model is random and never
calls a tool. Everything above the engine is the real stack: routing, templating, the tool-call parser, the
session store and HTTP with the official clients."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import API_KEY, MODEL, REPO, TINY_CONFIG

pytestmark = pytest.mark.e2e
APP_NAME, ROUTE = "scripted", "/scripted"
ANSWER = "It is sunny in Paris."
TURN_END = r"<\|im_end\|>\n<\|im_start\|>assistant\n$"  # the prompt ends where the reply begins
REPLIES = [
    # A tool's result gets an answer; a question about the weather or a sum, a call; anything else, "Hello.".
    {"when": r"<tool_response>\nsunny\n</tool_response>" + TURN_END, "text": ANSWER},
    {"when": r"<tool_response>\n63\n</tool_response>" + TURN_END, "text": "It is 63."},
    {
        "when": r"weather[^<]*" + TURN_END,
        "text": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    },
    {
        "when": r"\(17 \+ 4\) \* 3\?" + TURN_END,
        "text": '<tool_call>\n{"name": "calculate", "arguments": {"expression": "(17 + 4) * 3"}}\n'
        "</tool_call>",
    },
    {"when": "", "text": "Hello."},
]
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


@pytest.fixture(scope="module")
def scripted_url(
    ray_driver: None, base_url: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The shepherd app again, with the scripted engine, next to the suite's app (its own route and store)."""
    from ray import serve

    from cluster.local import merge
    from deployments import build_app

    args = yaml.safe_load((REPO / TINY_CONFIG).read_text())["applications"][0]["args"]
    args = merge(
        args,
        {
            "model": {"cache_dir": str(model_dir.parent)},
            "engine": {
                "kind": "scripted",
                "num_cpus_per_replica": 0.1,  # it computes nothing; the suite's app holds the rest
                "scripted": {"replies": REPLIES},
            },
            "router": {"num_cpus_per_replica": 0},
            "sessions": {
                "store": {"sqlite_path": str(tmp_path_factory.mktemp("scripted") / "s.sqlite3")}
            },
        },
    )
    serve.run(build_app(args), name=APP_NAME, route_prefix=ROUTE)
    try:
        yield f"{base_url}{ROUTE}"
    finally:
        serve.delete(APP_NAME)


@pytest.fixture(scope="module")
def scripted(scripted_url: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{scripted_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_a_function_call_round_trip_continues_the_exact_ids(scripted: Any) -> None:
    asked = scripted.responses.create(
        model=MODEL, input="What is the weather in Paris?", tools=[TOOL]
    )
    [call] = asked.output
    assert (call.type, call.name, call.status) == ("function_call", "get_weather", "completed")
    assert json.loads(call.arguments) == {"city": "Paris"} and call.call_id.startswith("call_")
    assert asked.output_text == ""

    answered = scripted.responses.create(
        model=MODEL,
        previous_response_id=asked.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=[TOOL],
    )
    assert answered.output_text == ANSWER
    # The template renders the stored call exactly as the model wrote it: the whole first turn is reused.
    assert answered.usage.input_tokens_details.cached_tokens >= asked.usage.input_tokens
    with pytest.raises(Exception) as again:  # that call has its output now
        scripted.responses.create(
            model=MODEL,
            previous_response_id=answered.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "x"}],
            tools=[TOOL],
        )
    assert again.value.body["param"] == "input.0.call_id"


def test_a_streamed_function_call_has_its_argument_events(scripted: Any) -> None:
    with scripted.responses.stream(
        model=MODEL, input="weather in Paris, please", tools=[TOOL]
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[2] == "response.output_item.added" and events[2].item.type == "function_call"
    arguments = "".join(
        e.delta for e in events if e.type == "response.function_call_arguments.delta"
    )
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert json.loads(arguments) == json.loads(done.arguments) == {"city": "Paris"}
    assert kinds[-1] == "response.completed" and final.output[0].call_id == events[2].item.call_id


def test_a_conversation_keeps_the_call_and_its_output_as_items(scripted: Any) -> None:
    conversation = scripted.conversations.create()
    asked = scripted.responses.create(
        model=MODEL, input="the weather?", tools=[TOOL], conversation=conversation.id
    )
    output = {"type": "function_call_output", "call_id": asked.output[0].call_id, "output": "sunny"}
    answered = scripted.responses.create(
        model=MODEL, input=[output], tools=[TOOL], conversation=conversation.id
    )
    assert answered.output_text == ANSWER
    items = scripted.conversations.items.list(conversation.id, order="asc").data
    assert [i.type for i in items] == [
        "message",
        "function_call",
        "function_call_output",
        "message",
    ]
    assert items[1].id == asked.output[0].id and items[3].id == answered.output[0].id


def test_an_openai_agents_agent_completes_a_tool_call_and_a_final_answer(scripted_url: str) -> None:
    from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # the SDK would export traces to OpenAI's servers
    cities: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        cities.append(city)
        return "sunny"

    async def main() -> Any:
        client = AsyncOpenAI(base_url=f"{scripted_url}/v1", api_key=API_KEY, max_retries=0)
        agent = Agent(
            name="weather",
            instructions="Answer questions about the weather.",
            tools=[get_weather],
            model=OpenAIResponsesModel(model=MODEL, openai_client=client),
        )
        return await Runner.run(agent, "What is the weather in Paris?")

    result = asyncio.run(main())
    assert cities == ["Paris"] and result.final_output == ANSWER
    kinds = [item.type for item in result.new_items]
    assert kinds == ["tool_call_item", "tool_call_output_item", "message_output_item"]


def test_the_example_agent_chains_its_turns_with_previous_response_id(
    scripted_url: str, scripted: Any, tmp_path: Path
) -> None:
    """`examples/agent_responses.py`: the SDK sends only new items and names the previous response."""
    from agents import set_tracing_disabled

    from examples.agent import Toolbox
    from examples.agent_responses import build_agent, run

    set_tracing_disabled(True)
    agent = build_agent(scripted_url, API_KEY, MODEL, Toolbox(tmp_path))
    result = asyncio.run(run(agent, "What is (17 + 4) * 3?", max_turns=4))
    assert result.final_output == "It is 63."
    asked_id, answered_id = (response.response_id for response in result.raw_responses)
    answered = scripted.responses.retrieve(answered_id)
    asked = scripted.responses.retrieve(asked_id)
    assert answered.previous_response_id == asked_id
    assert answered.usage.input_tokens_details.cached_tokens >= asked.usage.input_tokens
    [output] = scripted.responses.input_items.list(answered_id).data
    assert (output.type, output.output) == ("function_call_output", "63")


def test_responses_through_a_python_handle(scripted_url: str) -> None:
    from ray import serve

    handle = serve.get_app_handle(APP_NAME)
    body = {"model": MODEL, "input": "hi"}
    whole = handle.responses.remote(body, api_key=API_KEY).result()
    assert whole["output"][0]["content"][0]["text"] == "Hello."
    events = list(handle.options(stream=True).responses_stream.remote(body, api_key=API_KEY))
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "Hello."
