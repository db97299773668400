"""Guided decoding on TensorRT-LLM, against the doubles: the 1.2 C++ Executor's `GuidedDecodingConfig`
(xgrammar over the tokenizer's vocabulary) and per-request `GuidedDecodingParams`, and the PyTorch
backend's `LLM(guided_decoding_backend=...)` with `SamplingParams(guided_decoding=...)`.

Names and checks as read in TensorRT-LLM: nanobind/executor/{executorConfig,request}.cpp,
executor/guided{DecodingConfig,DecodingParams}.cpp, batch_manager/guidedDecoder.cpp,
tensorrt_llm/sampling_params.py (`_get_guided_decoding_params`), llmapi/tokenizer.py
(`_xgrammar_tokenizer_info`), _torch/pyexecutor/{py_executor_creator,grammar_matcher}.py.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from typing import Any

import pytest

from deployments import grammars
from deployments.config import TrtllmConfig
from deployments.errors import ServingError
from deployments.executors.trtllm import TrtllmExecutor, build_guided_decoding_config
from deployments.executors.trtllm_config import resolve_guided_backend
from deployments.executors.trtllm_llmapi import TrtllmLlmApiExecutor, build_sampling_params
from deployments.executors.trtllm_requests import build_guided_decoding_params
from deployments.messages import FinishReason, GenerateRequest, GuidedDecodingSpec, SamplingParams
from tests import trtllm_support as support

tle: Any = importlib.import_module("tensorrt_llm.bindings.executor")
llmapi: Any = importlib.import_module("tensorrt_llm.llmapi")
SCHEMA = grammars.json_schema_spec({"type": "object", "properties": {"a": {"type": "integer"}}})
SPECS = [
    grammars.json_object_spec(),
    SCHEMA,
    grammars.regex_spec("(yes|no)"),
    grammars.lark_spec('start: "a" | "b"'),
]


def with_tokenizer(directory: Path, model_dir: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, directory / name)
    return directory


def guided(spec: GuidedDecodingSpec | None, **fields: Any) -> GenerateRequest:
    fields.setdefault("end_id", 2)
    sampling = SamplingParams(temperature=0)
    return GenerateRequest("g", [11, 12, 13], 6, sampling, guided_decoding=spec, **fields)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
def test_both_executors_send_the_same_guide_for_each_kind(spec: GuidedDecodingSpec) -> None:
    support.require_double("compares the two bindings' objects")
    from_executor = build_guided_decoding_params(tle, spec)
    from_llm_api = build_sampling_params(llmapi, guided(spec))._get_guided_decoding_params()
    assert from_executor == from_llm_api
    expected = {"json_object": "JSON", "json_schema": "JSON_SCHEMA", "regex": "REGEX"}
    assert from_executor.guide_type.name == expected.get(spec.kind, "EBNF_GRAMMAR")
    assert from_executor.guide == (None if spec.kind == "json_object" else spec.grammar)
    assert build_guided_decoding_params(tle, None) is None


def test_the_bindings_refuse_a_guide_missing_where_one_is_needed() -> None:
    with pytest.raises(RuntimeError, match="guide string must be provided"):
        tle.GuidedDecodingParams(tle.GuidedDecodingParams.GuideType.REGEX)
    with pytest.raises(ValueError, match="Only one guide"):
        llmapi.SamplingParams(
            guided_decoding=llmapi.GuidedDecodingParams(regex="a", json_object=True)
        )


def test_the_grammar_backend_follows_the_engine_and_the_tokenizer(
    tmp_path: Path, model_dir: Path
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    tokenized = with_tokenizer(tmp_path, model_dir)
    auto = TrtllmConfig()
    assert resolve_guided_backend(auto, "pytorch", tokenized) == "llguidance"
    assert resolve_guided_backend(auto, "tensorrt", tokenized) == "xgrammar"
    assert resolve_guided_backend(auto, "pytorch", bare) is None
    assert (
        resolve_guided_backend(TrtllmConfig(guided_decoding_backend="none"), "pytorch", tokenized)
        is None
    )
    with pytest.raises(ValueError, match="PyTorch backend only"):
        resolve_guided_backend(TrtllmConfig(guided_decoding_backend="llguidance"), "tensorrt", bare)


def test_the_cpp_runtime_refuses_llguidance_and_xgrammar_without_a_vocabulary(
    tmp_path: Path,
) -> None:
    support.require_double("constructs executors with a bad guided decoding config")
    engine_dir = support.write_double_engine(tmp_path / "engine")
    backend = tle.GuidedDecodingConfig.GuidedDecodingBackend
    for config, message in (
        (tle.GuidedDecodingConfig(backend.LLGUIDANCE, tokenizer_str="{}"), "LLGuidance is not"),
        (tle.GuidedDecodingConfig(backend.XGRAMMAR), "EncodedVocab is not set"),
    ):
        executor_config = tle.ExecutorConfig(1, guided_decoding_config=config)
        with pytest.raises(RuntimeError, match=message):
            tle.Executor(str(engine_dir), tle.ModelType.DECODER_ONLY, executor_config)


def test_the_guided_decoding_config_is_xgrammar_over_the_vocabulary_in_id_order(
    tmp_path: Path, model_dir: Path, tokenizer: Any
) -> None:
    config = build_guided_decoding_config(tle, str(with_tokenizer(tmp_path, model_dir)))
    vocab = tokenizer.get_vocab()
    assert config.backend is tle.GuidedDecodingConfig.GuidedDecodingBackend.XGRAMMAR
    assert config.encoded_vocab == sorted(vocab, key=vocab.__getitem__)
    assert config.stop_token_ids == [tokenizer.eos_token_id]
    assert config.tokenizer_str == tokenizer.backend_tokenizer.to_str()


def test_a_trtllm_build_engine_receives_each_requests_guide(
    tmp_path: Path, model_dir: Path, tokenizer: Any
) -> None:
    engine_dir = support.engine_dir_or_skip(tmp_path, vocab_size=len(tokenizer))
    config = TrtllmConfig(
        engine_dir=str(engine_dir),
        tokenizer_dir=str(with_tokenizer(tmp_path, model_dir)),
        stats_period_s=0.02,
    )
    executor = TrtllmExecutor(config)
    sent: list[Any] = []

    async def scenario() -> list[Any]:
        await executor.start()
        spy = support.EngineSpy(executor._engine)
        real_enqueue = executor._engine.enqueue_request

        def enqueue(request: Any) -> int:
            sent.append(request.guided_decoding_params)
            return int(real_enqueue(request))

        spy.enqueue_request = enqueue  # type: ignore[method-assign]
        executor._engine = spy
        try:
            return await support.collect(executor, guided(SCHEMA, end_id=None))
        finally:
            await executor.shutdown()

    deltas = support.run(scenario())
    assert deltas[-1].finish_reason is FinishReason.LENGTH
    assert executor.capabilities.guided_decoding_kinds == ("json_object", "json_schema", "regex")
    assert [(p.guide_type.name, p.guide) for p in sent] == [("JSON_SCHEMA", SCHEMA.grammar)]


def test_the_pytorch_backend_guides_with_llguidance_and_fails_a_bad_grammar_alone(
    tmp_path: Path, model_dir: Path, tokenizer: Any
) -> None:
    support.require_double("reads the LLM double's guided decoding config")
    checkpoint = support.write_double_checkpoint(tmp_path / "ckpt", vocab_size=len(tokenizer))
    with_tokenizer(checkpoint, model_dir)
    executor = TrtllmLlmApiExecutor(
        TrtllmConfig(backend="pytorch", stats_period_s=0.02), str(checkpoint)
    )

    async def scenario() -> tuple[list[Any], BaseException | None, bool]:
        await executor.start()
        error: BaseException | None = None
        try:
            good = await support.collect(executor, guided(SCHEMA, end_id=None))
            try:
                await support.collect(executor, guided(grammars.lark_spec("start: nowhere")))
            except ServingError as failed:
                error = failed
            return good, error, executor.is_dead
        finally:
            await executor.shutdown()

    good, error, was_dead = support.run(scenario())
    assert good[-1].finish_reason is FinishReason.LENGTH
    assert error is not None and "LLGuidance matcher error" in str(error)
    assert executor.capabilities.guided_decoding_kinds == (
        "json_object",
        "json_schema",
        "regex",
        "lark",
    )
    llm = executor._llm
    assert llm.guided_decoding_backend == "llguidance" and llm.tokenizer is not None
    assert not was_dead  # one bad guide fails its request, not the replica


def test_the_llm_api_needs_the_tokenizer_for_guided_decoding(tmp_path: Path) -> None:
    support.require_double("constructs an LLM that the real one refuses in its worker")
    checkpoint = support.write_double_checkpoint(tmp_path / "ckpt")
    with pytest.raises(AssertionError):
        llmapi.LLM(str(checkpoint), skip_tokenizer_init=True, guided_decoding_backend="xgrammar")
    with pytest.raises(ValueError, match="guided_decoding_backend"):
        llmapi.LLM(str(checkpoint), skip_tokenizer_init=True, guided_decoding_backend="outlines")
