"""Responses API turns on stored state: continue a response chain (`previous_response_id`) or a conversation
from the exact token ids the engine saw, and store each response as a node of token spans (`nodes.py`).

A chain is never changed, only continued: a turn loads the chain, plans its prompt as a session turn would
(`SessionManager.plan_branch`: exact continuation, eviction for `truncation: auto`), and a clean finish adds
one node whose parent is the node it continued. Two turns that continue the same node fork without copying
anything. A conversation is a session (`SessionManager.begin`/`commit`, with its lease); its turns are nodes
too, parented on the session's head node while the session's ids are that node's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from deployments.errors import NotFoundError, RequestError, ServingError
from deployments.sessions.manager import SessionManager, TurnContext, TurnPlan
from deployments.sessions.nodes import ResponseNode
from deployments.sessions.state import SessionState
from deployments.sessions.store import SessionStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ResponseInput:
    """One Responses API request as the chain needs it (built from the wire request by the pipeline)."""

    new_messages: list[dict[str, Any]]  # chat-template messages, each with its item id
    input_items: list[
        dict[str, Any]
    ]  # the request's input items with their ids (`input_items` lists them)
    system_prompt: str | None = None  # `instructions`
    tools: list[dict[str, Any]] | None = None  # chat-template tool dicts
    may_evict: bool = False  # `truncation: auto`
    is_stored: bool = True
    previous_response_id: str | None = None
    conversation_id: str | None = None


@dataclass(slots=True)
class ChainPlan:
    """A planned Responses turn, between `begin` and `commit`/`abort`."""

    response_id: str
    routing_id: str  # the engine's session key: the chain's root, or the conversation
    turn: TurnPlan
    request: ResponseInput
    base_id: str | None  # the node whose exact ids the prompt may continue
    num_base_chars: int = 0
    num_base_token_ids: int = 0


@dataclass(frozen=True, slots=True)
class _Budget:
    requested_max_tokens: int | None
    default_max_tokens: int


class ResponseChains:
    """Plans and keeps Responses API turns over the session store; see the module docstring."""

    def __init__(self, store: SessionStore, sessions: SessionManager, model: str) -> None:
        self._store = store
        self._sessions = sessions
        self._model = model

    # ---- turns ---------------------------------------------------------------------------------------
    async def begin(
        self,
        owner: str,
        response_id: str,
        request: ResponseInput,
        *,
        requested_max_tokens: int | None,
        default_max_tokens: int,
    ) -> ChainPlan:
        """Loads what the request continues and plans its prompt.

        Raises:
            NotFoundError: the previous response or the conversation does not exist for this owner.
            RequestError: a `function_call_output` answers no pending call, the previous response was not
                stored, or the input does not fit (`truncation: disabled`).
            ConflictError: the conversation is generating another response.
        """
        budget = _Budget(requested_max_tokens, default_max_tokens)
        if request.conversation_id is not None:
            return await self._begin_conversation(owner, response_id, request, budget)
        if request.previous_response_id is not None:
            chain = await self._live_chain(
                owner, request.previous_response_id, param="previous_response_id"
            )
            state = _materialize(chain, owner, self._model, request)
            routing_id, base_id = chain[0].root_id, chain[0].response_id
        else:
            state = SessionState(
                session_id=response_id,
                owner=owner,
                model=self._model,
                system_prompt=request.system_prompt,
                tools=request.tools,
            )
            routing_id, base_id = response_id, None
        check_tool_outputs(state.messages, request.input_items)
        with _response_params():
            turn = await self._sessions.plan_branch(
                state,
                request.new_messages,
                requested_max_tokens=budget.requested_max_tokens,
                default_max_tokens=budget.default_max_tokens,
                may_evict=request.may_evict,
            )
        return ChainPlan(
            response_id=response_id,
            routing_id=routing_id,
            turn=turn,
            request=request,
            base_id=base_id,
            num_base_chars=len(state.prompt_text),
            num_base_token_ids=len(state.token_ids),
        )

    async def _begin_conversation(
        self, owner: str, response_id: str, request: ResponseInput, budget: _Budget
    ) -> ChainPlan:
        conversation_id = request.conversation_id
        assert conversation_id is not None
        with _response_params():
            state = await self._sessions.get(owner, conversation_id)
            check_tool_outputs(state.messages, request.input_items)
            turn = await self._sessions.begin(
                owner,
                conversation_id,
                request.new_messages,
                requested_max_tokens=budget.requested_max_tokens,
                default_max_tokens=budget.default_max_tokens,
                context=TurnContext(
                    system_prompt=request.system_prompt,
                    tools=request.tools,
                    may_evict=request.may_evict,
                ),
            )
        # The lease holds from here: the state the turn planned from is the one its commit replaces.
        turn.response_id = response_id if request.is_stored else None
        return ChainPlan(
            response_id=response_id,
            routing_id=conversation_id,
            turn=turn,
            request=request,
            base_id=turn.state.head_response_id,
            num_base_chars=len(turn.state.prompt_text),
            num_base_token_ids=len(turn.state.token_ids),
        )

    async def commit(
        self,
        plan: ChainPlan,
        completion_token_ids: list[int],
        completion_text: str,
        *,
        is_exact: bool,
        reply_message: dict[str, Any],
        response: dict[str, Any],
    ) -> None:
        """Keeps a cleanly finished turn: the conversation's new messages and ids (if any), then the node."""
        request, turn = plan.request, plan.turn
        if request.conversation_id is not None:
            with _response_params():
                await self._sessions.commit(
                    turn,
                    completion_token_ids,
                    completion_text,
                    is_exact=is_exact,
                    assistant_message=reply_message,
                )
        else:
            # A chain turn is never committed to a session; its evictions count all the same.
            self._sessions.counters.num_evicted_messages += len(turn.evicted)
        if not request.is_stored:
            tombstone = ResponseNode(
                plan.response_id, owner=turn.state.owner, root_id=plan.routing_id, is_stored=False
            )
            await self._store.save_node(tombstone)
            return
        kept_ids = self._sessions.completion_ids_to_keep(
            completion_token_ids, completion_text, is_exact=is_exact
        )
        node = ResponseNode(
            plan.response_id,
            owner=turn.state.owner,
            root_id=plan.routing_id,
            response=response,
            input_items=request.input_items,
            conversation_id=request.conversation_id,
        )
        if plan.base_id is not None and turn.is_prefix_continued:
            node.parent_id = plan.base_id
            node.span_text = turn.prompt_text[plan.num_base_chars :] + completion_text
            node.span_token_ids = turn.prompt_token_ids[plan.num_base_token_ids :] + kept_ids
            node.span_messages = [*turn.new_messages, reply_message]
            if await self._store.save_node(node):
                return
            logger.info(
                "response %s: its parent is gone; storing its whole chain", node.response_id
            )
        # A new chain, a prompt that could not continue (truncated, or re-rendered), or a parent gone.
        node.parent_id = None
        node.span_text = turn.prompt_text + completion_text
        node.span_token_ids = turn.prompt_token_ids + kept_ids
        node.span_messages = [*turn.history, *turn.new_messages, reply_message]
        await self._store.save_node(node)

    async def abort(self, plan: ChainPlan) -> None:
        """The turn failed or the client left: the chain and the conversation stay as they were."""
        if plan.request.conversation_id is not None:
            await self._sessions.abort(plan.turn)

    # ---- stored responses ----------------------------------------------------------------------------
    async def get(self, owner: str, response_id: str) -> ResponseNode:
        """Raises NotFoundError (404) for a missing, expired, deleted, unstored or another key's response."""
        chain = await self._live_chain(owner, response_id, param="response_id")
        return chain[0]

    async def delete(self, owner: str, response_id: str) -> None:
        await self.get(owner, response_id)
        await self._store.delete_node(response_id)

    async def _live_chain(self, owner: str, response_id: str, *, param: str) -> list[ResponseNode]:
        chain = await self._store.load_chain(response_id)
        if not chain or chain[0].owner != owner or chain[0].is_deleted:
            raise NotFoundError(
                f"response {response_id!r} does not exist (or it expired, or was deleted)",
                param=param,
                code="response_not_found",
            )
        if not chain[0].is_stored:
            if param == "previous_response_id":
                raise RequestError(
                    f"response {response_id!r} was created with store: false, so there is nothing to "
                    "continue; send the whole conversation as input instead",
                    param=param,
                    code="response_not_stored",
                )
            raise NotFoundError(
                f"response {response_id!r} was created with store: false and was not stored",
                param=param,
                code="response_not_found",
            )
        return chain


def _materialize(
    chain: list[ResponseNode], owner: str, model: str, request: ResponseInput
) -> SessionState:
    """The chain as a session that is never saved: its messages, and the exact text and ids the engine saw.

    The request's own instructions and tools are the system prompt; when they differ from the chain's, the
    rendering no longer begins with the stored text and the prompt is re-encoded (a template break)."""
    base_to_head = chain[::-1]
    return SessionState(
        session_id=chain[0].root_id,
        owner=owner,
        model=model,
        system_prompt=request.system_prompt,
        tools=request.tools,
        messages=[message for node in base_to_head for message in node.span_messages],
        prompt_text="".join(node.span_text for node in base_to_head),
        token_ids=[token_id for node in base_to_head for token_id in node.span_token_ids],
    )


def check_tool_outputs(
    history: list[dict[str, Any]], input_items: list[dict[str, Any]], field: str = "input"
) -> None:
    """Each `function_call_output` must answer a call that is still waiting: one in the history or earlier in
    the input that has no output yet. Raises RequestError naming the item."""
    pending: set[str] = set()
    for message in history:
        if message.get("role") == "assistant":
            pending.update(str(call.get("id")) for call in message.get("tool_calls") or [])
        elif message.get("role") == "tool":
            pending.discard(str(message.get("tool_call_id")))
    for index, item in enumerate(input_items):
        if item.get("type") == "function_call":
            pending.add(str(item.get("call_id")))
        elif item.get("type") == "function_call_output":
            call_id = str(item.get("call_id"))
            if call_id not in pending:
                raise RequestError(
                    f"{field}.{index}.call_id: no function call with call_id {call_id!r} is waiting "
                    "for its output",
                    param=f"{field}.{index}.call_id",
                )
            pending.discard(call_id)


# Session errors name chat's fields; a Responses request has its own names for them.
_RESPONSE_PARAMS = {
    "session_id": "conversation",
    "messages": "input",
    "max_tokens": "max_output_tokens",
}


@contextmanager
def _response_params() -> Iterator[None]:
    """Session errors raised for a Responses turn name the request's own fields."""
    try:
        yield
    except ServingError as error:
        if error.param in _RESPONSE_PARAMS:
            if error.param == "session_id":
                error.message = error.message.replace("session", "conversation", 1)
            error.param = _RESPONSE_PARAMS[error.param]
        raise
