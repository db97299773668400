"""The Router deployment: the OpenAI-compatible HTTP ingress, and the same calls for Python handles.

No `from __future__ import annotations` here: FastAPI must resolve the `Request` annotations at runtime.
"""


import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve

from deployments import sse
from deployments.config import AppConfig
from deployments.errors import NotFoundError, RequestError, ServingError, to_error_body
from deployments.generation import Generation
from deployments.prompts import PromptBuilder
from deployments.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChunkChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    ResponseMessage,
)
from deployments.tokenization import load_tokenizer

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
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(f"the request body is not valid JSON: {error}") from None


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

    # ---- HTTP ----------------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> Response:
        return Response(status_code=200)

    @api.get("/v1/models")
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, max_model_len=self._prompts.max_model_len)])

    @api.post("/v1/chat/completions")
    async def http_chat(self, request: Request) -> Response:
        body = parse_request(ChatCompletionRequest, await read_json(request))
        return await self._respond(body, self._chat_generation, self._chat_chunks, self._chat_response)

    @api.post("/v1/completions")
    async def http_completions(self, request: Request) -> Response:
        body = parse_request(CompletionRequest, await read_json(request))
        return await self._respond(
            body, self._completion_generation, self._completion_chunks, self._completion_response
        )

    async def _respond(
        self,
        body: Any,
        start: Callable[[Any], Any],
        chunks: Callable[[Any, Generation], AsyncIterator[BaseModel]],
        whole: Callable[[Any, Generation], Any],
    ) -> Response:
        generation = await start(body)
        if not body.stream:
            return JSONResponse((await whole(body, generation)).model_dump())
        return StreamingResponse(self._sse(chunks(body, generation)), media_type="text/event-stream")

    async def _sse(self, chunks: AsyncIterator[BaseModel]) -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield sse.encode_chunk(chunk)
        except ServingError as error:
            # Headers are gone already: report in-band, then end the stream properly.
            logger.warning("stream failed: %s", error.message)
            yield sse.encode_error(to_error_body(error))
        yield sse.DONE

    # ---- the same calls through Python handles (dicts in, dicts out) ----------------------------------
    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """Non-streaming chat completion: `await handle.chat.remote({...})`."""
        request = parse_request(ChatCompletionRequest, {**body, "stream": False})
        return (await self._chat_response(request, await self._chat_generation(request))).model_dump()

    async def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Streaming chat completion: `handle.options(stream=True).chat_stream.remote({...})` yields chunks."""
        request = parse_request(ChatCompletionRequest, {**body, "stream": True})
        generation = await self._chat_generation(request)
        async for chunk in self._chat_chunks(request, generation):
            yield chunk.model_dump()

    async def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        request = parse_request(CompletionRequest, {**body, "stream": False})
        generation = await self._completion_generation(request)
        return (await self._completion_response(request, generation)).model_dump()

    # ---- chat ----------------------------------------------------------------------------------------
    async def _chat_generation(self, body: ChatCompletionRequest) -> Generation:
        self._check_model(body.model)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        prompt_token_ids = self._prompts.render_chat(body)
        return await self._start(request_id, prompt_token_ids, body)

    async def _chat_chunks(
        self, body: ChatCompletionRequest, generation: Generation
    ) -> AsyncIterator[ChatCompletionChunk]:
        request_id = generation.request.request_id

        def chunk(delta: DeltaMessage, finish: Any = None) -> ChatCompletionChunk:
            choice = ChunkChoice(delta=delta, finish_reason=finish)
            return ChatCompletionChunk(id=request_id, model=self.model_name, choices=[choice])

        yield chunk(DeltaMessage(role="assistant", content=""))
        async for event in generation.events():
            if event.text or event.finish_reason:
                yield chunk(DeltaMessage(content=event.text or None), event.finish_reason)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield ChatCompletionChunk(id=request_id, model=self.model_name, choices=[], usage=generation.usage())

    async def _chat_response(
        self, body: ChatCompletionRequest, generation: Generation
    ) -> ChatCompletionResponse:
        text, finish = await generation.collect()
        choice = ChatChoice(message=ResponseMessage(content=text), finish_reason=finish)
        return ChatCompletionResponse(
            id=generation.request.request_id, model=self.model_name, choices=[choice], usage=generation.usage()
        )

    # ---- completions ---------------------------------------------------------------------------------
    async def _completion_generation(self, body: CompletionRequest) -> Generation:
        self._check_model(body.model)
        if body.suffix is not None:
            raise RequestError("suffix is not supported", param="suffix")
        prompt_token_ids = self._prompts.encode_prompt(body.prompt)
        return await self._start(f"cmpl-{uuid.uuid4().hex}", prompt_token_ids, body)

    async def _completion_chunks(
        self, body: CompletionRequest, generation: Generation
    ) -> AsyncIterator[CompletionResponse]:
        request_id = generation.request.request_id
        if body.echo:
            text = self._prompts.decode(generation.request.prompt_token_ids)
            yield CompletionResponse(id=request_id, model=self.model_name, choices=[CompletionChoice(text=text)])
        async for event in generation.events():
            choice = CompletionChoice(text=event.text, finish_reason=event.finish_reason)
            yield CompletionResponse(id=request_id, model=self.model_name, choices=[choice])
        if body.stream_options is not None and body.stream_options.include_usage:
            yield CompletionResponse(id=request_id, model=self.model_name, choices=[], usage=generation.usage())

    async def _completion_response(self, body: CompletionRequest, generation: Generation) -> CompletionResponse:
        text, finish = await generation.collect()
        if body.echo:
            text = self._prompts.decode(generation.request.prompt_token_ids) + text
        choice = CompletionChoice(text=text, finish_reason=finish)
        return CompletionResponse(
            id=generation.request.request_id, model=self.model_name, choices=[choice], usage=generation.usage()
        )

    # ---- shared --------------------------------------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise NotFoundError(
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    async def _start(self, request_id: str, prompt_token_ids: list[int], body: Any) -> Generation:
        request = self._prompts.generate_request(request_id, prompt_token_ids, body)
        generation = Generation(self._engine, request, self._tokenizer, stop=body.stop_strings())
        await generation.start()
        return generation

