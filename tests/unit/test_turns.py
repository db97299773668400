from __future__ import annotations

from typing import Any

from deployments.sessions.turns import completed_turns, plan_eviction, tool_pairs


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def answer(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def call(name: str) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": name, "arguments": "{}"}}],
    }


def result(text: str) -> dict[str, Any]:
    return {"role": "tool", "content": text, "tool_call_id": "c"}


CONVERSATION = [
    user("u1"),
    call("a"),
    result("r1"),
    answer("a1"),  # turn 1, with a tool round
    user("u2"),
    answer("a2"),  # turn 2
    user("u3"),
    call("b"),
    result("r3"),
    call("c"),
    result("r4"),  # current turn, two tool rounds
]


def budget(max_messages: int) -> Any:
    return lambda kept: len(kept) <= max_messages


def contents(messages: list[dict[str, Any]]) -> list[str]:
    return [m["content"] or m["tool_calls"][0]["function"]["name"] for m in messages]


def test_nothing_is_evicted_when_it_fits() -> None:
    plan = plan_eviction(CONVERSATION, budget(100))
    assert plan.fits and plan.evicted == [] and plan.kept == CONVERSATION


def test_oldest_whole_turn_goes_first_with_its_tool_calls() -> None:
    plan = plan_eviction(CONVERSATION, budget(7))
    assert contents(plan.evicted) == ["u1", "a", "r1", "a1"]
    assert contents(plan.kept)[:2] == ["u2", "a2"]


def test_then_tool_pairs_inside_the_current_turn_but_never_the_user_message() -> None:
    plan = plan_eviction(CONVERSATION, budget(3))
    assert plan.fits
    assert contents(plan.kept) == ["u3", "c", "r4"]
    plan = plan_eviction(CONVERSATION, budget(0))
    assert not plan.fits
    assert contents(plan.kept) == ["u3"]


def test_pending_tool_call_without_results_is_not_a_candidate() -> None:
    messages = [user("u1"), answer("a1"), user("u2"), call("x")]
    assert tool_pairs(messages, 3) == []
    plan = plan_eviction(messages, budget(2))
    assert contents(plan.kept) == ["u2", "x"]


def test_incomplete_turn_before_current_is_not_evicted_as_whole() -> None:
    messages = [user("u1"), call("a"), user("u2")]
    assert completed_turns(messages, 2) == []
