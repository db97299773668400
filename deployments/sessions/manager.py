"""Turns of a session: load, fit to the context window, continue with exact tokens, commit on clean finish."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from deployments.errors import ConflictError, ContextLengthExceeded, NotFoundError, RequestError
from deployments.messages import RetentionRange
from deployments.sessions.state import Eviction, SessionState, new_session_id
from deployments.sessions.store import SessionStore
from deployments.sessions.turns import plan_eviction
from deployments.tokenization import ChatTemplate

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class SessionCounters:
    """Router-local counters, exported as metrics."""

    num_template_breaks: int = 0
    num_evicted_messages: int = 0
    num_committed_turns: int = 0
    num_aborted_turns: int = 0


@dataclass(slots=True)
class TurnPlan:
    """Everything a turn needs between `begin` and `commit`/`abort`."""

    state: SessionState
    lease_token: str
    history: list[dict[str, Any]]
    new_messages: list[dict[str, Any]]
    prompt_text: str
    prompt_token_ids: list[int]
    max_tokens: int
    retention: RetentionRange | None
    evicted: list[dict[str, Any]] = field(default_factory=list)
    num_tokens_freed: int = 0
    is_prefix_continued: bool = False


class SessionManager:
    """Router-side session logic; persistence is the store's, text->ids is the template's."""

    def __init__(
        self,
        store: SessionStore,
        template: ChatTemplate | None,
        tokenizer: Any,
        *,
        max_model_len: int,
        max_sessions_per_owner: int | None,
        turn_timeout_s: float,
    ) -> None:
        self._store = store
        # None: the model has no chat template, so there are no sessions (completions still work).
        self._maybe_template = template
        self._tokenizer = tokenizer
        self._max_model_len = max_model_len
        self._max_sessions_per_owner = max_sessions_per_owner
        self._turn_timeout_s = turn_timeout_s
        self.counters = SessionCounters()

    @property
    def _template(self) -> ChatTemplate:
        if self._maybe_template is None:
            raise RequestError(
                "this model has no chat template, so it has no sessions", param="model"
            )
        return self._maybe_template

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def create(
        self,
        owner: str,
        model: str,
        *,
        system_prompt: str | None,
        tools: list[dict[str, Any]] | None,
        metadata: dict[str, str],
    ) -> SessionState:
        state = SessionState(
            session_id=new_session_id(),
            owner=owner,
            model=model,
            system_prompt=system_prompt,
            tools=tools,
            metadata=metadata,
        )
        if system_prompt or tools:
            # Render once now: a template that rejects the system prompt or tools fails creation, not turn 1.
            probe = [*self._system_messages(state), {"role": "user", "content": "?"}]
            self._template.render_text(probe, tools=tools, add_generation_prompt=False)
        await self._store.create(state, max_sessions_per_owner=self._max_sessions_per_owner)
        return state

    async def get(self, owner: str, session_id: str) -> SessionState:
        state = await self._store.load(session_id)
        # Another key's session is indistinguishable from a missing one.
        if state is None or state.owner != owner:
            raise NotFoundError(
                f"session {session_id!r} does not exist",
                param="session_id",
                code="session_not_found",
            )
        return state

    async def delete(self, owner: str, session_id: str) -> None:
        await self.get(owner, session_id)
        await self._store.delete(session_id)

    # ---- turns -------------------------------------------------------------------------------------
    async def begin(
        self,
        owner: str,
        session_id: str,
        new_messages: Sequence[dict[str, Any]],
        *,
        requested_max_tokens: int | None,
        default_max_tokens: int,
    ) -> TurnPlan:
        """Takes the session's turn lease (409 if another turn runs) and builds the prompt."""
        state = await self.get(owner, session_id)
        if any(m["role"] == "system" for m in new_messages):
            raise RequestError(
                "a session's system prompt is set when the session is created", param="messages"
            )
        token = await self._store.acquire_turn(session_id, ttl_s=self._turn_timeout_s)
        if token is None:
            raise ConflictError(
                f"session {session_id!r} is already generating a reply",
                param="session_id",
                code="session_busy",
            )
        try:
            return self._plan(
                state, token, list(new_messages), requested_max_tokens, default_max_tokens
            )
        except BaseException:
            await self._store.release_turn(session_id, token)
            raise

    async def commit(
        self,
        plan: TurnPlan,
        completion_token_ids: list[int],
        completion_text: str,
        *,
        is_exact: bool,
        assistant_message: dict[str, Any] | None = None,
    ) -> SessionState:
        """Appends the turn and its reply; only called after a clean finish.

        `is_exact` says the reply text is exactly the decoded ids (no stop string cut it): then the next turn
        continues from these very ids; otherwise from the prompt's ids plus the ids of the reply text.
        `assistant_message` replaces the plain reply in the history (a reply that carried tool calls).
        """
        state = plan.state
        try:
            reply = assistant_message or {"role": "assistant", "content": completion_text}
            state.messages = [*plan.history, *plan.new_messages, reply]
            state.prompt_text = plan.prompt_text + completion_text
            if not (is_exact and self._tokenizer.decode(completion_token_ids) == completion_text):
                # The reply text is not exactly these ids (a stop string cut it, or skipped special tokens):
                # keep the prompt's exact ids and continue from the ids of the text the history will show.
                completion_token_ids = self._template.encode(completion_text)
            state.token_ids = plan.prompt_token_ids + completion_token_ids
            state.num_turns += 1
            if plan.evicted:
                state.evictions.append(
                    Eviction(
                        at_turn=state.num_turns,
                        num_messages=len(plan.evicted),
                        num_tokens_freed=plan.num_tokens_freed,
                        roles=[m["role"] for m in plan.evicted],
                    )
                )
            state.updated_at = time.time()
            await self._store.save(state)
            self.counters.num_committed_turns += 1
            return state
        finally:
            await self._release(plan)

    async def abort(self, plan: TurnPlan) -> None:
        """The turn failed, was rejected or the client left: the stored history stays as it was."""
        self.counters.num_aborted_turns += 1
        logger.info("session %s: turn aborted; history unchanged", plan.state.session_id)
        await self._release(plan)

    async def _release(self, plan: TurnPlan) -> None:
        # Shielded: aborts run while the request is being cancelled (anyio re-cancels every await in its scope,
        # and a cancelled executor job that has not started never runs), but the lease must always go.
        await asyncio.shield(self._store.release_turn(plan.state.session_id, plan.lease_token))

    # ---- prompt building -----------------------------------------------------------------------------
    def _system_messages(self, state: SessionState) -> list[dict[str, Any]]:
        return [{"role": "system", "content": state.system_prompt}] if state.system_prompt else []

    def _render(self, state: SessionState, messages: list[dict[str, Any]]) -> str:
        return self._template.render_text(
            [*self._system_messages(state), *messages], tools=state.tools
        )

    def _plan(
        self,
        state: SessionState,
        token: str,
        new_messages: list[dict[str, Any]],
        requested_max_tokens: int | None,
        default_max_tokens: int,
    ) -> TurnPlan:
        # 1) Render the whole conversation; continue from the exact ids when the template agrees with them.
        history = list(state.messages)
        prompt_text = self._render(state, [*history, *new_messages])
        prompt_ids, is_continued = self._continue(state, prompt_text)
        max_tokens = requested_max_tokens or default_max_tokens
        evicted: list[dict[str, Any]] = []
        num_tokens_freed = 0
        # 2) Too long: evict (Shepherd's policy) and re-render; the prefix cache keeps the system prompt.
        if len(prompt_ids) + max_tokens > self._max_model_len:
            plan = plan_eviction(
                [*history, *new_messages],
                lambda kept: (
                    len(self._template.encode(self._render(state, kept))) + max_tokens
                    <= self._max_model_len
                ),
            )
            kept_history = [m for m in plan.kept if not any(m is n for n in new_messages)]
            evicted = plan.evicted
            history = kept_history
            prompt_text = self._render(state, plan.kept)
            num_tokens_before = len(prompt_ids)
            prompt_ids, is_continued = self._template.encode(prompt_text), False
            num_tokens_freed = max(num_tokens_before - len(prompt_ids), 0)
            self.counters.num_evicted_messages += len(evicted)
            if not plan.fits:
                room = self._max_model_len - len(prompt_ids)
                if requested_max_tokens is not None or room <= 0:
                    raise ContextLengthExceeded(
                        f"the session's current turn needs {len(prompt_ids)} prompt tokens plus max_tokens="
                        f"{max_tokens}, more than the context window of {self._max_model_len} even after "
                        "evicting every older turn",
                        param="max_tokens" if requested_max_tokens is not None else "messages",
                    )
                max_tokens = room
        return TurnPlan(
            state=state,
            lease_token=token,
            history=history,
            new_messages=new_messages,
            prompt_text=prompt_text,
            prompt_token_ids=prompt_ids,
            max_tokens=max_tokens,
            retention=self._retention(state, prompt_ids),
            evicted=evicted,
            num_tokens_freed=num_tokens_freed,
            is_prefix_continued=is_continued,
        )

    def _continue(self, state: SessionState, prompt_text: str) -> tuple[list[int], bool]:
        if state.prompt_text and prompt_text.startswith(state.prompt_text):
            suffix = prompt_text[len(state.prompt_text) :]
            return state.token_ids + self._template.encode(suffix), True
        if state.prompt_text:
            # The template renders history differently from what was sent (some models drop reasoning or
            # normalise whitespace): fall back to the full rendering and count the break.
            self.counters.num_template_breaks += 1
            state.num_template_breaks += 1
            logger.info("session %s: chat template prefix break; re-rendering", state.session_id)
        return self._template.encode(prompt_text), False

    def _retention(self, state: SessionState, prompt_ids: list[int]) -> RetentionRange | None:
        """The system prompt (and tools) as a high-retention KV range, when it is a prefix of the prompt."""
        if not state.system_prompt:
            return None
        system_ids = self._template.encode(
            self._template.render_text(
                self._system_messages(state), tools=state.tools, add_generation_prompt=False
            )
        )
        if system_ids and prompt_ids[: len(system_ids)] == system_ids:
            return RetentionRange(start=0, end=len(system_ids), priority=100)
        return None
