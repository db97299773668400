"""The Router deployment: the OpenAI-compatible HTTP ingress, and the same calls for Python handles.

No `from __future__ import annotations` here: FastAPI must resolve the `Request` annotations at runtime.
"""

import asyncio
import hashlib
import itertools
import logging
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import asdict
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from ray import serve

from deployments import limits, metrics, responses, sse
from deployments.auth import ApiKeys
from deployments.config import AppConfig
from deployments.engine_client import EngineClient
from deployments.errors import NotFoundError, RequestError, ServingError, to_error_body
from deployments.generation import Generation, TextEvent
from deployments.messages import RetentionRange
from deployments.prompts import PromptBuilder
from deployments.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    CreateSessionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EvictionView,
    ModelCard,
    ModelList,
    SessionDeleted,
    SessionTurn,
    SessionView,
    TokenizeRequest,
    TokenizeResponse,
)
from deployments.sessions.manager import SessionManager, TurnPlan
from deployments.sessions.state import SessionState
from deployments.sessions.store import open_session_store
from deployments.tokenization import ChatTemplate, load_tokenizer
from deployments.tool_parsers import get_tool_parser

logger = logging.getLogger(__name__)

api = FastAPI(title="Shepherd Serve", docs_url=None, redoc_url=None)
# Added last = outermost: the observer also counts and logs the guard's 413/429/503 answers.
api.add_middleware(limits.RequestGuard)
api.add_middleware(metrics.RequestObserver)
RequestT = TypeVar("RequestT", bound=BaseModel)


@api.exception_handler(ServingError)
async def _serving_error(_: Request, error: ServingError) -> JSONResponse:
    response: JSONResponse = limits.error_response(error)  # adds Retry-After to 429/503
    return response


def parse_request(model: type[RequestT], body: Any) -> RequestT:
    """Validate an untrusted body; the 400 names the first offending field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        loc = first["loc"]
        param = ".".join(str(part) for part in loc) or None
        text = str(first["msg"]).removeprefix("Value error, ")
        if param is None:
            # A whole-request check: its message starts with the field it is about.
            candidate = text.split(" ", 1)[0]
            param = candidate if candidate in model.model_fields else None
        message = f"{param}: {text}" if param and not text.startswith(param) else text
        if first["type"] == "extra_forbidden":
            message = f"{param}: unknown field (not part of this API)"
        if len(loc) > 1 and loc[0] == "tools" and isinstance(loc[1], int):
            message += f" (tool {_tool_name(body, loc[1])!r})"
        raise RequestError(message, param=param) from None


def _tool_name(body: dict[str, Any], index: int) -> str | None:
    try:
        return str(body["tools"][index]["function"]["name"])
    except (KeyError, IndexError, TypeError):
        return None


async def read_json(request: Request) -> Any:
    raw = await request.body()
    if not raw and request.method == "POST":
        return {}
    return limits.parse_json(raw)


async def sse_stream(chunks: AsyncGenerator[BaseModel, None]) -> AsyncGenerator[bytes, None]:
    try:
        async with aclosing(chunks):
            async for chunk in chunks:
                yield sse.encode_chunk(chunk)
    except ServingError as error:
        # Headers are gone already: report in-band, then end the stream properly.
        logger.warning("stream failed: %s", error.message)
        yield sse.encode_error(to_error_body(error))
    yield sse.DONE


def tool_call_ids(request_id: str, family: str) -> Callable[[], str]:
    """Ids derived from the request id: the reply and the session's stored copy parse the same text
    separately, and must name the calls alike (templates render ids; clients answer with them)."""
    counter = itertools.count()

    def make_id() -> str:
        digest = hashlib.sha256(f"{request_id}:{next(counter)}".encode()).hexdigest()
        # Mistral's templates require 9 alphanumeric characters.
        return digest[:9] if family == "mistral" else f"call_{digest[:24]}"

    return make_id


def _include_usage(body: Any) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def session_view(state: SessionState, context_window: int) -> SessionView:
    return SessionView(
        id=state.session_id,
        model=state.model,
        created_at=state.created_at,
        updated_at=state.updated_at,
        system_prompt=state.system_prompt,
        tools=state.tools,
        metadata=state.metadata,
        messages=state.messages,
        num_turns=state.num_turns,
        num_tokens=len(state.token_ids),
        context_window=context_window,
        num_evicted_messages=sum(e.num_messages for e in state.evictions),
        evictions=[EvictionView(**asdict(e)) for e in state.evictions],
        num_template_breaks=state.num_template_breaks,
    )


class ChatTurn:
    """One chat request in flight; on a session it commits the turn on a clean finish and only then."""

    def __init__(
        self,
        generation: Generation,
        plan: TurnPlan | None,
        sessions: SessionManager,
        parser_family: str | None,
    ) -> None:
        self.generation = generation
        self._plan = plan
        self._sessions = sessions
        self._parser_family = parser_family
        self._state: SessionState | None = None

    async def events(self) -> AsyncGenerator[TextEvent, None]:
        is_committed = False
        source = self.generation.events()
        try:
            async for event in source:
                if event.finish_reason is not None and self._plan is not None:
                    # Commit before the last event leaves: a client that drops now still gets its turn kept.
                    self._state = await self._commit(self._plan)
                    is_committed = True
                yield event
        finally:
            await source.aclose()
            if self._plan is not None and not is_committed:
                await self._sessions.abort(self._plan)

    async def _commit(self, plan: TurnPlan) -> SessionState:
        text = self.generation.text
        message = None
        if self._parser_family is not None:
            make_id = tool_call_ids(self.generation.request.request_id, self._parser_family)
            parsed = get_tool_parser(self._parser_family, make_id=make_id).parse(text)
            if parsed.tool_calls:
                calls = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments},
                    }
                    for c in parsed.tool_calls
                ]
                message = {
                    "role": "assistant",
                    "content": parsed.content or "",
                    "tool_calls": calls,
                }
        return await self._sessions.commit(
            plan,
            self.generation.completion_token_ids,
            text,
            is_exact=not self.generation.is_stopped_by_string and message is None,
            assistant_message=message,
        )

    def session(self) -> SessionTurn | None:
        plan = self._plan
        if plan is None:
            return None
        return SessionTurn(
            id=plan.state.session_id,
            num_turns=self._state.num_turns if self._state else plan.state.num_turns,
            num_evicted_messages=len(plan.evicted),
            evicted_roles=[m["role"] for m in plan.evicted],
            num_prompt_tokens=len(plan.prompt_token_ids),
            is_prefix_continued=plan.is_prefix_continued,
        )


@serve.ingress(api)
class Router:
    """Text lives here: templating, tokenization, detokenization, stop strings; the engine sees token ids."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self, config: AppConfig, engine: Any, model_dir: str, tokenizer_dir: str
    ) -> None:
        self._config = config
        self._tokenizer = load_tokenizer(tokenizer_dir)
        capabilities = await engine.capabilities.remote()
        # On Serve's path items travel over gRPC, not as one ObjectRef each (benchmarks/RESULTS.md).
        self._engine = EngineClient(
            engine.options(stream=True, _by_reference=False),
            is_direct=config.engine.transport == "direct",
            max_queued_requests=config.engine.max_queued_requests,
        )
        self._prompts = PromptBuilder(config, self._tokenizer, model_dir, capabilities)
        self.model_name = self._prompts.model_name
        self._keys = ApiKeys(config.router.api_keys)
        sessions = config.sessions
        self._sessions = SessionManager(
            open_session_store(sessions.store),
            ChatTemplate(self._tokenizer) if self._tokenizer.chat_template else None,
            self._tokenizer,
            max_model_len=self._prompts.max_model_len,
            max_sessions_per_owner=sessions.max_sessions_per_owner,
            turn_timeout_s=sessions.turn_timeout_s,
        )
        router = config.router
        limits.RequestGuard.configure(
            limits.LimitSettings(
                max_body_bytes=router.max_request_body_bytes,
                max_in_flight=router.max_ongoing_requests,
                max_in_flight_per_key=router.max_concurrent_requests_per_key,
                retry_after_s=router.retry_after_s,
                body_timeout_s=router.request_body_timeout_s,
            )
        )
        session_metrics = metrics.SessionMetrics()
        self._metrics_task = metrics.start_polling(
            lambda: session_metrics.update(asdict(self._sessions.counters))
        )

    # ---- HTTP: OpenAI routes --------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> Response:
        return Response(status_code=200)

    @api.get("/metrics")
    async def http_metrics(self) -> Response:
        """This replica's own series (Prometheus text); all replicas' are on Ray's metrics endpoint."""
        content, content_type = metrics.render_summary()
        return Response(content, headers={"content-type": content_type})

    @api.get("/v1/models")
    async def http_models(self, request: Request) -> ModelList:
        self._keys.owner_of(request.headers.get("authorization"))
        return ModelList(
            data=[ModelCard(id=self.model_name, max_model_len=self._prompts.max_model_len)]
        )

    @api.post("/v1/chat/completions")
    async def http_chat(self, request: Request) -> Response:
        owner = self._keys.owner_of(request.headers.get("authorization"))
        body = parse_request(ChatCompletionRequest, await read_json(request))
        request_id, choices, session = await self._start_chat(
            body, owner, body.session_id or request.headers.get("x-session-id")
        )
        if not body.stream:
            reply = await responses.chat_response(
                self.model_name, request_id, choices, session=session
            )
            return JSONResponse(reply.model_dump(exclude_none=True))
        chunks = responses.chat_chunks(
            self.model_name,
            request_id,
            choices,
            include_usage=_include_usage(body),
            session=session,
        )
        return sse.EventStreamResponse(sse_stream(chunks))

    @api.post("/v1/completions")
    async def http_completions(self, request: Request) -> Response:
        self._keys.owner_of(request.headers.get("authorization"))
        body = parse_request(CompletionRequest, await read_json(request))
        request_id, choices, echo = await self._start_completion(body)
        if not body.stream:
            reply = await responses.completion_response(self.model_name, request_id, choices, echo)
            return JSONResponse(reply.model_dump(exclude_none=True))
        chunks = responses.completion_chunks(
            self.model_name, request_id, choices, echo, include_usage=_include_usage(body)
        )
        return sse.EventStreamResponse(sse_stream(chunks))

    @api.post("/tokenize")
    async def http_tokenize(self, request: Request) -> TokenizeResponse:
        self._keys.owner_of(request.headers.get("authorization"))
        return self._tokenize(parse_request(TokenizeRequest, await read_json(request)))

    @api.post("/detokenize")
    async def http_detokenize(self, request: Request) -> DetokenizeResponse:
        self._keys.owner_of(request.headers.get("authorization"))
        body = parse_request(DetokenizeRequest, await read_json(request))
        self._check_model(body.model)
        return DetokenizeResponse(
            prompt=self._prompts.decode(self._prompts.encode_prompt(body.tokens))
        )

    # ---- HTTP: sessions ---------------------------------------------------------------------------------
    @api.post("/v1/sessions")
    async def http_create_session(self, request: Request) -> SessionView:
        owner = self._keys.owner_of(request.headers.get("authorization"))
        return await self._create_session(owner, await read_json(request))

    @api.get("/v1/sessions/{session_id}")
    async def http_get_session(self, session_id: str, request: Request) -> SessionView:
        owner = self._keys.owner_of(request.headers.get("authorization"))
        return session_view(
            await self._sessions.get(owner, session_id), self._prompts.max_model_len
        )

    @api.delete("/v1/sessions/{session_id}")
    async def http_delete_session(self, session_id: str, request: Request) -> SessionDeleted:
        owner = self._keys.owner_of(request.headers.get("authorization"))
        await self._sessions.delete(owner, session_id)
        return SessionDeleted(id=session_id)

    # ---- the same calls through Python handles (dicts in, dicts out) -----------------------------------
    async def chat(self, body: dict[str, Any], api_key: str | None = None) -> dict[str, Any]:
        """Non-streaming chat completion: `await handle.chat.remote({...})`."""
        request = parse_request(ChatCompletionRequest, {**body, "stream": False})
        request_id, choices, session = await self._start_chat(
            request, self._owner(api_key), request.session_id
        )
        reply = await responses.chat_response(self.model_name, request_id, choices, session=session)
        return reply.model_dump(exclude_none=True)

    async def chat_stream(
        self, body: dict[str, Any], api_key: str | None = None
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Streaming chat completion: `handle.options(stream=True).chat_stream.remote({...})` yields chunks."""
        request = parse_request(ChatCompletionRequest, {**body, "stream": True})
        request_id, choices, session = await self._start_chat(
            request, self._owner(api_key), request.session_id
        )
        chunks = responses.chat_chunks(
            self.model_name,
            request_id,
            choices,
            include_usage=_include_usage(request),
            session=session,
        )
        async with aclosing(chunks):
            async for chunk in chunks:
                yield chunk.model_dump()

    async def completions(self, body: dict[str, Any], api_key: str | None = None) -> dict[str, Any]:
        self._owner(api_key)
        request = parse_request(CompletionRequest, {**body, "stream": False})
        request_id, choices, echo = await self._start_completion(request)
        reply = await responses.completion_response(self.model_name, request_id, choices, echo)
        return reply.model_dump(exclude_none=True)

    async def tokenize(self, body: dict[str, Any], api_key: str | None = None) -> dict[str, Any]:
        self._owner(api_key)
        return self._tokenize(parse_request(TokenizeRequest, body)).model_dump()

    async def create_session(
        self, body: dict[str, Any] | None = None, api_key: str | None = None
    ) -> dict[str, Any]:
        return (await self._create_session(self._owner(api_key), body or {})).model_dump()

    async def get_session(self, session_id: str, api_key: str | None = None) -> dict[str, Any]:
        state = await self._sessions.get(self._owner(api_key), session_id)
        return session_view(state, self._prompts.max_model_len).model_dump()

    async def delete_session(self, session_id: str, api_key: str | None = None) -> dict[str, Any]:
        await self._sessions.delete(self._owner(api_key), session_id)
        return SessionDeleted(id=session_id).model_dump()

    def session_counters(self) -> dict[str, int]:
        return asdict(self._sessions.counters)

    def engine_client_stats(self) -> dict[str, int]:
        """How this replica's engine streams travelled (direct channel or Serve's handle path)."""
        return self._engine.stats()

    # ---- flow ---------------------------------------------------------------------------------------------
    def _owner(self, api_key: str | None) -> str:
        return self._keys.owner_of(f"Bearer {api_key}" if api_key else None)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise NotFoundError(
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    async def _create_session(self, owner: str, raw: Any) -> SessionView:
        body = parse_request(CreateSessionRequest, raw)
        self._check_model(body.model)
        state = await self._sessions.create(
            owner,
            self.model_name,
            system_prompt=body.system_prompt,
            tools=[t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
            metadata=body.metadata,
        )
        return session_view(state, self._prompts.max_model_len)

    def _tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        self._check_model(body.model)
        if body.messages is not None:
            tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
            messages = [m.to_template_dict() for m in body.messages]
            tokens = self._prompts.render_tokenize(messages, tools, body.add_generation_prompt)
        else:
            assert body.prompt is not None
            tokens = self._prompts.encode_prompt(
                body.prompt, add_special_tokens=body.add_special_tokens
            )
        return TokenizeResponse(
            count=len(tokens), max_model_len=self._prompts.max_model_len, tokens=tokens
        )

    async def _start_chat(
        self, body: ChatCompletionRequest, owner: str, session_id: str | None
    ) -> tuple[str, list[responses.Choice], Callable[[], SessionTurn | None]]:
        # 1) Validate; 2) build the prompt (a session continues its exact tokens); 3) start the engine streams.
        self._check_model(body.model)
        self._prompts.check_chat(body)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        plan: TurnPlan | None = None
        tools: list[dict[str, Any]] | None = body.tool_dicts()
        if session_id is None:
            prompt_token_ids = self._prompts.render_chat(body)
        else:
            if body.tools:
                raise RequestError(
                    "a session's tools are set when the session is created", param="tools"
                )
            if body.n > 1:
                raise RequestError(
                    "n > 1 cannot continue a session: which reply would it keep?", param="n"
                )
            plan = await self._sessions.begin(
                owner,
                session_id,
                [m.to_template_dict() for m in body.messages],
                requested_max_tokens=body.requested_max_tokens(),
                default_max_tokens=self._config.router.default_max_tokens,
            )
            prompt_token_ids, tools = plan.prompt_token_ids, plan.state.tools
        family = self._prompts.tool_parser_family if tools else None
        try:
            generations = await self._start_generations(
                request_id,
                prompt_token_ids,
                body,
                body.n,
                skip_special_tokens=family is None,
                max_tokens=plan.max_tokens if plan else None,
                session_id=session_id,
                retention=plan.retention if plan else None,
            )
        except BaseException:
            if plan is not None:
                await self._sessions.abort(plan)
            raise
        turns = [ChatTurn(g, plan, self._sessions, family) for g in generations]
        choices = [
            responses.Choice(
                index=i,
                generation=turn.generation,
                events=turn.events(),
                parser=(
                    get_tool_parser(
                        family, make_id=tool_call_ids(turn.generation.request.request_id, family)
                    )
                    if family
                    else None
                ),
                tokenizer=self._tokenizer,
                has_logprobs=body.logprobs,
            )
            for i, turn in enumerate(turns)
        ]
        return request_id, choices, turns[0].session

    async def _start_completion(
        self, body: CompletionRequest
    ) -> tuple[str, list[responses.Choice], list[str | None]]:
        self._check_model(body.model)
        self._prompts.check_completion(body)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        choices: list[responses.Choice] = []
        echo: list[str | None] = []
        for prompt in body.prompts():
            prompt_token_ids = self._prompts.encode_prompt(prompt)
            generations = await self._start_generations(
                request_id,
                prompt_token_ids,
                body,
                body.n,
                skip_special_tokens=True,
                first_index=len(choices),
            )
            for generation in generations:
                choices.append(
                    responses.Choice(
                        index=len(choices),
                        generation=generation,
                        events=generation.events(),
                        tokenizer=self._tokenizer,
                        has_logprobs=body.logprobs is not None,
                    )
                )
                echo.append(self._prompts.decode(prompt_token_ids) if body.echo else None)
        return request_id, choices, echo

    async def _start_generations(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        body: ChatCompletionRequest | CompletionRequest,
        n: int,
        *,
        skip_special_tokens: bool,
        max_tokens: int | None = None,
        session_id: str | None = None,
        retention: RetentionRange | None = None,
        first_index: int = 0,
    ) -> list[Generation]:
        """n engine requests for one prompt, started together; if one fails to start, the others are cancelled.
        Engine request ids are the response id, suffixed by the choice index when there are several."""
        generations = []
        is_chat = isinstance(body, ChatCompletionRequest)
        route = "/v1/chat/completions" if is_chat else "/v1/completions"
        for i in range(first_index, first_index + n):
            request = self._prompts.generate_request(
                f"{request_id}-{i}" if (n > 1 or i) else request_id,
                prompt_token_ids,
                body,
                max_tokens=max_tokens,
                session_id=session_id,
                retention=retention,
            )
            generations.append(
                Generation(
                    self._engine,
                    request,
                    self._tokenizer,
                    stop=body.stop_strings(),
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
