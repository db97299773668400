"""Turns of a session: load, fit to the context window, continue with exact tokens, commit on clean finish.

A turn holds its session's lease (`SessionStore.acquire_turn`) from `begin` to `commit`/`abort`. The lease
names this router replica and lives `lease_ttl_s`; a heartbeat renews every lease this replica holds every
`lease_ttl_s / 3` while its turn runs (for at most `turn_timeout_s`). A replica that dies stops renewing, so
its sessions are free again at most `lease_ttl_s` later, also across a full restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from deployments.errors import ConflictError, ContextLengthExceeded, NotFoundError, RequestError
from deployments.messages import RetentionRange
from deployments.sessions.state import Eviction, SessionState, new_session_id
from deployments.sessions.store import SessionStore, lease_holder
from deployments.sessions.turns import plan_eviction, unevictable
from deployments.templating import ChatTemplate, RenderedPrompt, off_loop

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
    is_template_break: bool = False
    is_committed: bool = False
    # The prompt's leading ids that are the stored ids themselves (what the engine has seen before).
    num_reused_tokens: int = 0
    # A Responses API turn: the stored response this turn becomes (the session's new head).
    response_id: str | None = None


@dataclass(frozen=True, slots=True)
class TurnContext:
    """What a Responses API turn sets for itself: its instructions and tools replace the session's for this
    turn only (the session keeps its own), and `may_evict=False` (`truncation: disabled`) refuses a turn that
    does not fit with a 400 instead of evicting old turns."""

    system_prompt: str | None = None
    tools: list[dict[str, Any]] | None = None
    may_evict: bool = True

    def applied_to(self, state: SessionState) -> SessionState:
        return dataclasses.replace(
            state,
            system_prompt=self.system_prompt
            if self.system_prompt is not None
            else state.system_prompt,
            tools=self.tools if self.tools is not None else state.tools,
        )


@dataclass(slots=True)
class _HeldLease:
    token: str
    renew_until: float  # time.monotonic(): the turn's `turn_timeout_s` runs out


class SessionManager:
    """Router-side session logic; persistence is the store's, text->ids is the template's."""

    def __init__(
        self,
        store: SessionStore,
        template: ChatTemplate,
        *,
        max_model_len: int,
        max_sessions_per_owner: int | None,
        turn_timeout_s: float,
        lease_ttl_s: float = 10.0,
        holder: str | None = None,
    ) -> None:
        self._store = store
        self._chat_template = template
        self._max_model_len = max_model_len
        self._max_sessions_per_owner = max_sessions_per_owner
        self._turn_timeout_s = turn_timeout_s
        self._lease_ttl_s = min(lease_ttl_s, turn_timeout_s)
        self.holder = holder or f"router-{uuid.uuid4().hex[:12]}"
        self._leases: dict[str, _HeldLease] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self.counters = SessionCounters()

    @property
    def _template(self) -> ChatTemplate:
        # A model without a chat template has no sessions (completions still work).
        if not self._chat_template.has_template:
            raise RequestError(
                "this model has no chat template, so it has no sessions", param="model"
            )
        return self._chat_template

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def create(
        self,
        owner: str,
        model: str,
        *,
        system_prompt: str | None,
        tools: list[dict[str, Any]] | None,
        metadata: dict[str, str],
        session_id: str | None = None,
        messages: list[dict[str, Any]] | None = None,
    ) -> SessionState:
        """Checks everything first and stores last: a refused session is never stored (nor counted).

        `session_id` and `messages` name a conversation and give its first items (`conversations.py`)."""
        state = SessionState(
            session_id=session_id or new_session_id(),
            owner=owner,
            model=model,
            system_prompt=system_prompt,
            tools=tools,
            metadata=metadata,
            messages=list(messages or []),
        )
        if system_prompt or tools:
            # Render once now: a template that rejects the system prompt or tools fails creation, not turn 1;
            # and a system prompt that leaves no room for a turn is refused here, not on every turn.
            template = self._template
            template.check_fits(
                len(system_prompt or ""), self._max_model_len, param="system_prompt"
            )
            probe = [*self._system_messages(state), {"role": "user", "content": "?"}]
            prompt = await off_loop(
                len(system_prompt or ""),
                template.render_prompt,
                probe,
                tools=tools,
                add_generation_prompt=True,
            )
            num_tokens = len(await off_loop(len(prompt.text), template.encode_rendered, prompt))
            if num_tokens >= self._max_model_len:
                raise ContextLengthExceeded(
                    f"the system prompt and tools take {num_tokens} tokens with a one-word turn; this "
                    f"model's context window is {self._max_model_len} tokens",
                    param="system_prompt" if system_prompt else "tools",
                )
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
        context: TurnContext | None = None,
    ) -> TurnPlan:
        """Takes the session's turn lease (409 if another turn runs) and builds the prompt."""
        state = await self.get(owner, session_id)
        new_messages = list(new_messages)
        planned = state if context is None else context.applied_to(state)
        self._check_fits(planned, new_messages)
        token = await self._store.acquire_turn(
            session_id, ttl_s=self._lease_ttl_s, holder=self.holder
        )
        if token is None:
            raise ConflictError(
                f"session {session_id!r} is already generating a reply",
                param="session_id",
                code="session_busy",
            )
        self._hold(session_id, token)
        try:
            plan = await self._plan_off_loop(
                planned,
                token,
                new_messages,
                requested_max_tokens,
                default_max_tokens,
                may_evict=True if context is None else context.may_evict,
            )
        except BaseException:
            await self._release(session_id, token)
            raise
        if context is not None:
            # The commit saves the session with its own system prompt and tools.
            state.num_template_breaks = planned.num_template_breaks
            plan.state = state
        self._count_template_break(plan)
        return plan

    async def plan_branch(
        self,
        state: SessionState,
        new_messages: Sequence[dict[str, Any]],
        *,
        requested_max_tokens: int | None,
        default_max_tokens: int,
        may_evict: bool,
    ) -> TurnPlan:
        """The prompt of a turn that continues `state` without a lease and without saving it: a stored
        response's chain (`chains.py`), which is never changed, only continued."""
        new_messages = list(new_messages)
        self._check_fits(state, new_messages)
        plan = await self._plan_off_loop(
            state,
            "",
            new_messages,
            requested_max_tokens,
            default_max_tokens,
            may_evict=may_evict,
        )
        self._count_template_break(plan)
        return plan

    def completion_ids_to_keep(
        self, completion_token_ids: list[int], completion_text: str, *, is_exact: bool
    ) -> list[int]:
        """The ids the next turn continues from: the generated ids themselves when the reply text is exactly
        their decoding (no stop string cut it, no special token was skipped), else the ids of the reply text
        the history will show."""
        # Kept even where they hold bytes that are not UTF-8 (U+FFFD in the text): the next turn continues
        # from the very ids the engine produced and cached, though a fresh render of the text would count
        # other ids.
        if (
            is_exact
            and self._template.decode(completion_token_ids, skip_special_tokens=False)
            == completion_text
        ):
            return completion_token_ids
        # Keep the prompt's exact ids and continue from the ids of the text the history will show.
        return self._template.encode_text(completion_text)

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
            # The prompt's ids stay exact; the reply's are the generated ids when they are its text.
            completion_token_ids = self.completion_ids_to_keep(
                completion_token_ids, completion_text, is_exact=is_exact
            )
            state.token_ids = plan.prompt_token_ids + completion_token_ids
            state.head_response_id = plan.response_id
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
            plan.is_committed = True
            self.counters.num_committed_turns += 1
            self.counters.num_evicted_messages += len(plan.evicted)
            return state
        finally:
            await self._release(state.session_id, plan.lease_token)

    async def abort(self, plan: TurnPlan) -> None:
        """The turn failed, was rejected or the client left: the stored history stays as it was."""
        self.counters.num_aborted_turns += 1
        logger.info("session %s: turn aborted; history unchanged", plan.state.session_id)
        await self._release(plan.state.session_id, plan.lease_token)

    async def close(self) -> None:
        """Stops the heartbeat (the replica is going away; its leases run out on their own)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None

    # ---- leases ------------------------------------------------------------------------------------
    def _hold(self, session_id: str, token: str) -> None:
        self._leases[session_id] = _HeldLease(token, time.monotonic() + self._turn_timeout_s)
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._beat(), name="session-lease-heartbeat")

    async def _release(self, session_id: str, token: str) -> None:
        held = self._leases.get(session_id)
        if held is not None and held.token == token:
            del self._leases[session_id]
        # Shielded: aborts run while the request is being cancelled (anyio re-cancels every await in its scope,
        # and a cancelled executor job that has not started never runs), but the lease must always go.
        await asyncio.shield(self._store.release_turn(session_id, token))

    async def _beat(self) -> None:
        """Renews this replica's leases every `lease_ttl_s / 3` while their turns run."""
        interval_s = self._lease_ttl_s / 3
        while True:
            await asyncio.sleep(interval_s)
            now = time.monotonic()
            for session_id, held in list(self._leases.items()):
                if held.renew_until <= now:
                    # The turn ran past `turn_timeout_s`: it no longer holds its session.
                    logger.warning(
                        "session %s: turn ran past turn_timeout_s; its lease is no longer renewed",
                        session_id,
                    )
                    del self._leases[session_id]
            leases = {session_id: held.token for session_id, held in self._leases.items()}
            if not leases:
                continue
            try:
                lost = await self._store.renew_turns(leases, ttl_s=self._lease_ttl_s)
            except Exception:  # the store is unreachable for a moment: the next beat retries
                logger.exception("renewing %d session leases failed", len(leases))
                continue
            for session_id in lost:
                logger.warning(
                    "session %s: lost its turn lease (holder %s)",
                    session_id,
                    lease_holder(leases[session_id]),
                )

    # ---- prompt building -----------------------------------------------------------------------------
    def _system_messages(self, state: SessionState) -> list[dict[str, Any]]:
        return [{"role": "system", "content": state.system_prompt}] if state.system_prompt else []

    def _render(self, state: SessionState, messages: list[dict[str, Any]]) -> RenderedPrompt:
        return self._template.render_prompt(
            [*self._system_messages(state), *messages], tools=state.tools
        )

    def _count(self, state: SessionState, messages: list[dict[str, Any]]) -> int:
        return len(self._template.encode_rendered(self._render(state, messages)))

    def _check_fits(self, state: SessionState, new_messages: list[dict[str, Any]]) -> None:
        # What no eviction can drop (the system prompt, the current user message) must fit the window:
        # refused by size before any of it is tokenized.
        self._template.check_fits(
            len(state.system_prompt or "")
            + sum(len(str(m.get("content") or "")) for m in unevictable(new_messages)),
            self._max_model_len,
        )

    async def _plan_off_loop(
        self,
        state: SessionState,
        token: str,
        new_messages: list[dict[str, Any]],
        requested_max_tokens: int | None,
        default_max_tokens: int,
        *,
        may_evict: bool,
    ) -> TurnPlan:
        """`_plan` on a worker thread for a long conversation: it touches only this turn's state."""
        num_chars = len(state.prompt_text) + sum(
            len(str(m.get("content") or "")) for m in new_messages
        )
        return await off_loop(
            num_chars,
            self._plan,
            state,
            token,
            new_messages,
            requested_max_tokens,
            default_max_tokens,
            may_evict=may_evict,
        )

    def _count_template_break(self, plan: TurnPlan) -> None:
        if plan.is_template_break:
            self.counters.num_template_breaks += 1
            logger.info(
                "session %s: chat template prefix break; re-rendering", plan.state.session_id
            )

    def _plan(
        self,
        state: SessionState,
        token: str,
        new_messages: list[dict[str, Any]],
        requested_max_tokens: int | None,
        default_max_tokens: int,
        *,
        may_evict: bool = True,
    ) -> TurnPlan:
        # 1) Render the whole conversation; continue from the exact ids when the template agrees with them.
        #    Runs on a worker thread for a long conversation (`_plan_off_loop`).
        history = list(state.messages)
        prompt = self._render(state, [*history, *new_messages])
        prompt_ids, is_continued = self._continue(state, prompt)
        is_template_break = not is_continued and bool(state.prompt_text)
        max_tokens = requested_max_tokens or default_max_tokens
        evicted: list[dict[str, Any]] = []
        num_tokens_freed = 0
        num_reused_tokens = len(state.token_ids) if is_continued else 0
        if not may_evict and len(prompt_ids) + max_tokens > self._max_model_len:
            room = self._max_model_len - len(prompt_ids)
            if requested_max_tokens is not None or room <= 0:
                raise ContextLengthExceeded(
                    f"the conversation needs {len(prompt_ids)} prompt tokens plus max_output_tokens="
                    f"{max_tokens}, more than the context window of {self._max_model_len}; with truncation "
                    "'auto' the oldest turns would be dropped",
                    param="max_output_tokens" if requested_max_tokens is not None else "input",
                )
            max_tokens = room
        # 2) Too long: evict (Shepherd's policy) and re-render; the prefix cache keeps the system prompt.
        if len(prompt_ids) + max_tokens > self._max_model_len:
            plan = plan_eviction(
                [*history, *new_messages],
                lambda kept: self._count(state, kept) + max_tokens <= self._max_model_len,
            )
            kept_history = [m for m in plan.kept if not any(m is n for n in new_messages)]
            evicted = plan.evicted
            history = kept_history
            prompt = self._render(state, plan.kept)
            # What the eviction freed in the context window: a prompt over the window (its own messages
            # too long, or a history that re-renders longer than its exact ids) frees at most the window.
            num_tokens_before = min(len(prompt_ids), self._max_model_len)
            prompt_ids, is_continued = self._template.encode_rendered(prompt), False
            num_reused_tokens = 0
            num_tokens_freed = max(num_tokens_before - len(prompt_ids), 0)
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
        prompt_text = prompt.text
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
            num_reused_tokens=num_reused_tokens,
            is_template_break=is_template_break,
        )

    def _continue(self, state: SessionState, prompt: RenderedPrompt) -> tuple[list[int], bool]:
        continued = self._template.continue_from(state.prompt_text, state.token_ids, prompt)
        if continued is not None:
            return continued, True
        if state.prompt_text:
            # The template renders history differently from what was sent (some models drop reasoning or
            # normalise whitespace): fall back to the full rendering and count the break.
            state.num_template_breaks += 1
        return self._template.encode_rendered(prompt), False

    def _retention(self, state: SessionState, prompt_ids: list[int]) -> RetentionRange | None:
        """The system prompt (and tools) as a high-retention KV range, when it is a prefix of the prompt."""
        if not state.system_prompt:
            return None
        system_ids = self._template.system_ids(state.system_prompt, state.tools)
        if system_ids and prompt_ids[: len(system_ids)] == system_ids:
            return RetentionRange(start=0, end=len(system_ids), priority=100)
        return None
