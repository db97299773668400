"""An engine that answers from a script: each prompt gets the first configured reply whose pattern it matches.

It exists for tests of everything above the engine that needs a model to say something exact (a tool call,
then an answer): the embedded model is random and never does. Never the default; `engine.kind: scripted`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

from deployments.config import ScriptedConfig
from deployments.errors import EngineError
from deployments.executors.base import Executor
from deployments.messages import FinishReason, GenerateRequest, TokenDelta

logger = logging.getLogger(__name__)


class ScriptedExecutor(Executor):
    """Decodes each prompt (the model directory's tokenizer.json), picks the first reply whose `when` matches,
    and streams its ids one per loop turn, ending with END_ID, or LENGTH at `max_tokens`.

    Threading: one task per request on the replica's loop; a cancel stops it.
    """

    def __init__(self, config: ScriptedConfig, model_dir: str) -> None:
        super().__init__()
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        self._replies = [(re.compile(reply.when), reply.text) for reply in config.replies]
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def _submit(self, request: GenerateRequest) -> None:
        prompt = self._tokenizer.decode(request.prompt_token_ids, skip_special_tokens=False)
        text = next((text for pattern, text in self._replies if pattern.search(prompt)), None)
        if text is None:
            raise EngineError("the scripted engine has no reply for this prompt")
        token_ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        task = asyncio.get_running_loop().create_task(self._stream(request, token_ids))
        self._tasks[request.request_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(request.request_id, None))

    def _cancel(self, request_id: str) -> None:
        task = self._tasks.pop(request_id, None)
        if task is not None:
            task.cancel()

    async def _stream(self, request: GenerateRequest, token_ids: list[int]) -> None:
        token_ids = token_ids[: request.max_tokens]
        is_cut = len(token_ids) == request.max_tokens
        for index, token_id in enumerate(token_ids):
            await asyncio.sleep(0)  # one token per loop turn, as a stream would arrive
            is_last = index == len(token_ids) - 1
            finish = (FinishReason.LENGTH if is_cut else FinishReason.END_ID) if is_last else None
            self.deliver(
                request.request_id,
                TokenDelta(
                    token_ids=[token_id],
                    finish_reason=finish,
                    num_prompt_tokens=len(request.prompt_token_ids) if index == 0 else 0,
                ),
            )
        if not token_ids:
            self.deliver(
                request.request_id,
                TokenDelta(
                    token_ids=[],
                    finish_reason=FinishReason.END_ID,
                    num_prompt_tokens=len(request.prompt_token_ids),
                ),
            )

    async def shutdown(self) -> None:
        await super().shutdown()
        for task in list(self._tasks.values()):
            task.cancel()
