"""A turn's lifecycle, for chat, completions and Responses: plan -> open -> deltas -> commit/abort.

1) plan: the request is checked and turned into sampling (`planning.py`) before anything is held; a session
   then takes its turn lease and continues from its exact token ids (`sessions/manager.py`);
2) open: one engine request per choice; the first token is awaited before any byte is sent, so early
   failures still get a real status;
3) deltas: each choice's tokens are detokenized (`generation.py`) and tool calls parsed, once, as they
   stream; the formatters (`responses.py`) shape them for the API that asked;
4) close: a session commits what the turn produced, exactly once, if every choice finished cleanly, and
   otherwise aborts (the stored history stays as it was); a Responses turn commits through its keeper
   (`ResponseKeeper`: a stored response, and its conversation's turn). The caller closes the turn in
   its own `finally` (`async with turn`), after the formatter has consumed the deltas.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any, Protocol

from deployments import metrics
from deployments.config import EngineConfig
from deployments.generation import Generation
from deployments.outputs import (
    ChoiceDelta,
    ChoiceResult,
    ContentPiece,
    TokenLogprob,
    ToolCallPiece,
    ToolCallResult,
    TurnUsage,
)
from deployments.planning import RequestPlanner, TurnSpec
from deployments.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FinishReasonName,
    SessionTurn,
)
from deployments.protocol_responses import ResponsesRequest, reply_message, to_messages
from deployments.served_model import ServedModel
from deployments.sessions.chains import ChainPlan, ResponseChains, ResponseInput
from deployments.sessions.manager import SessionManager, TurnPlan
from deployments.sessions.nodes import new_response_id
from deployments.templating import off_loop
from deployments.tool_parsers import ToolCallParser, collect, get_tool_parser
from deployments.transport.client import EngineClient

logger = logging.getLogger(__name__)


class ChoiceRun:
    """One choice in flight: its generation, its tool-call parser, and what it has produced so far."""

    def __init__(
        self,
        index: int,
        generation: Generation,
        model: ServedModel,
        *,
        parser: ToolCallParser | None,
        has_logprobs: bool,
        is_chat: bool,
        echo: str | None = None,
    ) -> None:
        self.index = index
        self.generation = generation
        self._model = model
        self._parser = parser
        self._has_logprobs = has_logprobs
        # Chat sends a step once it has something to show (a parser may hold text back, and the logprobs
        # wait with it); completions send every step the detokenizer releases.
        self._is_chat = is_chat
        self._events: list[Any] = []  # the parser's events, folded into the result
        self._logprobs: list[TokenLogprob] = []
        self._num_tool_calls = 0
        self._num_token_ids_sent = 0
        self.echo = echo
        self.finish_reason: FinishReasonName | None = None

    async def deltas(self) -> AsyncGenerator[ChoiceDelta, None]:
        async with aclosing(self.generation.events()) as events:
            async for event in events:
                is_final = event.finish_reason is not None
                pieces = self._pieces(event.text, is_final)
                if self._is_chat and not pieces and not is_final:
                    continue
                finish: FinishReasonName | None = None
                if is_final:
                    finish = "tool_calls" if self._num_tool_calls else event.finish_reason
                    self.finish_reason = finish
                yield ChoiceDelta(
                    index=self.index,
                    text=event.text,
                    pieces=pieces,
                    logprobs=self._take_logprobs(),
                    token_ids=self._take_token_ids(),
                    finish_reason=finish,
                )

    def result(self) -> ChoiceResult:
        text = self.generation.text
        content: str | None = text
        calls: list[ToolCallResult] = []
        if self._parser is not None:
            parsed = collect(self._events)
            content = parsed.content
            calls = [ToolCallResult(c.id, c.name, c.arguments) for c in parsed.tool_calls]
        return ChoiceResult(
            index=self.index,
            text=text,
            content=content,
            prompt_token_ids=self.generation.request.prompt_token_ids,
            token_ids=self.generation.completion_token_ids,
            tool_calls=calls,
            logprobs=self._logprobs if self._has_logprobs else None,
            finish_reason=self.finish_reason or "stop",
            echo=self.echo,
        )

    def _pieces(self, text: str, is_final: bool) -> list[ContentPiece | ToolCallPiece]:
        if self._parser is None:
            return [ContentPiece(text)] if text else []
        events = self._parser.feed(text) if text else []
        if is_final:
            events += self._parser.finish()
        self._events.extend(events)
        pieces: list[ContentPiece | ToolCallPiece] = []
        for event in events:
            if event.content:
                pieces.append(ContentPiece(event.content))
            elif event.tool_call_index is not None:
                self._num_tool_calls += event.name is not None
                pieces.append(
                    ToolCallPiece(
                        index=event.tool_call_index,
                        id=event.tool_call_id,
                        name=event.name,
                        arguments=event.arguments_delta,
                    )
                )
        return pieces

    def _take_token_ids(self) -> list[int]:
        token_ids = self.generation.completion_token_ids[self._num_token_ids_sent :]
        self._num_token_ids_sent += len(token_ids)
        return token_ids

    def _take_logprobs(self) -> list[TokenLogprob] | None:
        if not self._has_logprobs:
            return None
        decode = self._model.template.tokenizer.decode
        taken = [
            TokenLogprob(
                token=decode([token_id]),
                logprob=logprob,
                top=tuple((decode([top_id]), top_logprob) for top_id, top_logprob in top),
            )
            for token_id, logprob, top in self.generation.take_logprobs()
        ]
        self._logprobs.extend(taken)
        return taken


class TurnKeeper(Protocol):
    """Keeps what a turn produced in place of a session commit (a Responses API turn: its stored response)."""

    async def commit(self, run: ChoiceRun, reply: dict[str, Any]) -> None:
        """After a clean finish; `reply` is the answer as the client got it (`Turn.keep`)."""
        ...

    async def abort(self) -> None: ...


class ResponseKeeper:
    """A Responses API turn's keeper: the reply message and its ids, then `ResponseChains.commit`."""

    def __init__(self, chains: ResponseChains, plan: ChainPlan) -> None:
        self._chains = chains
        self._plan = plan

    async def commit(self, run: ChoiceRun, reply: dict[str, Any]) -> None:
        result = run.result()
        calls = [(call.id, call.name, call.arguments) for call in result.tool_calls]
        await self._chains.commit(
            self._plan,
            run.generation.completion_token_ids,
            result.text,
            is_exact=not run.generation.is_stopped_by_string and not calls,
            reply_message=reply_message(self._plan.response_id, result.content, calls),
            response=reply,
        )

    async def abort(self) -> None:
        await self._chains.abort(self._plan)


class Turn:
    """One request in flight (chat or completions, one or several choices); see the module docstring.

    Use as `async with turn:` around reading `deltas()`: leaving the block commits or aborts the session turn.
    """

    def __init__(
        self,
        response_id: str,
        model: str,
        runs: list[ChoiceRun],
        *,
        plan: TurnPlan | None = None,
        sessions: SessionManager | None = None,
        returns_token_ids: bool = False,
        keeper: TurnKeeper | None = None,
    ) -> None:
        self.response_id = response_id
        self.returns_token_ids = returns_token_ids
        self.model = model
        self.created = int(time.time())
        self._runs = runs
        self._plan = plan
        self._sessions = sessions
        self._keeper = keeper
        self._reply: dict[str, Any] | None = None
        self._is_closed = False

    @property
    def choice_indexes(self) -> list[int]:
        return [run.index for run in self._runs]

    @property
    def is_complete(self) -> bool:
        """Every choice reached its finish (a stop string counts): what a session commits."""
        return all(run.generation.is_finished for run in self._runs)

    async def deltas(self) -> AsyncGenerator[ChoiceDelta, None]:
        """Every choice's steps, interleaved as they arrive (one choice passes straight through)."""
        async with aclosing(_merge([run.deltas() for run in self._runs])) as merged:
            async for delta in merged:
                yield delta

    def results(self) -> list[ChoiceResult]:
        return [run.result() for run in self._runs]

    def echo(self, index: int) -> str | None:
        return self._runs[index].echo

    def prompt_token_ids(self, index: int) -> list[int]:
        return self._runs[index].generation.request.prompt_token_ids

    def usage(self) -> TurnUsage:
        """Each prompt counts once, however many choices it has (choices of one prompt share its id list);
        its cached tokens are those of the choice that found the most in the engine's prefix cache."""
        prompts: dict[int, int] = {}
        cached: dict[int, int] = {}
        for run in self._runs:
            key = id(run.generation.request.prompt_token_ids)
            prompts[key] = run.generation.num_prompt_tokens
            cached[key] = max(cached.get(key, 0), run.generation.num_cached_tokens)
        completion = sum(run.generation.num_completion_tokens for run in self._runs)
        return TurnUsage(
            prompt_tokens=sum(prompts.values()),
            completion_tokens=completion,
            cached_tokens=sum(cached.values()),
            num_reused_tokens=self._plan.num_reused_tokens if self._plan else 0,
        )

    def keep(self, reply: dict[str, Any]) -> None:
        """The answer a keeper stores with the turn (the Response object); given before the turn closes."""
        self._reply = reply

    def session(self) -> SessionTurn | None:
        """The session this turn continues, as it stands once the turn is committed."""
        plan = self._plan
        if plan is None:
            return None
        return SessionTurn(
            id=plan.state.session_id,
            num_turns=plan.state.num_turns + (0 if plan.is_committed else 1),
            num_evicted_messages=len(plan.evicted),
            evicted_roles=[m["role"] for m in plan.evicted],
            num_prompt_tokens=len(plan.prompt_token_ids),
            is_prefix_continued=plan.is_prefix_continued,
        )

    async def __aenter__(self) -> Turn:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self, *, is_delivered: bool = True) -> None:
        """Commits the session turn if every choice finished and the reply was delivered, else aborts it;
        stops what still runs."""
        if self._is_closed:
            return
        self._is_closed = True
        for run in self._runs:
            run.generation.close()
        if self._keeper is not None:
            if self.is_complete and is_delivered and self._reply is not None:
                await self._keeper.commit(self._runs[0], self._reply)
            else:
                await self._keeper.abort()
            return
        plan, sessions = self._plan, self._sessions
        if plan is None or sessions is None:
            return
        if not (self.is_complete and is_delivered):
            await sessions.abort(plan)
            return
        run = self._runs[0]  # a session turn has one choice (planning.py)
        result = run.result()
        message = None
        if result.tool_calls:
            calls = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in result.tool_calls
            ]
            message = {"role": "assistant", "content": result.content or "", "tool_calls": calls}
        await sessions.commit(
            plan,
            run.generation.completion_token_ids,
            result.text,
            is_exact=not run.generation.is_stopped_by_string and message is None,
            assistant_message=message,
        )


class TurnPipeline:
    """Plans and opens turns for one Router replica: `chat` and `complete` return a `Turn` whose first
    tokens have arrived.

    `engine` is the Engine deployment's handle; the pipeline reaches its replicas through an `EngineClient`.
    """

    def __init__(
        self,
        model: ServedModel,
        planner: RequestPlanner,
        engine: Any,
        engine_config: EngineConfig,
        sessions: SessionManager,
        chains: ResponseChains | None = None,
    ) -> None:
        self._model = model
        self._planner = planner
        # On Serve's path items travel over gRPC, not as one ObjectRef each.
        self._engine = EngineClient(
            engine.options(stream=True, _by_reference=False),
            is_direct=engine_config.transport == "direct",
            max_queued_requests=engine_config.max_queued_requests,
        )
        self._sessions = sessions
        self._chains = chains

    def engine_stats(self) -> dict[str, int]:
        """How this replica's engine streams travelled (direct channel or Serve's handle path)."""
        return self._engine.stats()

    async def chat(self, body: ChatCompletionRequest, owner: str, session_id: str | None) -> Turn:
        # 1) Plan: every check first; only then does a session take its lease and build its prompt.
        spec = self._planner.chat(body, session_id)
        plan: TurnPlan | None = None
        tools = spec.tools
        if session_id is None:
            messages = [message.to_template_dict() for message in body.messages]
            num_chars = sum(len(message["content"]) for message in messages)
            prompt_token_ids = await off_loop(
                num_chars, self._model.template.render, messages, tools=tools
            )
        else:
            plan = await self._sessions.begin(
                owner,
                session_id,
                [message.to_template_dict() for message in body.messages],
                requested_max_tokens=spec.requested_max_tokens,
                default_max_tokens=self._planner.default_max_tokens,
            )
            prompt_token_ids, tools = plan.prompt_token_ids, plan.state.tools
        family = self._model.tool_parser_family if tools else None
        # 2) Open: the engine requests, first tokens awaited; a failure gives the lease back.
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            generations = await self._start(
                response_id,
                prompt_token_ids,
                spec,
                route="/v1/chat/completions",
                skip_special_tokens=family is None,
                max_tokens=plan.max_tokens if plan else None,
                session_id=session_id,
                plan=plan,
            )
        except BaseException:
            if plan is not None:
                await self._sessions.abort(plan)
            raise
        runs = [
            ChoiceRun(
                i,
                generation,
                self._model,
                parser=get_tool_parser(family) if family else None,
                has_logprobs=spec.has_logprobs,
                is_chat=True,
            )
            for i, generation in enumerate(generations)
        ]
        return Turn(
            response_id,
            self._model.name,
            runs,
            plan=plan,
            sessions=self._sessions,
            returns_token_ids=spec.returns_token_ids,
        )

    async def respond(self, body: ResponsesRequest, owner: str) -> Turn:
        """A Responses API turn: new, or continuing a stored response or a conversation (`chains.py`)."""
        assert self._chains is not None, "the Router passes ResponseChains"
        # 1) Plan: every check first; then the chain or conversation is loaded and the prompt built.
        items = body.input_items()
        spec = self._planner.responses(body, has_input=bool(items))
        new_messages, input_items = to_messages(items)
        request = ResponseInput(
            new_messages=new_messages,
            input_items=input_items,
            system_prompt=body.instructions,
            tools=spec.tools,
            may_evict=body.truncation == "auto",
            is_stored=body.store is not False,
            previous_response_id=body.previous_response_id,
            conversation_id=body.conversation_id,
        )
        response_id = new_response_id()
        plan = await self._chains.begin(
            owner,
            response_id,
            request,
            requested_max_tokens=spec.requested_max_tokens,
            default_max_tokens=self._planner.default_max_tokens,
        )
        # A conversation made with /v1/sessions may carry tools of its own.
        tools = spec.tools if spec.tools is not None else plan.turn.state.tools
        family = self._model.tool_parser_family if tools else None
        # 2) Open, routed by the chain's root (or the conversation): forks land where their prefix is.
        try:
            generations = await self._start(
                response_id,
                plan.turn.prompt_token_ids,
                spec,
                route="/v1/responses",
                skip_special_tokens=family is None,
                max_tokens=plan.turn.max_tokens,
                session_id=plan.routing_id,
                plan=plan.turn,
            )
        except BaseException:
            await self._chains.abort(plan)
            raise
        run = ChoiceRun(
            0,
            generations[0],
            self._model,
            parser=get_tool_parser(family) if family else None,
            has_logprobs=False,
            is_chat=True,
        )
        return Turn(
            response_id,
            self._model.name,
            [run],
            plan=plan.turn,
            keeper=ResponseKeeper(self._chains, plan),
            returns_token_ids=spec.returns_token_ids,
        )

    async def complete(self, body: CompletionRequest) -> Turn:
        spec = self._planner.completion(body)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        template = self._model.template
        runs: list[ChoiceRun] = []
        for prompt in body.prompts():
            prompt_token_ids = await off_loop(len(prompt), template.encode_prompt, prompt)
            generations = await self._start(
                response_id,
                prompt_token_ids,
                spec,
                route="/v1/completions",
                skip_special_tokens=True,
                first_index=len(runs),
            )
            echo = template.decode(prompt_token_ids) if body.echo else None
            runs.extend(
                ChoiceRun(
                    len(runs) + k,
                    generation,
                    self._model,
                    parser=None,
                    has_logprobs=spec.has_logprobs,
                    is_chat=False,
                    echo=echo,
                )
                for k, generation in enumerate(generations)
            )
        return Turn(response_id, self._model.name, runs, returns_token_ids=spec.returns_token_ids)

    async def _start(
        self,
        response_id: str,
        prompt_token_ids: list[int],
        spec: TurnSpec,
        *,
        route: str,
        skip_special_tokens: bool,
        max_tokens: int | None = None,
        session_id: str | None = None,
        plan: TurnPlan | None = None,
        first_index: int = 0,
    ) -> list[Generation]:
        """`spec.n` engine requests for one prompt, started together; if one fails to start, the others are
        cancelled. Engine request ids are the response id, suffixed by the choice index when there are several."""
        generations = []
        for i in range(first_index, first_index + spec.n):
            request = self._planner.generate_request(
                f"{response_id}-{i}" if (spec.n > 1 or i) else response_id,
                prompt_token_ids,
                spec,
                max_tokens=max_tokens,
                session_id=session_id,
                retention=plan.retention if plan else None,
                choice_index=i - first_index,
            )
            generations.append(
                Generation(
                    self._engine,
                    request,
                    self._model.template.tokenizer,
                    stop=spec.stop,
                    skip_special_tokens=skip_special_tokens,
                    observer=metrics.RequestMetrics(route, session_id=session_id),
                )
            )
        if len(generations) == 1:
            # One choice (nearly every request): awaited in this task, not a task of its own, so the first
            # token wakes the handler directly instead of a task that then wakes it.
            only = generations[0]
            try:
                await only.start()
            except BaseException:
                only.close()
                raise
            return generations
        starts = [asyncio.ensure_future(g.start()) for g in generations]
        try:
            await asyncio.gather(*starts)
        except BaseException:
            # One failed (or the client left): stop the siblings too, and wait until they have let go.
            for start in starts:
                start.cancel()
            await asyncio.gather(*starts, return_exceptions=True)
            for generation in generations:
                generation.close()
            raise
        return generations


async def _merge(streams: list[AsyncGenerator[Any, None]]) -> AsyncGenerator[Any, None]:
    """Interleave several streams as items arrive (n > 1); one stream passes straight through."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for item in only:
                yield item
        return
    queue: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue()

    async def pump(stream: AsyncGenerator[Any, None]) -> None:
        try:
            async with aclosing(stream):
                async for item in stream:
                    await queue.put((False, item))
            await queue.put((True, None))
        except BaseException as error:
            await queue.put((True, error))

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        remaining = len(tasks)
        while remaining:
            is_end, item = await queue.get()
            if not is_end:
                yield item
                continue
            remaining -= 1
            if isinstance(item, BaseException):
                raise item
    finally:
        for task in tasks:
            task.cancel()
