"""Responses API turns on stored state (`sessions/chains.py`, `sessions/conversations.py`) with the real chat
template and a real SQLite store; the engine's part is a completion given as ids."""

from __future__ import annotations

from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from deployments.errors import ConflictError, NotFoundError, RequestError
from deployments.protocol_responses import (
    parse_items,
    reply_message,
    to_messages,
    without_item,
)
from deployments.sessions.chains import ChainPlan, ResponseChains, ResponseInput
from deployments.sessions.conversations import Conversations
from deployments.sessions.manager import SessionManager
from deployments.sessions.nodes import new_response_id
from deployments.sessions.sqlite import SQLiteSessionStore
from deployments.templating import ChatTemplate
from tests.unit.test_session_store import run

T = TypeVar("T")
OWNER = "alice"


class Harness:
    def __init__(self, tokenizer: Any, path: Path, max_model_len: int = 2048) -> None:
        self.template = ChatTemplate(tokenizer)
        self.store = SQLiteSessionStore(str(path), idle_ttl_s=None)
        self.sessions = SessionManager(
            self.store,
            self.template,
            max_model_len=max_model_len,
            max_sessions_per_owner=None,
            turn_timeout_s=30,
        )
        self.chains = ResponseChains(self.store, self.sessions, "m")
        self.conversations = Conversations(self.store, self.sessions, "m", turn_timeout_s=30)

    def request(self, text_or_items: Any, **fields: Any) -> ResponseInput:
        raw = (
            [{"role": "user", "content": text_or_items}]
            if isinstance(text_or_items, str)
            else text_or_items
        )
        messages, items = to_messages(parse_items(raw, "input"))
        return ResponseInput(new_messages=messages, input_items=items, **fields)

    async def begin(self, request: ResponseInput, owner: str = OWNER, **budget: Any) -> ChainPlan:
        return await self.chains.begin(
            owner,
            new_response_id(),
            request,
            requested_max_tokens=budget.get("requested_max_tokens"),
            default_max_tokens=budget.get("default_max_tokens", 16),
        )

    async def finish(
        self, plan: ChainPlan, reply: str, calls: list[tuple[str, str, str]] | None = None
    ) -> list[int]:
        """Commits `reply` as if the engine had generated its ids; returns them."""
        completion_ids = self.template.encode(reply)
        await self.chains.commit(
            plan,
            completion_ids,
            reply,
            is_exact=not calls,
            reply_message=reply_message(plan.response_id, reply, calls or []),
            response={"id": plan.response_id, "text": reply},
        )
        return completion_ids

    def go(self, coro: Coroutine[Any, Any, T]) -> T:
        return run(coro)


@pytest.fixture
def harness(tokenizer: Any, tmp_path: Path) -> Harness:
    return Harness(tokenizer, tmp_path / "s.sqlite3")


def test_each_turn_continues_the_exact_ids_of_the_last_and_stores_only_its_span(
    harness: Harness,
) -> None:
    async def main() -> None:
        first = await harness.begin(harness.request("hello", system_prompt="Be brief."))
        expected = harness.template.render(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
        )
        assert first.turn.prompt_token_ids == expected and first.routing_id == first.response_id
        first_ids = first.turn.prompt_token_ids + await harness.finish(first, "hi there")

        second = await harness.begin(
            harness.request(
                "again", system_prompt="Be brief.", previous_response_id=first.response_id
            )
        )
        prompt = second.turn.prompt_token_ids
        assert prompt[: len(first_ids)] == first_ids and second.turn.is_prefix_continued
        assert second.turn.num_reused_tokens == len(first_ids)
        assert second.routing_id == first.response_id  # the chain stays on one replica
        await harness.finish(second, "sure")

        [node, root] = await harness.store.load_chain(second.response_id)
        assert node.parent_id == first.response_id and root.parent_id is None
        assert node.span_token_ids[: len(prompt) - len(first_ids)] == prompt[len(first_ids) :]
        assert [m["content"] for m in node.span_messages] == ["again", "sure"]

    harness.go(main())


def test_two_continuations_of_one_response_fork_without_copying(harness: Harness) -> None:
    async def main() -> None:
        root = await harness.begin(harness.request("start"))
        root_ids = root.turn.prompt_token_ids + await harness.finish(root, "ok")
        branches = []
        for text in ("left", "right"):
            plan = await harness.begin(harness.request(text, previous_response_id=root.response_id))
            assert plan.turn.prompt_token_ids[: len(root_ids)] == root_ids
            assert plan.routing_id == root.response_id  # routed where the shared prefix is
            await harness.finish(plan, f"{text} reply")
            branches.append(plan.response_id)
        for branch, text in zip(branches, ("left", "right"), strict=True):
            [head, base] = await harness.store.load_chain(branch)
            assert base.response_id == root.response_id and head.span_messages[0]["content"] == text
        # Deleting the fork point hides it but keeps what the branches continue from.
        await harness.chains.delete(OWNER, root.response_id)
        with pytest.raises(NotFoundError):
            await harness.chains.get(OWNER, root.response_id)
        again = await harness.begin(harness.request("more", previous_response_id=branches[0]))
        assert again.turn.prompt_token_ids[: len(root_ids)] == root_ids

    harness.go(main())


def test_stored_responses_belong_to_their_owner_and_unstored_ones_cannot_be_continued(
    harness: Harness,
) -> None:
    async def main() -> None:
        plan = await harness.begin(harness.request("secret"))
        await harness.finish(plan, "ok")
        with pytest.raises(NotFoundError) as raised:
            await harness.begin(
                harness.request("x", previous_response_id=plan.response_id), owner="mallory"
            )
        assert raised.value.param == "previous_response_id"

        unstored = await harness.begin(harness.request("forget me", is_stored=False))
        await harness.finish(unstored, "ok")
        with pytest.raises(RequestError) as refused:
            await harness.begin(harness.request("x", previous_response_id=unstored.response_id))
        assert (
            refused.value.param == "previous_response_id"
            and "store: false" in refused.value.message
        )
        with pytest.raises(NotFoundError):
            await harness.chains.get(OWNER, unstored.response_id)

    harness.go(main())


def test_a_function_call_output_must_answer_a_pending_call(harness: Harness) -> None:
    async def main() -> None:
        stray = [{"type": "function_call_output", "call_id": "call_nope", "output": "42"}]
        with pytest.raises(RequestError) as raised:
            await harness.begin(harness.request(stray))
        assert raised.value.param == "input.0.call_id"

        plan = await harness.begin(harness.request("weather?", tools=[_TOOL]))
        await harness.finish(plan, "", calls=[("call_1", "get_weather", '{"city": "Paris"}')])
        answer = [{"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]
        follow = await harness.begin(
            harness.request(answer, tools=[_TOOL], previous_response_id=plan.response_id)
        )
        assert "<tool_response>\nsunny\n</tool_response>" in harness.template.decode(
            follow.turn.prompt_token_ids, skip_special_tokens=False
        )
        await harness.finish(follow, "It is sunny.")
        with pytest.raises(RequestError):  # answered already
            await harness.begin(
                harness.request(answer, tools=[_TOOL], previous_response_id=follow.response_id)
            )

    harness.go(main())


def test_truncation_disabled_refuses_what_auto_fits_by_dropping_old_turns(
    tokenizer: Any, tmp_path: Path
) -> None:
    harness = Harness(tokenizer, tmp_path / "s.sqlite3", max_model_len=256)
    filler = "token cache engine replica " * 20

    async def main() -> None:
        previous = None
        for _ in range(3):
            plan = await harness.begin(
                harness.request(filler, previous_response_id=previous, may_evict=True),
                requested_max_tokens=8,
            )
            await harness.finish(plan, "ok")
            previous = plan.response_id
        with pytest.raises(RequestError) as raised:
            await harness.begin(
                harness.request(filler, previous_response_id=previous, may_evict=False)
            )
        assert raised.value.param == "input" and raised.value.code == "context_length_exceeded"
        plan = await harness.begin(
            harness.request(filler, previous_response_id=previous, may_evict=True)
        )
        assert plan.turn.evicted and len(plan.turn.prompt_token_ids) + plan.turn.max_tokens <= 256
        await harness.finish(plan, "ok")
        [node] = await harness.store.load_chain(plan.response_id)  # a rebased node: all its ids
        assert node.parent_id is None and node.span_token_ids[
            : len(plan.turn.prompt_token_ids)
        ] == (plan.turn.prompt_token_ids)

    harness.go(main())


def test_a_conversation_is_a_session_whose_turns_chain_as_nodes(harness: Harness) -> None:
    async def main() -> None:
        messages, items = to_messages(parse_items([{"role": "user", "content": "first"}], "items"))
        state = await harness.conversations.create(OWNER, messages, items, {"topic": "t"})
        conversation_id = state.session_id
        assert conversation_id.startswith("conv_")
        plans = []
        for text in ("one", "two"):
            plan = await harness.begin(harness.request(text, conversation_id=conversation_id))
            await harness.finish(plan, f"{text}!")
            plans.append(plan)
        session = await harness.sessions.get(OWNER, conversation_id)
        assert [m["content"] for m in session.messages] == ["first", "one", "one!", "two", "two!"]
        assert session.head_response_id == plans[1].response_id
        chain = await harness.store.load_chain(plans[1].response_id)
        assert [n.response_id for n in chain] == [plans[1].response_id, plans[0].response_id]
        stored_ids = chain[1].span_token_ids + chain[0].span_token_ids
        assert stored_ids == session.token_ids

        # An item removed: the history no longer matches the ids, so the next turn renders it whole.
        removed = await harness.conversations.rewrite(
            OWNER, conversation_id, lambda m: without_item(m, session.messages[1]["id"])
        )
        assert [m["content"] for m in removed.messages] == ["first", "one!", "two", "two!"]
        assert removed.token_ids == [] and removed.head_response_id is None
        plan = await harness.begin(harness.request("three", conversation_id=conversation_id))
        assert not plan.turn.is_prefix_continued and plan.base_id is None
        with pytest.raises(ConflictError) as busy:  # the turn holds the conversation's lease
            await harness.begin(harness.request("four", conversation_id=conversation_id))
        assert busy.value.param == "conversation"
        await harness.chains.abort(plan)
        with pytest.raises(NotFoundError) as missing:
            await harness.begin(harness.request("x", conversation_id="conv_missing"))
        assert missing.value.param == "conversation"

    harness.go(main())


_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
