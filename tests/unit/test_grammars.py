"""Guided-decoding specs: a forced tool call in each template family's markup always parses with that
family's tool-call parser, whatever tokens a model picks within the grammar; choices are literal; specs
that cannot be enforced say why."""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema
import pytest
import torch

from deployments import grammars
from deployments.executors.hf_processors import GrammarCompiler, unpack_bitmask
from deployments.messages import GuidedDecodingSpec
from deployments.tool_parsers import get_tool_parser
from tests.tool_definitions import SCHEMAS, TOOLS


@pytest.fixture(scope="module")
def compiler(tokenizer: Any) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, len(tokenizer))


def markers(tokenizer: Any) -> dict[str, int]:
    """The embedded tokenizer has hermes' markup as special tokens, as Qwen's and Hermes' have."""
    return {m: tokenizer.convert_tokens_to_ids(m) for m in ("<tool_call>", "</tool_call>")}


def random_walk(compiler: GrammarCompiler, spec: GuidedDecodingSpec, seed: int) -> list[int]:
    """Tokens picked uniformly among those the grammar allows, until it ends (an adversarial model)."""
    rng = random.Random(seed)
    matcher = compiler.matcher(spec)
    bitmask = torch.zeros((1, (compiler.vocab_size + 31) // 32), dtype=torch.int32)
    token_ids: list[int] = []
    while not matcher.is_stopped():
        compiler.fill_bitmask([matcher], bitmask)
        allowed = unpack_bitmask(bitmask, compiler.vocab_size)[0].nonzero().flatten().tolist()
        allowed = [t for t in allowed if t != compiler.eos_token_id]
        if not allowed or (matcher.is_accepting() and rng.random() < 0.3):
            break
        token_id = rng.choice(allowed)
        assert matcher.consume_token(token_id), matcher.get_error()
        token_ids.append(token_id)
        assert len(token_ids) < 400, "the grammar of one bounded call did not end"
    assert matcher.is_accepting()
    return token_ids


@pytest.mark.parametrize(
    ("family", "has_v11_calls"),
    [("hermes", False), ("llama3_json", False), ("mistral", False), ("mistral", True)],
)
def test_a_forced_call_always_parses_with_its_familys_parser(
    compiler: GrammarCompiler, tokenizer: Any, family: str, has_v11_calls: bool
) -> None:
    token_ids = markers(tokenizer) if family == "hermes" else {}
    spec = grammars.tool_call_spec(
        family, TOOLS, token_ids=token_ids, is_parallel=False, has_v11_calls=has_v11_calls
    )
    assert grammars.validation_error(spec) is None
    for seed in range(8):
        text = tokenizer.decode(random_walk(compiler, spec, seed), skip_special_tokens=False)
        parsed = get_tool_parser(family).parse(text)
        assert len(parsed.tool_calls) == 1 and parsed.content is None, text
        call = parsed.tool_calls[0]
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_a_named_function_allows_only_that_function(
    compiler: GrammarCompiler, tokenizer: Any
) -> None:
    spec = grammars.tool_call_spec(
        "hermes", TOOLS, token_ids=markers(tokenizer), function_name="get_time"
    )
    for seed in range(4):
        text = tokenizer.decode(random_walk(compiler, spec, seed), skip_special_tokens=False)
        assert [c.name for c in get_tool_parser("hermes").parse(text).tool_calls] == ["get_time"]
    with pytest.raises(ValueError, match="no tool named"):
        grammars.tool_call_spec("hermes", TOOLS, token_ids={}, function_name="nope")


def test_choices_are_matched_literally(compiler: GrammarCompiler, tokenizer: Any) -> None:
    choices = ["a.b", "(x|y)", "yes*", "back\\slash"]
    spec = grammars.choice_spec(choices)
    texts = {tokenizer.decode(random_walk(compiler, spec, seed)) for seed in range(20)}
    assert texts <= set(choices) and len(texts) > 1


def test_what_cannot_be_enforced_says_why() -> None:
    huge = grammars.regex_spec("a" * (grammars.MAX_GRAMMAR_CHARS + 1))
    assert "at most" in (grammars.validation_error(huge) or "")
    assert "unclosed" in (grammars.validation_error(grammars.regex_spec("(a")) or "")
    not_json = GuidedDecodingSpec("json_schema", "{nope")
    assert grammars.validation_error(not_json) is not None
    assert grammars.validation_error(grammars.lark_spec('start: "ok"')) is None
