"""The per-request processors of the transformers engine against a direct computation on logits: penalties,
logit_bias, min_tokens, grammar masks, seeded sampling and top logprobs (no model, no continuous batching:
the hooks are driven with the request states transformers would hand them)."""

from __future__ import annotations

import json
import math
import threading
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from deployments import grammars
from deployments.executors.hf_processors import (
    KWARG,
    BatchSampler,
    GrammarCompiler,
    RequestSampling,
    apply_penalties,
    sample_rows,
    unpack_bitmask,
)
from deployments.messages import GenerateRequest, SamplingParams

VOCAB = 1024


class FakeState:
    """The fields of transformers' `RequestState` the processors read."""

    def __init__(self, request_id: str, spec: RequestSampling, prompt: list[int]) -> None:
        self.request_id = request_id
        self.initial_tokens = prompt
        self.generated_tokens: list[int] = []
        self.logit_processor_kwargs = {KWARG: spec}


def step(
    sampler: BatchSampler, states: list[FakeState], logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One continuous-batching step: prepare, the hooks around (absent) warpers; returns (masked logits
    before the warpers, final scores)."""
    sampler.prepare([SimpleNamespace(state=s) for s in states])
    before = sampler.before_warpers(logits.clone())
    after = sampler.after_warpers(before.clone())
    return before, after


def spec(
    stop_token_ids: tuple[int, ...] = (),
    num_logprobs: int = -1,
    guided_decoding: Any = None,
    **sampling: Any,
) -> RequestSampling:
    return RequestSampling(
        SamplingParams(**sampling), stop_token_ids, num_logprobs, guided_decoding
    )


def direct_penalties(
    logits: list[float], prompt: list[int], output: list[int], pp: float, fp: float, rp: float
) -> list[float]:
    """OpenAI's frequency/presence formula on output tokens, and the CTRL repetition penalty on every token
    seen in the prompt or the output, one logit at a time."""
    result = []
    for token_id, logit in enumerate(logits):
        count = output.count(token_id)
        if token_id in prompt or count:
            logit = logit / rp if logit > 0 else logit * rp
        result.append(logit - count * fp - (1.0 if count else 0.0) * pp)
    return result


def test_penalties_match_the_openai_and_ctrl_formulas_row_by_row() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 12, generator=generator) * 3
    prompts = [[1, 2], [3], []]
    outputs = [[2, 2, 5], [], [7, 7, 7, 8]]
    params = [(0.5, 0.3, 1.3), (1.0, 0.0, 0.8), (-0.5, 1.5, 1.0)]
    counts = torch.zeros(3, 12)
    prompt_mask = torch.zeros(3, 12, dtype=torch.bool)
    for row in range(3):
        for token_id in outputs[row]:
            counts[row, token_id] += 1
        prompt_mask[row, prompts[row]] = True
    column = [torch.tensor([p[i] for p in params]) for i in range(3)]
    got = apply_penalties(logits, counts, prompt_mask, *column)
    for row in range(3):
        expected = direct_penalties(logits[row].tolist(), prompts[row], outputs[row], *params[row])
        assert got[row].tolist() == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_the_bitmask_unpacks_bit_j_of_word_i_to_token_32i_plus_j() -> None:
    allowed = {0, 5, 31, 32, 63, 70}
    words = [0, 0, 0]
    for token_id in allowed:
        words[token_id // 32] |= 1 << (token_id % 32)
    # int32 words: bit 31 is the sign bit.
    signed = [w - (1 << 32) if w >= 1 << 31 else w for w in words]
    mask = unpack_bitmask(torch.tensor([signed], dtype=torch.int32), 71)
    assert set(mask[0].nonzero().flatten().tolist()) == allowed


def test_a_seeded_row_draws_the_same_tokens_whatever_shares_its_batch() -> None:
    probs = torch.softmax(torch.randn(1, 50, generator=torch.Generator().manual_seed(3)), -1)

    def draws(batch_rows: int, seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        others = torch.softmax(torch.randn(batch_rows, 50), -1)
        batch = torch.cat([others, probs])
        tokens = []
        for _ in range(30):
            tokens.append(int(sample_rows(batch, [None] * batch_rows + [generator])[-1]))
        return tokens

    assert draws(0, 11) == draws(5, 11) == draws(2, 11)
    assert draws(0, 11) != draws(0, 12)


def test_the_exponential_race_samples_from_the_distribution() -> None:
    torch.manual_seed(0)
    probs = torch.tensor([[0.1, 0.6, 0.3]]).repeat(6000, 1)
    tokens = sample_rows(probs, [None] * 6000)
    frequencies = torch.bincount(tokens, minlength=3).float() / 6000
    assert frequencies.tolist() == pytest.approx([0.1, 0.6, 0.3], abs=0.03)


def test_logit_bias_min_tokens_and_penalties_together_match_the_direct_computation() -> None:
    sampler = BatchSampler(16, None)
    logits = torch.randn(2, 16, generator=torch.Generator().manual_seed(1)) * 2
    first = FakeState(
        "a",
        spec(logit_bias=((3, 5.0), (4, -100.0)), min_tokens=3, stop_token_ids=(0, 9)),
        prompt=[1, 2],
    )
    second = FakeState(
        "b", spec(presence_penalty=0.7, frequency_penalty=0.2, repetition_penalty=1.5), [6]
    )
    first.generated_tokens = [2]
    second.generated_tokens = [6, 6, 11]
    before, _ = step(sampler, [first, second], logits)

    expected_a = logits[0].clone()
    expected_a[3] += 5.0
    expected_a[4] -= 100.0
    expected_a[[0, 9]] = -math.inf  # one token generated, three required
    expected_b = torch.tensor(direct_penalties(logits[1].tolist(), [6], [6, 6, 11], 0.7, 0.2, 1.5))
    assert before[0].tolist() == pytest.approx(expected_a.tolist())
    assert before[1].tolist() == pytest.approx(expected_b.tolist(), rel=1e-6)

    # Once min_tokens are out, the stop tokens come back; the counts follow every new token.
    first.generated_tokens = [2, 5, 5]
    second.generated_tokens = [6, 6, 11, 11]
    before, _ = step(sampler, [first, second], logits)
    assert before[0, 0] == logits[0, 0] and before[0, 9] == logits[0, 9]
    expected_b = torch.tensor(
        direct_penalties(logits[1].tolist(), [6], [6, 6, 11, 11], 0.7, 0.2, 1.5)
    )
    assert before[1].tolist() == pytest.approx(expected_b.tolist(), rel=1e-6)


def test_rows_without_a_spec_are_left_alone() -> None:
    sampler = BatchSampler(8, None)
    logits = torch.randn(3, 8)
    plain = FakeState("plain", spec(), [1])
    plain.logit_processor_kwargs = {}
    biased = FakeState("biased", spec(logit_bias=((2, 1.0),)), [1])
    before, after = step(sampler, [plain, biased, plain], logits)
    assert torch.equal(after[0], logits[0]) and torch.equal(after[2], logits[2])
    assert after[1, 2] == logits[1, 2] + 1.0


def test_top_logprobs_are_the_models_own_most_likely_tokens_in_order() -> None:
    sampler = BatchSampler(32, None)
    logits = torch.randn(2, 32, generator=torch.Generator().manual_seed(5))
    state = FakeState("r", spec(num_logprobs=5, presence_penalty=1.0), [0])
    other = FakeState("o", spec(seed=3), [0])
    _, after = step(sampler, [other, state], logits)
    [output] = sampler.take_outputs("r")
    expected = torch.log_softmax(logits[1], -1)  # before the penalty: the model's distribution
    chosen = int(after[1].argmax())
    assert after[1].isfinite().sum() == 1  # one-hot: transformers' sampler takes this token
    assert output.logprob == pytest.approx(float(expected[chosen]))
    top_ids = [token_id for token_id, _ in output.top]
    assert top_ids == expected.topk(5).indices.tolist()
    values = [logprob for _, logprob in output.top]
    assert values == sorted(values, reverse=True)
    assert sampler.take_outputs("o") == []  # no logprobs asked for


def test_a_seeded_request_samples_the_same_tokens_alone_and_in_a_batch() -> None:
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))

    def seeded_tokens(seed: int, *, has_company: bool) -> list[int]:
        sampler = BatchSampler(64, None)
        seeded = FakeState("seeded", spec(seed=seed), [0])
        company = [FakeState("plain", spec(), [0]), FakeState("other", spec(seed=99), [0])]
        company[0].logit_processor_kwargs = {}
        states = [*company, seeded] if has_company else [seeded]
        rows = logits[[0, 1, 3]] if has_company else logits[[3]]
        tokens = []
        for _ in range(12):
            _, after = step(sampler, states, rows)
            tokens.append(int(after[-1].argmax()))
            for state, row_scores in zip(states, after, strict=True):
                state.generated_tokens.append(int(row_scores.argmax()))
        return tokens

    alone = seeded_tokens(7, has_company=False)
    assert seeded_tokens(7, has_company=True) == alone
    assert seeded_tokens(8, has_company=False) != alone


@pytest.fixture(scope="module")
def compiler(tokenizer: Any) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, len(tokenizer))


def test_a_guided_row_may_only_take_what_the_grammar_allows(
    compiler: GrammarCompiler, tokenizer: Any
) -> None:
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    guided = spec(guided_decoding=grammars.json_schema_spec(schema), stop_token_ids=(end_id,))
    sampler = BatchSampler(compiler.vocab_size, compiler)
    state = FakeState("g", guided, [0])
    torch.manual_seed(0)
    for _ in range(40):
        logits = torch.randn(1, compiler.vocab_size)
        before, _ = step(sampler, [state], logits)
        allowed = before[0].isfinite().nonzero().flatten().tolist()
        token_id = allowed[int(torch.randint(len(allowed), ()))]
        if token_id == end_id:
            break
        state.generated_tokens.append(token_id)
    else:
        pytest.fail("the grammar never allowed the end of the turn")
    text = tokenizer.decode(state.generated_tokens)
    assert json.loads(text) in ({"ok": True}, {"ok": False})
    assert sampler.take_error("g") is None


def test_the_mask_fills_while_the_forward_pass_runs_and_is_whole_when_used(
    compiler: GrammarCompiler, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    started, release = threading.Event(), threading.Event()
    fill_threads: list[str] = []
    fill = compiler.fill_bitmask

    def held_fill(matchers: list[Any], bitmask: torch.Tensor) -> None:
        fill_threads.append(threading.current_thread().name)
        started.set()
        assert release.wait(10)
        fill(matchers, bitmask)

    monkeypatch.setattr(compiler, "fill_bitmask", held_fill)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    guided = spec(guided_decoding=grammars.json_schema_spec(schema), stop_token_ids=(2,))
    reference = compiler.matcher(guided.guided_decoding)

    def reference_allowed() -> list[int]:
        bitmask = torch.empty((1, (compiler.vocab_size + 31) // 32), dtype=torch.int32)
        fill([reference], bitmask)
        allowed = unpack_bitmask(bitmask, compiler.vocab_size)[0]
        allowed[compiler.eos_token_id] = False  # the request ends with its own stop ids
        return allowed.nonzero().flatten().tolist()

    sampler = BatchSampler(compiler.vocab_size, compiler)
    state = FakeState("g", guided, [0])
    sampler.prepare([SimpleNamespace(state=state)])  # returns while the fill is held: no waiting
    assert started.wait(10)
    assert fill_threads == [fill_threads[0]] and fill_threads[0].startswith("shepherd-grammar")
    release.set()
    before = sampler.before_warpers(torch.zeros(1, compiler.vocab_size))
    allowed = before[0].isfinite().nonzero().flatten().tolist()
    assert allowed == reference_allowed()
    sampler.after_warpers(before)
    # A step whose hooks never ran: the next prepare advances the matcher only after that fill is done.
    state.generated_tokens.append(allowed[0])
    reference.consume_tokens([allowed[0]])
    sampler.prepare([SimpleNamespace(state=state)])
    sampler.prepare([SimpleNamespace(state=state)])
    before = sampler.before_warpers(torch.zeros(1, compiler.vocab_size))
    assert before[0].isfinite().nonzero().flatten().tolist() == reference_allowed()
    assert sampler.take_error("g") is None


def test_a_grammar_that_does_not_compile_fails_the_request_and_lets_it_end(
    compiler: GrammarCompiler,
) -> None:
    sampler = BatchSampler(compiler.vocab_size, compiler)
    bad = spec(guided_decoding=grammars.lark_spec("start: nowhere"), stop_token_ids=(2,))
    before, _ = step(sampler, [FakeState("bad", bad, [0])], torch.randn(1, compiler.vocab_size))
    assert "does not compile" in (sampler.take_error("bad") or "")
    assert before[0].isfinite().nonzero().flatten().tolist() == [2]


def test_grammars_are_compiled_once_per_spec(compiler: GrammarCompiler) -> None:
    schema = grammars.json_schema_spec({"type": "object", "properties": {"n": {"type": "integer"}}})
    before = compiler.num_compiled
    first, second = compiler.matcher(schema), compiler.matcher(schema)
    assert compiler.num_compiled == before + 1 and first is not second


def test_only_requests_that_need_the_processors_carry_a_spec() -> None:
    def of(**fields: Any) -> RequestSampling | None:
        sampling = fields.pop("sampling", SamplingParams())
        return RequestSampling.of(GenerateRequest("r", [1], 4, sampling, end_id=2, **fields))

    assert of() is None
    assert of(sampling=SamplingParams(temperature=0.5, top_k=3)) is None
    assert of(sampling=SamplingParams(seed=1)) == RequestSampling(
        SamplingParams(seed=1), stop_token_ids=(2,)
    )
    assert of(return_logprobs=True, num_top_logprobs=2).num_logprobs == 2  # type: ignore[union-attr]
    assert of(return_logprobs=True).num_logprobs == 0  # type: ignore[union-attr]
