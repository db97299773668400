"""The Router deployment: the OpenAI-compatible HTTP ingress, and the same calls for Python handles.

Routes parse and authenticate, then hand over to the turn pipeline (`chat.py`) and a formatter
(`responses.py`); each turn is closed (committed or aborted) here, once its reply has been written.

No `from __future__ import annotations` here: FastAPI must resolve the `Request` annotations at runtime.
"""

import asyncio
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import asdict
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from ray import serve

from deployments import access_log, limits, metrics, responses, responses_api, sse
from deployments.auth import SCOPE_KEY_DIGEST, ApiKeys
from deployments.chat import Turn, TurnPipeline
from deployments.config import AppConfig
from deployments.errors import (
    NotFoundError,
    RequestError,
    ServingError,
    error_headers,
    to_error_body,
)
from deployments.planning import RequestPlanner
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
    SessionView,
    TokenizeRequest,
    TokenizeResponse,
    parse_request,
)
from deployments.protocol_responses import (
    ConversationCreateRequest,
    ConversationDeleted,
    ConversationObject,
    ConversationUpdateRequest,
    ItemList,
    ItemsCreateRequest,
    LifecycleEvent,
    ResponseDeleted,
    ResponseEvent,
    ResponseObject,
    ResponsesRequest,
    message_items,
    page,
    parse_items,
    to_messages,
    without_item,
)
from deployments.served_model import ServedModel
from deployments.sessions.backends import open_session_store
from deployments.sessions.chains import ResponseChains
from deployments.sessions.conversations import Conversations
from deployments.sessions.manager import SessionManager
from deployments.sessions.state import SessionState
from deployments.templating import off_loop

logger = logging.getLogger(__name__)

api = FastAPI(title="Shepherd Serve", docs_url=None, redoc_url=None)
# Added last = outermost: the access log also counts and logs the guard's 413/429/503 answers.
api.add_middleware(limits.RequestGuard)
api.add_middleware(access_log.RequestObserver)


@api.exception_handler(ServingError)
async def _serving_error(_: Request, error: ServingError) -> JSONResponse:
    metrics.count_rejection(error)
    return JSONResponse(
        to_error_body(error), status_code=error.status_code, headers=error_headers(error)
    )


async def _read_json(request: Request) -> Any:
    raw = await request.body()
    if not raw and request.method == "POST":
        return {}
    return limits.parse_json(raw)


async def _events(
    turn: Turn, chunks: AsyncGenerator[BaseModel, None]
) -> AsyncGenerator[bytes, None]:
    """The SSE body of one streamed turn. The turn closes once `[DONE]` was written: a session commits only
    a reply the client was sent in full (a client that left, or a replica stopped, before it aborts)."""
    is_delivered = False
    try:
        try:
            async with aclosing(chunks):
                async for chunk in chunks:
                    yield sse.encode_chunk(chunk)
        except ServingError as error:
            # Headers are gone already: report in-band, then end the stream properly.
            logger.warning("stream failed: %s", error.message)
            yield sse.encode_error(to_error_body(error))
        yield sse.DONE
        is_delivered = True
    finally:
        try:
            # Shielded: a client that closes the connection on [DONE] may get the request cancelled while the
            # commit runs; the commit still completes.
            await asyncio.shield(turn.close(is_delivered=is_delivered))
        except ServingError as error:
            # Only a commit fails here, after [DONE]: the client has the whole reply, the session does not.
            logger.warning("streamed session turn not saved: %s", error.message)


def _stored(reply: ResponseObject) -> dict[str, Any]:
    """The Response object as `GET /v1/responses/{id}` returns it (debug token ids are never stored)."""
    return reply.model_dump(mode="json", exclude={"prompt_token_ids", "output_token_ids"})


async def _kept_events(
    turn: Turn, builder: responses_api.ResponseBuilder
) -> AsyncGenerator[ResponseEvent, None]:
    """A response's events; the turn is kept just before the terminal event, so a client that continues
    from the response at once finds it. A turn that breaks or is left is aborted and stores nothing."""
    async with turn, aclosing(builder.events()) as events:
        async for event in events:
            if isinstance(event, LifecycleEvent) and event.type in responses_api.TERMINAL_EVENTS:
                turn.keep(_stored(event.response))
                await turn.close()
            yield event


async def _response_events(
    turn: Turn, builder: responses_api.ResponseBuilder
) -> AsyncGenerator[bytes, None]:
    """The SSE body of a streamed response (no `[DONE]`: the terminal event ends it)."""
    try:
        async with aclosing(_kept_events(turn, builder)) as events:
            async for event in events:
                yield sse.encode_event(event.type, event)
    except ServingError as error:
        # Headers are gone already: report in-band, as an `error` event and `response.failed`.
        logger.warning("response stream failed: %s", error.message)
        for event in builder.failed(error):
            yield sse.encode_event(event.type, event)


def _list_query(request: Request) -> tuple[str | None, int, Literal["asc", "desc"]]:
    """`after`, `limit` (1 to 100, default 20) and `order` (`asc` or `desc`, default `desc`) of a list."""
    query = request.query_params
    limit_text = query.get("limit", "20")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= 100:
        raise RequestError("limit: an integer from 1 to 100", param="limit")
    order = query.get("order", "desc")
    if order == "asc":
        return query.get("after"), int(limit_text), "asc"
    if order == "desc":
        return query.get("after"), int(limit_text), "desc"
    raise RequestError("order: 'asc' or 'desc'", param="order")


def _conversation_view(state: SessionState) -> ConversationObject:
    return ConversationObject(
        id=state.session_id, created_at=int(state.created_at), metadata=state.metadata
    )


def _include_usage(body: ChatCompletionRequest | CompletionRequest) -> bool:
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


@serve.ingress(api)
class Router:
    """Text lives here: templating, tokenization, detokenization, stop strings; the engine sees token ids."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self, config: AppConfig, engine: Any, model_dir: str, tokenizer_dir: str
    ) -> None:
        self._model = ServedModel.load(config, model_dir, tokenizer_dir)
        self.model_name = self._model.name
        capabilities = await engine.capabilities.remote()
        self._keys = ApiKeys(config.router.api_keys)
        sessions = config.sessions
        store = open_session_store(sessions.store)
        self._sessions = SessionManager(
            store,
            self._model.template,
            max_model_len=self._model.max_model_len,
            max_sessions_per_owner=sessions.max_sessions_per_owner,
            turn_timeout_s=sessions.turn_timeout_s,
            lease_ttl_s=sessions.lease_ttl_s,
            holder=serve.get_replica_context().replica_id.unique_id,
        )
        # The Responses and Conversations APIs keep their state in the same store, as sessions.
        self._chains = ResponseChains(store, self._sessions, self.model_name)
        self._conversations = Conversations(
            store, self._sessions, self.model_name, turn_timeout_s=sessions.turn_timeout_s
        )
        planner = RequestPlanner(self._model, capabilities, config.router)
        self._turns = TurnPipeline(
            self._model, planner, engine, config.engine, self._sessions, self._chains
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
        self._session_metrics = metrics.SessionMetrics()
        self._engine_stream_metrics = metrics.EngineStreamMetrics()
        self._metrics_task = metrics.start_polling(self._update_metrics)

    def _update_metrics(self) -> None:
        self._session_metrics.update(asdict(self._sessions.counters))
        self._engine_stream_metrics.update(self._turns.engine_stats())

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
        self._http_owner(request)
        return ModelList(
            data=[ModelCard(id=self.model_name, max_model_len=self._model.max_model_len)]
        )

    @api.post("/v1/chat/completions")
    async def http_chat(self, request: Request) -> Response:
        owner = self._http_owner(request)
        body = parse_request(ChatCompletionRequest, await _read_json(request))
        turn = await self._turns.chat(
            body, owner, body.session_id or request.headers.get("x-session-id")
        )
        if body.stream:
            chunks = responses.chat_chunks(turn, include_usage=_include_usage(body))
            return sse.EventStreamResponse(_events(turn, chunks))
        async with turn:
            reply = await responses.chat_response(turn)
        return JSONResponse(reply.model_dump(exclude_none=True))

    @api.post("/v1/completions")
    async def http_completions(self, request: Request) -> Response:
        self._http_owner(request)
        body = parse_request(CompletionRequest, await _read_json(request))
        turn = await self._turns.complete(body)
        if body.stream:
            chunks = responses.completion_chunks(turn, include_usage=_include_usage(body))
            return sse.EventStreamResponse(_events(turn, chunks))
        async with turn:
            reply = await responses.completion_response(turn)
        return JSONResponse(reply.model_dump(exclude_none=True))

    @api.post("/tokenize")
    async def http_tokenize(self, request: Request) -> TokenizeResponse:
        self._http_owner(request)
        return await self._tokenize(parse_request(TokenizeRequest, await _read_json(request)))

    @api.post("/detokenize")
    async def http_detokenize(self, request: Request) -> DetokenizeResponse:
        self._http_owner(request)
        body = parse_request(DetokenizeRequest, await _read_json(request))
        self._model.check_name(body.model)
        template = self._model.template
        return DetokenizeResponse(prompt=template.decode(template.encode_prompt(body.tokens)))

    # ---- HTTP: sessions ---------------------------------------------------------------------------------
    @api.post("/v1/sessions")
    async def http_create_session(self, request: Request) -> SessionView:
        return await self._create_session(self._http_owner(request), await _read_json(request))

    @api.get("/v1/sessions/{session_id}")
    async def http_get_session(self, session_id: str, request: Request) -> SessionView:
        state = await self._sessions.get(self._http_owner(request), session_id)
        return session_view(state, self._model.max_model_len)

    @api.delete("/v1/sessions/{session_id}")
    async def http_delete_session(self, session_id: str, request: Request) -> SessionDeleted:
        await self._sessions.delete(self._http_owner(request), session_id)
        return SessionDeleted(id=session_id)

    # ---- HTTP: Responses API ----------------------------------------------------------------------------
    @api.post("/v1/responses")
    async def http_responses(self, request: Request) -> Response:
        owner = self._http_owner(request)
        body = parse_request(ResponsesRequest, await _read_json(request))
        turn = await self._turns.respond(body, owner)
        builder = responses_api.ResponseBuilder(turn, body)
        if body.stream:
            return sse.EventStreamResponse(_response_events(turn, builder))
        async with turn:
            reply = await builder.whole()
            turn.keep(_stored(reply))
        return JSONResponse(reply.model_dump(mode="json"))

    @api.get("/v1/responses/{response_id}")
    async def http_get_response(self, response_id: str, request: Request) -> Response:
        node = await self._chains.get(self._http_owner(request), response_id)
        return JSONResponse(node.response)

    @api.delete("/v1/responses/{response_id}")
    async def http_delete_response(self, response_id: str, request: Request) -> ResponseDeleted:
        await self._chains.delete(self._http_owner(request), response_id)
        return ResponseDeleted(id=response_id)

    @api.get("/v1/responses/{response_id}/input_items")
    async def http_response_input_items(self, response_id: str, request: Request) -> ItemList:
        node = await self._chains.get(self._http_owner(request), response_id)
        after, limit, order = _list_query(request)
        return page(node.input_items, after=after, limit=limit, order=order)

    # ---- HTTP: Conversations API --------------------------------------------------------------------------
    @api.post("/v1/conversations")
    async def http_create_conversation(self, request: Request) -> ConversationObject:
        owner = self._http_owner(request)
        body = parse_request(ConversationCreateRequest, await _read_json(request))
        messages, items = to_messages(parse_items(body.items or [], "items"))
        state = await self._conversations.create(owner, messages, items, body.metadata or {})
        return _conversation_view(state)

    @api.get("/v1/conversations/{conversation_id}")
    async def http_get_conversation(
        self, conversation_id: str, request: Request
    ) -> ConversationObject:
        owner = self._http_owner(request)
        return _conversation_view(await self._conversations.get(owner, conversation_id))

    @api.post("/v1/conversations/{conversation_id}")
    async def http_update_conversation(
        self, conversation_id: str, request: Request
    ) -> ConversationObject:
        owner = self._http_owner(request)
        body = parse_request(ConversationUpdateRequest, await _read_json(request))
        state = await self._conversations.update_metadata(
            owner, conversation_id, body.metadata or {}
        )
        return _conversation_view(state)

    @api.delete("/v1/conversations/{conversation_id}")
    async def http_delete_conversation(
        self, conversation_id: str, request: Request
    ) -> ConversationDeleted:
        await self._conversations.delete(self._http_owner(request), conversation_id)
        return ConversationDeleted(id=conversation_id)

    @api.get("/v1/conversations/{conversation_id}/items")
    async def http_conversation_items(self, conversation_id: str, request: Request) -> ItemList:
        state = await self._conversations.get(self._http_owner(request), conversation_id)
        after, limit, order = _list_query(request)
        return page(message_items(state.messages), after=after, limit=limit, order=order)

    @api.post("/v1/conversations/{conversation_id}/items")
    async def http_add_conversation_items(self, conversation_id: str, request: Request) -> ItemList:
        owner = self._http_owner(request)
        body = parse_request(ItemsCreateRequest, await _read_json(request))
        messages, items = to_messages(parse_items(body.items, "items"))
        await self._conversations.append(owner, conversation_id, messages, items)
        return page(items, after=None, limit=len(items), order="asc")

    @api.get("/v1/conversations/{conversation_id}/items/{item_id}")
    async def http_conversation_item(
        self, conversation_id: str, item_id: str, request: Request
    ) -> Response:
        state = await self._conversations.get(self._http_owner(request), conversation_id)
        for item in message_items(state.messages):
            if item["id"] == item_id:
                return JSONResponse(item)
        raise NotFoundError(
            f"conversation {conversation_id!r} has no item {item_id!r}",
            param="item_id",
            code="item_not_found",
        )

    @api.delete("/v1/conversations/{conversation_id}/items/{item_id}")
    async def http_delete_conversation_item(
        self, conversation_id: str, item_id: str, request: Request
    ) -> ConversationObject:
        state = await self._conversations.rewrite(
            self._http_owner(request),
            conversation_id,
            lambda messages: without_item(messages, item_id),
        )
        return _conversation_view(state)

    # ---- the same calls through Python handles (dicts in, dicts out) -----------------------------------
    async def chat(self, body: dict[str, Any], api_key: str | None = None) -> dict[str, Any]:
        """Non-streaming chat completion: `await handle.chat.remote({...})`."""
        with access_log.handle_call("chat"):
            request = parse_request(ChatCompletionRequest, {**body, "stream": False})
            turn = await self._turns.chat(request, self._owner(api_key), request.session_id)
            async with turn:
                reply = await responses.chat_response(turn)
            return reply.model_dump(exclude_none=True)

    async def chat_stream(
        self, body: dict[str, Any], api_key: str | None = None
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Streaming chat completion: `handle.options(stream=True).chat_stream.remote({...})` yields chunks."""
        with access_log.handle_call("chat_stream"):
            request = parse_request(ChatCompletionRequest, {**body, "stream": True})
            turn = await self._turns.chat(request, self._owner(api_key), request.session_id)
            chunks = responses.chat_chunks(turn, include_usage=_include_usage(request))
            async with turn, aclosing(chunks):
                async for chunk in chunks:
                    yield chunk.model_dump()

    async def completions(self, body: dict[str, Any], api_key: str | None = None) -> dict[str, Any]:
        with access_log.handle_call("completions"):
            self._owner(api_key)
            request = parse_request(CompletionRequest, {**body, "stream": False})
            turn = await self._turns.complete(request)
            async with turn:
                reply = await responses.completion_response(turn)
            return reply.model_dump(exclude_none=True)

    async def responses(self, body: dict[str, Any], api_key: str | None = None) -> dict[str, Any]:
        """A Responses API call without a stream: `await handle.responses.remote({...})`."""
        with access_log.handle_call("responses"):
            request = parse_request(ResponsesRequest, {**body, "stream": False})
            turn = await self._turns.respond(request, self._owner(api_key))
            async with turn:
                reply = await responses_api.ResponseBuilder(turn, request).whole()
                turn.keep(_stored(reply))
            return reply.model_dump(mode="json")

    async def responses_stream(
        self, body: dict[str, Any], api_key: str | None = None
    ) -> AsyncGenerator[dict[str, Any], None]:
        """A streamed Responses API call: `handle.options(stream=True).responses_stream.remote({...})`
        yields the events as dicts (the response is kept before the terminal event)."""
        with access_log.handle_call("responses_stream"):
            request = parse_request(ResponsesRequest, {**body, "stream": True})
            turn = await self._turns.respond(request, self._owner(api_key))
            builder = responses_api.ResponseBuilder(turn, request)
            async with aclosing(_kept_events(turn, builder)) as events:
                async for event in events:
                    yield event.model_dump(mode="json")

    async def tokenize(self, body: dict[str, Any], api_key: str | None = None) -> dict[str, Any]:
        self._owner(api_key)
        return (await self._tokenize(parse_request(TokenizeRequest, body))).model_dump()

    async def create_session(
        self, body: dict[str, Any] | None = None, api_key: str | None = None
    ) -> dict[str, Any]:
        return (await self._create_session(self._owner(api_key), body or {})).model_dump()

    async def get_session(self, session_id: str, api_key: str | None = None) -> dict[str, Any]:
        state = await self._sessions.get(self._owner(api_key), session_id)
        return session_view(state, self._model.max_model_len).model_dump()

    async def delete_session(self, session_id: str, api_key: str | None = None) -> dict[str, Any]:
        await self._sessions.delete(self._owner(api_key), session_id)
        return SessionDeleted(id=session_id).model_dump()

    # ---- shared -------------------------------------------------------------------------------------------
    def _http_owner(self, request: Request) -> str:
        # The guard hashed the key once for this request (limits.py); the owner id reuses that digest.
        digest = request.scope.get("state", {}).get(SCOPE_KEY_DIGEST)
        return self._keys.owner_of(request.headers.get("authorization"), digest=digest)

    def _owner(self, api_key: str | None) -> str:
        return self._keys.owner_of(f"Bearer {api_key}" if api_key else None)

    async def _create_session(self, owner: str, raw: Any) -> SessionView:
        body = parse_request(CreateSessionRequest, raw)
        self._model.check_name(body.model)
        state = await self._sessions.create(
            owner,
            self.model_name,
            system_prompt=body.system_prompt,
            tools=[t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
            metadata=body.metadata,
        )
        return session_view(state, self._model.max_model_len)

    async def _tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        """Any length (it is not a prompt); a long text is tokenized off the loop."""
        self._model.check_name(body.model)
        template = self._model.template
        if body.messages is not None:
            tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
            messages = [m.to_template_dict() for m in body.messages]
            tokens = await off_loop(
                sum(len(m["content"]) for m in messages),
                template.render,
                messages,
                tools=tools,
                add_generation_prompt=body.add_generation_prompt,
            )
        else:
            assert body.prompt is not None
            tokens = await off_loop(
                len(body.prompt),
                template.encode_prompt,
                body.prompt,
                add_special_tokens=body.add_special_tokens,
            )
        return TokenizeResponse(
            count=len(tokens), max_model_len=self._model.max_model_len, tokens=tokens
        )
