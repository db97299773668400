"""The Router deployment: the OpenAI-compatible HTTP ingress, and the same calls for Python handles.

No `from __future__ import annotations` here: FastAPI must resolve the `Request` annotations at runtime.
"""

import json
import logging
import uuid
from dataclasses import asdict
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from ray import serve

from deployments import responses, sse
from deployments.auth import ApiKeys
from deployments.config import AppConfig
from deployments.errors import NotFoundError, RequestError, ServingError, to_error_body
from deployments.generation import Generation, TextEvent
from deployments.prompts import PromptBuilder
from deployments.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    CreateSessionRequest,
    EvictionView,
    ModelCard,
    ModelList,
    SessionDeleted,
    SessionTurn,
    SessionView,
)
from deployments.sessions.manager import SessionManager, TurnPlan
from deployments.sessions.state import SessionState
from deployments.sessions.store import open_session_store
from deployments.tokenization import ChatTemplate, load_tokenizer

logger = logging.getLogger(__name__)

api = FastAPI(title="Shepherd Serve", docs_url=None, redoc_url=None)
RequestT = TypeVar("RequestT", bound=BaseModel)


@api.exception_handler(ServingError)
async def _serving_error(_: Request, error: ServingError) -> JSONResponse:
    return JSONResponse(to_error_body(error), status_code=error.status_code)


def parse_request(model: type[RequestT], body: Any) -> RequestT:
    """Validate an untrusted body; the 400 names the first offending field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise RequestError(f"{param}: {first['msg']}" if param else first["msg"], param=param) from None


async def read_json(request: Request) -> Any:
    raw = await request.body()
    if not raw and request.method == "POST":
        return {}
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(f"the request body is not valid JSON: {error}") from None


async def sse_stream(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[bytes]:
    try:
        async with aclosing(chunks):
            async for chunk in chunks:
                yield sse.encode_chunk(chunk)
    except ServingError as error:
        # Headers are gone already: report in-band, then end the stream properly.
        logger.warning("stream failed: %s", error.message)
        yield sse.encode_error(to_error_body(error))
    yield sse.DONE


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

    def __init__(self, generation: Generation, plan: TurnPlan | None, sessions: SessionManager) -> None:
        self.generation = generation
        self._plan = plan
        self._sessions = sessions
        self._state: SessionState | None = None

    async def events(self) -> AsyncIterator[TextEvent]:
        is_committed = False
        source = self.generation.events()
        try:
            async for event in source:
                if event.finish_reason is not None and self._plan is not None:
                    # Commit before the last event leaves: a client that drops now still gets its turn kept.
                    self._state = await self._sessions.commit(
                        self._plan,
                        self.generation.completion_token_ids,
                        self.generation.text,
                        is_exact=not self.generation.is_stopped_by_string,
                    )
                    is_committed = True
                yield event
        finally:
            await source.aclose()
            if self._plan is not None and not is_committed:
                await self._sessions.abort(self._plan)

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

    async def __init__(self, config: AppConfig, engine: Any, model_dir: str, tokenizer_dir: str) -> None:
        self._config = config
        self._engine = engine.options(stream=True)
        self._tokenizer = load_tokenizer(tokenizer_dir)
        capabilities = await engine.capabilities.remote()
        self._prompts = PromptBuilder(config, self._tokenizer, model_dir, capabilities)
        self.model_name = self._prompts.model_name
        self._keys = ApiKeys(config.router.api_keys)
        sessions = config.sessions
        self._sessions = SessionManager(
            open_session_store(sessions.store),
            ChatTemplate(self._tokenizer),
            self._tokenizer,
            max_model_len=self._prompts.max_model_len,
            max_sessions_per_owner=sessions.max_sessions_per_owner,
            turn_timeout_s=sessions.turn_timeout_s,
        )

    # ---- HTTP: OpenAI routes --------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> Response:
        return Response(status_code=200)

    @api.get("/v1/models")
    async def http_models(self, request: Request) -> ModelList:
        self._keys.owner_of(request.headers.get("authorization"))
        return ModelList(data=[ModelCard(id=self.model_name, max_model_len=self._prompts.max_model_len)])

    @api.post("/v1/chat/completions")
    async def http_chat(self, request: Request) -> Response:
        owner = self._keys.owner_of(request.headers.get("authorization"))
        body = parse_request(ChatCompletionRequest, await read_json(request))
        session_id = body.session_id or request.headers.get("x-session-id")
        turn = await self._start_chat(body, owner, session_id)
        if not body.stream:
            reply = await responses.chat_response(self.model_name, turn.generation, turn.events(), session=turn.session)
            return JSONResponse(reply.model_dump(exclude_none=True))
        chunks = responses.chat_chunks(
            self.model_name, turn.generation, turn.events(), include_usage=_include_usage(body), session=turn.session
        )
        return sse.EventStreamResponse(sse_stream(chunks))

    @api.post("/v1/completions")
    async def http_completions(self, request: Request) -> Response:
        self._keys.owner_of(request.headers.get("authorization"))
        body = parse_request(CompletionRequest, await read_json(request))
        generation = await self._start_completion(body)
        echo = self._prompts.decode(generation.request.prompt_token_ids) if body.echo else None
        if not body.stream:
            reply = await responses.completion_response(self.model_name, generation, echo_text=echo)
            return JSONResponse(reply.model_dump())
        chunks = responses.completion_chunks(
            self.model_name, generation, echo_text=echo, include_usage=_include_usage(body)
        )
        return sse.EventStreamResponse(sse_stream(chunks))

    # ---- HTTP: sessions ---------------------------------------------------------------------------------
    @api.post("/v1/sessions")
    async def http_create_session(self, request: Request) -> SessionView:
        owner = self._keys.owner_of(request.headers.get("authorization"))
        return await self._create_session(owner, await read_json(request))

    @api.get("/v1/sessions/{session_id}")
    async def http_get_session(self, session_id: str, request: Request) -> SessionView:
        owner = self._keys.owner_of(request.headers.get("authorization"))
        return session_view(await self._sessions.get(owner, session_id), self._prompts.max_model_len)

    @api.delete("/v1/sessions/{session_id}")
    async def http_delete_session(self, session_id: str, request: Request) -> SessionDeleted:
        owner = self._keys.owner_of(request.headers.get("authorization"))
        await self._sessions.delete(owner, session_id)
        return SessionDeleted(id=session_id)

    # ---- the same calls through Python handles (dicts in, dicts out) -----------------------------------
    async def chat(self, body: dict[str, Any], api_key: str | None = None) -> dict[str, Any]:
        """Non-streaming chat completion: `await handle.chat.remote({...})`."""
        request = parse_request(ChatCompletionRequest, {**body, "stream": False})
        turn = await self._start_chat(request, self._owner(api_key), request.session_id)
        reply = await responses.chat_response(self.model_name, turn.generation, turn.events(), session=turn.session)
        return reply.model_dump(exclude_none=True)

    async def chat_stream(self, body: dict[str, Any], api_key: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Streaming chat completion: `handle.options(stream=True).chat_stream.remote({...})` yields chunks."""
        request = parse_request(ChatCompletionRequest, {**body, "stream": True})
        turn = await self._start_chat(request, self._owner(api_key), request.session_id)
        chunks = responses.chat_chunks(
            self.model_name, turn.generation, turn.events(), include_usage=_include_usage(request), session=turn.session
        )
        async with aclosing(chunks):
            async for chunk in chunks:
                yield chunk.model_dump()

    async def completions(self, body: dict[str, Any], api_key: str | None = None) -> dict[str, Any]:
        self._owner(api_key)
        request = parse_request(CompletionRequest, {**body, "stream": False})
        generation = await self._start_completion(request)
        echo = self._prompts.decode(generation.request.prompt_token_ids) if request.echo else None
        return (await responses.completion_response(self.model_name, generation, echo_text=echo)).model_dump()

    async def create_session(self, body: dict[str, Any] | None = None, api_key: str | None = None) -> dict[str, Any]:
        return (await self._create_session(self._owner(api_key), body or {})).model_dump()

    async def get_session(self, session_id: str, api_key: str | None = None) -> dict[str, Any]:
        state = await self._sessions.get(self._owner(api_key), session_id)
        return session_view(state, self._prompts.max_model_len).model_dump()

    async def delete_session(self, session_id: str, api_key: str | None = None) -> dict[str, Any]:
        await self._sessions.delete(self._owner(api_key), session_id)
        return SessionDeleted(id=session_id).model_dump()

    def session_counters(self) -> dict[str, int]:
        return asdict(self._sessions.counters)

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
            owner, self.model_name, system_prompt=body.system_prompt, tools=body.tools, metadata=body.metadata
        )
        return session_view(state, self._prompts.max_model_len)

    async def _start_chat(self, body: ChatCompletionRequest, owner: str, session_id: str | None) -> ChatTurn:
        # 1) Validate; 2) build the prompt (a session continues its exact tokens); 3) start the engine stream.
        self._check_model(body.model)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        plan: TurnPlan | None = None
        if session_id is None:
            prompt_token_ids = self._prompts.render_chat(body)
            request = self._prompts.generate_request(request_id, prompt_token_ids, body)
        else:
            if body.tools:
                raise RequestError("a session's tools are set when the session is created", param="tools")
            self._prompts.check_chat(body)
            plan = await self._sessions.begin(
                owner,
                session_id,
                [m.to_template_dict() for m in body.messages],
                requested_max_tokens=body.requested_max_tokens(),
                default_max_tokens=self._config.router.default_max_tokens,
            )
        try:
            if plan is not None:
                request = self._prompts.generate_request(
                    request_id, plan.prompt_token_ids, body, max_tokens=plan.max_tokens,
                    session_id=session_id, retention=plan.retention,
                )
            engine = self._engine.options(session_id=session_id) if session_id else self._engine
            generation = Generation(engine, request, self._tokenizer, stop=body.stop_strings())
            await generation.start()
        except BaseException:
            if plan is not None:
                await self._sessions.abort(plan)
            raise
        return ChatTurn(generation, plan, self._sessions)

    async def _start_completion(self, body: CompletionRequest) -> Generation:
        self._check_model(body.model)
        if body.suffix is not None:
            raise RequestError("suffix is not supported", param="suffix")
        prompt_token_ids = self._prompts.encode_prompt(body.prompt)
        request = self._prompts.generate_request(f"cmpl-{uuid.uuid4().hex}", prompt_token_ids, body)
        generation = Generation(self._engine, request, self._tokenizer, stop=body.stop_strings())
        await generation.start()
        return generation
