"""Per-request sampling inside transformers' continuous batching: grammar masks (llguidance), `min_tokens`,
`logit_bias`, presence/frequency/repetition penalties, seeded sampling and top logprobs, on the whole batch.

Continuous batching (transformers 5.24, `generation/continuous_batching/`) runs a list of logits processors
over the batch's logits, one row per request that gets a token this step; a `ContinuousBatchingLogitsProcessor`
is told which requests those rows are (`prepare_tensor_args`, before the forward pass) and may read each
request's `logit_processor_kwargs`. `BatchSampler.attach` puts two hooks into that list, around transformers'
own temperature, top-k and top-p processors, so the order is vLLM's (`vllm/v1/sample/sampler.py`):
  1) before them: the grammar mask, then a copy of the logprobs (what `logprobs` report: the model's
     distribution over what the grammar allows), then `min_tokens`, `logit_bias` and the penalties;
  2) after them: rows with a seed or with logprobs are sampled here, by the exponential race vLLM uses
     (argmax of p / q with q ~ Exp(1), q drawn from the request's own generator when it has a seed, so its
     tokens do not depend on the other requests in the batch), and their row is made one-hot so that
     transformers' sampler takes that token.
The tensor work is one batched operation per feature; Python loops once per request per step only to read
the new tokens, which transformers' scheduler hands over as a Python list anyway. Grammar masks are filled
for all rows at once by llguidance's thread pool (`fill_next_token_bitmask_par`, without the GIL), started
in `prepare` so that it runs while the forward pass does: a mask depends only on the tokens already sampled,
and where a step is short (a small model on a GPU) filling it afterwards, in series, cost a quarter of the
guided throughput at c=64 (benchmarks/README.md, guided decoding).

Threading: `prepare`/the hooks run on transformers' generation thread; `release`, `take_outputs` and
`take_error` are called from the event loop (a lock guards what both sides touch).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from deployments.grammars import to_llguidance
from deployments.messages import GenerateRequest, GuidedDecodingSpec, SamplingParams

if TYPE_CHECKING:
    from transformers.generation.continuous_batching.requests import RequestState

logger = logging.getLogger(__name__)

# The `add_request` keyword that carries a request's RequestSampling to the processors.
KWARG = "shepherd_sampling"
_NEG_INF = float("-inf")


@dataclass(frozen=True, slots=True)
class RequestSampling:
    """What one request asks of the processors. It travels in transformers' `logit_processor_kwargs`, which
    tensor-parallel ranks receive pickled with the request, so it holds plain data only."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    # Tokens that end the request: masked before `min_tokens`, allowed once a grammar may end.
    stop_token_ids: tuple[int, ...] = ()
    # -1: no logprobs; 0: the sampled token's; k > 0: and the k most likely tokens.
    num_logprobs: int = -1
    guided_decoding: GuidedDecodingSpec | None = None

    @classmethod
    def of(cls, request: GenerateRequest) -> RequestSampling | None:
        """None when the request needs nothing beyond temperature, top-k and top-p."""
        stop_token_ids = tuple(seq[0] for seq in request.stop_token_sequences if len(seq) == 1)
        if request.end_id is not None:
            stop_token_ids = (request.end_id, *stop_token_ids)
        spec = cls(
            sampling=request.sampling,
            stop_token_ids=stop_token_ids,
            num_logprobs=request.num_top_logprobs if request.return_logprobs else -1,
            guided_decoding=request.guided_decoding,
        )
        return spec if spec.is_needed else None

    @property
    def is_needed(self) -> bool:
        sampling = self.sampling
        return (
            sampling.seed is not None
            or self.has_penalties
            or sampling.min_tokens > 0
            or bool(sampling.logit_bias)
            or self.num_logprobs >= 0
            or self.guided_decoding is not None
        )

    @property
    def has_penalties(self) -> bool:
        sampling = self.sampling
        return (
            sampling.presence_penalty != 0.0
            or sampling.frequency_penalty != 0.0
            or sampling.repetition_penalty != 1.0
        )

    @property
    def is_sampled_here(self) -> bool:
        """The post hook samples this row itself (its own generator, or logprobs of the sampled token)."""
        return self.sampling.seed is not None or self.num_logprobs >= 0


# ---- the math, on rows of logits (unit-tested against a direct computation) ---------------------------
def apply_penalties(
    logits: torch.Tensor,
    output_counts: torch.Tensor,
    prompt_mask: torch.Tensor | None,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    repetition: torch.Tensor,
) -> torch.Tensor:
    """vLLM's `apply_penalties` (`vllm/model_executor/layers/utils.py`): the repetition penalty divides the
    positive logits and multiplies the negative ones of every token seen in the prompt or the output; the
    frequency penalty subtracts `count * frequency`, the presence penalty `presence` once, for output tokens
    (OpenAI's definition). `output_counts` is [rows, vocab]; the per-row parameters are [rows]."""
    is_output = output_counts > 0
    seen = is_output if prompt_mask is None else is_output | prompt_mask
    penalty = torch.where(seen, repetition.unsqueeze(1), torch.ones_like(logits))
    logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits = logits - frequency.unsqueeze(1) * output_counts
    return logits - presence.unsqueeze(1) * is_output.to(logits.dtype)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """llguidance's int32 bitmask [rows, ceil(vocab / 32)] (bit j of word i: token 32 i + j) -> bool mask."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def sample_rows(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row by the exponential race (argmax of p / q, q ~ Exp(1)): a sample from p. A row with
    a generator draws its q from it alone, so its tokens depend on its seed, never on the batch."""
    q = torch.empty_like(probs)
    unseeded = [row for row, generator in enumerate(generators) if generator is None]
    if len(unseeded) == len(generators):
        q.exponential_()
    else:
        # Each draw costs a pass over the vocabulary: a row is drawn once, from its generator or the global one.
        for row, generator in enumerate(generators):
            if generator is not None:
                q[row].exponential_(generator=generator)
        if unseeded:
            q[unseeded] = probs.new_empty(len(unseeded), probs.shape[1]).exponential_()
    return (probs / q).argmax(dim=-1)


# ---- grammars -----------------------------------------------------------------------------------------
class GrammarCompiler:
    """llguidance matchers for guided-decoding specs. Each distinct spec is parsed once into a template
    matcher (an LRU of `max_entries`); each request gets a copy of it.

    Args:
        tokenizer: the model's fast Hugging Face tokenizer.
        vocab_size: the width of the model's logits (may exceed the tokenizer's vocabulary).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, *, max_entries: int = 256) -> None:
        import llguidance
        import llguidance.hf

        self._llguidance = llguidance
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.eos_token_id = int(self._tokenizer.eos_token)
        self.vocab_size = vocab_size
        self._templates: collections.OrderedDict[GuidedDecodingSpec, Any] = (
            collections.OrderedDict()
        )
        self._max_entries = max_entries
        self._executor = llguidance.LLExecutor()
        # One thread that only waits on llguidance's pool (which releases the GIL), so that the
        # generation thread can launch the forward pass meanwhile.
        self._filler = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="shepherd-grammar"
        )
        self.num_compiled = 0
        self.num_cached = 0

    def matcher(self, spec: GuidedDecodingSpec) -> Any:
        """A fresh matcher for `spec`. Raises ValueError when the grammar does not compile."""
        template = self._templates.get(spec)
        if template is not None:
            self._templates.move_to_end(spec)
            self.num_cached += 1
            return template.deep_copy()
        template = self._llguidance.LLMatcher(self._tokenizer, to_llguidance(spec))
        if template.is_error():
            raise ValueError(template.get_error())
        self.num_compiled += 1
        self._templates[spec] = template
        if len(self._templates) > self._max_entries:
            self._templates.popitem(last=False)
        return template.deep_copy()

    def fill_bitmask(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        """Each matcher's allowed tokens into its row of `bitmask` (int32, CPU, contiguous), in parallel.

        What `llguidance.torch.fill_next_token_bitmask_par` does, without importing `llguidance.torch`,
        whose import compiles a kernel with `torch.compile` (seconds, on the generation thread)."""
        assert bitmask.dtype == torch.int32 and bitmask.is_contiguous() and not bitmask.is_cuda
        batch_size, num_words = bitmask.shape
        self._executor.unsafe_compute_mask_ptr(
            [(matcher, row) for row, matcher in enumerate(matchers)],
            bitmask.data_ptr(),
            num_words * 4,
            batch_size,
        )

    def start_fill(
        self, matchers: list[Any], bitmask: torch.Tensor
    ) -> concurrent.futures.Future[None]:
        """`fill_bitmask` on another thread; the matchers must not change until the future is done."""
        return self._filler.submit(self.fill_bitmask, matchers, bitmask)


# ---- per request and per step state -------------------------------------------------------------------
@dataclass(slots=True)
class _Entry:
    request_id: str
    spec: RequestSampling
    state: weakref.ref[Any]
    num_seen: int = 0
    counts: torch.Tensor | None = None  # [vocab] occurrences in the output (penalties)
    prompt_mask: torch.Tensor | None = None  # [vocab] tokens of the prompt (repetition penalty)
    bias_ids: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    stop_ids: torch.Tensor | None = None
    generator: torch.Generator | None = None
    matcher: Any = None
    error: str | None = None


@dataclass(slots=True)
class _Batch:
    """What `prepare` found for this step's rows; consumed by the two hooks."""

    rows: list[int] = field(default_factory=list)
    entries: list[_Entry] = field(default_factory=list)
    guided: list[int] = field(default_factory=list)  # positions in `entries`
    min_tokens: list[int] = field(default_factory=list)
    biased: list[int] = field(default_factory=list)
    penalized: list[int] = field(default_factory=list)
    sampled: list[int] = field(default_factory=list)
    with_logprobs: list[int] = field(default_factory=list)
    logprobs: torch.Tensor | None = None  # [len(with_logprobs), vocab]
    # The grammar rows being filled while the forward pass runs: positions in `guided`, their bitmask.
    filling: list[int] = field(default_factory=list)
    filled: torch.Tensor | None = None


@dataclass(frozen=True, slots=True)
class StepOutput:
    """One generated token's logprob and the most likely alternatives, most likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...]


def _generated_tokens(state: RequestState) -> list[int]:
    """Every token generated so far: a request that transformers re-prefilled after offloading its cache
    carries its earlier tokens at the end of its prompt (`create_equivalent_initial_request`)."""
    true_prompt_len = getattr(state, "_true_initial_tokens", 0)
    if true_prompt_len:
        return list(state.initial_tokens[true_prompt_len:]) + list(state.generated_tokens)
    return list(state.generated_tokens)


def _prompt_tokens(state: RequestState) -> list[int]:
    true_prompt_len = getattr(state, "_true_initial_tokens", 0)
    return list(state.initial_tokens[:true_prompt_len] if true_prompt_len else state.initial_tokens)


class BatchSampler:
    """The processors' state across steps (one per continuous-batching manager); see the module docstring.

    Args:
        vocab_size: the width of the model's logits.
        grammars: compiles guided-decoding specs; None where the tokenizer could not be read (then a
            guided request fails, which the router prevents by not announcing the capability).
        device: where the logits live (penalty counts are kept there).
    """

    def __init__(
        self, vocab_size: int, grammars: GrammarCompiler | None, device: str = "cpu"
    ) -> None:
        self.vocab_size = vocab_size
        self._grammars = grammars
        self._device = torch.device(device)
        self._entries: dict[str, _Entry] = {}
        self._batch: _Batch | None = None
        self._fill: concurrent.futures.Future[None] | None = None
        self._lock = threading.Lock()
        self._released: collections.deque[str] = collections.deque()
        self._outputs: dict[str, list[StepOutput]] = {}
        self._errors: dict[str, str] = {}
        self._num_steps = 0

    # ---- wiring -------------------------------------------------------------------------------------
    def attach(self, processors: Any) -> None:
        """Puts the hooks into a `ContinuousBatchingLogitsProcessorList`, before the manager starts (its
        argument storage is sized from `tensors_required` when the generation thread begins)."""
        from transformers.generation.continuous_batching.cb_logits_processors import (
            ContinuousBatchingLogitsProcessor,
        )

        sampler = self

        class _BeforeWarpers(ContinuousBatchingLogitsProcessor):
            supported_kwargs: dict[str, type] = {KWARG: RequestSampling}
            ignored_kwargs: tuple[str, ...] = ()

            def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
                int32_tensor.fill_(-1)

            def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
                return sampler.prepare(requests_with_new_token)

            def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
                return sampler.before_warpers(scores)

        class _AfterWarpers:
            supports_continuous_batching = True

            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                return sampler.after_warpers(scores)

        processors.logits_processor.insert(0, _BeforeWarpers())
        processors.logits_processor.append(_AfterWarpers())
        processors.tensors_required += 1
        processors.supported_keys[KWARG] = RequestSampling
        processors.do_processing = True

    @property
    def has_grammars(self) -> bool:
        return self._grammars is not None

    # ---- from the event loop --------------------------------------------------------------------------
    def release(self, request_id: str) -> None:
        """The request ended (finished or cancelled): its state goes at the next step."""
        self._released.append(request_id)

    def take_outputs(self, request_id: str) -> list[StepOutput]:
        with self._lock:
            return self._outputs.pop(request_id, [])

    def take_error(self, request_id: str) -> str | None:
        with self._lock:
            return self._errors.pop(request_id, None)

    # ---- on the generation thread -----------------------------------------------------------------------
    def prepare(self, requests: list[Any]) -> torch.Tensor:
        """Before the forward pass: reads each row's new tokens, decides what each row needs and starts
        filling the grammar masks."""
        self._settle_fill()  # a step whose hooks did not run may have left one; matchers change below
        self._forget_released()
        batch = _Batch()
        for row, future in enumerate(requests):
            state = future.state
            spec = state.logit_processor_kwargs.get(KWARG)
            if spec is None:
                continue
            entry = self._entries.get(state.request_id)
            if entry is None or entry.state() is None:
                entry = self._register(state, spec)
            entry.state = weakref.ref(state)
            generated = _generated_tokens(state)
            new_token_ids = generated[entry.num_seen :]
            entry.num_seen = len(generated)
            self._advance(entry, new_token_ids)
            position = len(batch.entries)
            batch.rows.append(row)
            batch.entries.append(entry)
            is_stopped = entry.matcher is not None and entry.matcher.is_stopped()
            if entry.matcher is not None or entry.error is not None:
                batch.guided.append(position)
            if entry.num_seen < spec.sampling.min_tokens and spec.stop_token_ids and not is_stopped:
                batch.min_tokens.append(position)
            if spec.sampling.logit_bias:
                batch.biased.append(position)
            if spec.has_penalties:
                batch.penalized.append(position)
            if spec.is_sampled_here:
                batch.sampled.append(position)
            if spec.num_logprobs >= 0:
                batch.with_logprobs.append(position)
        self._batch = batch if batch.rows else None
        if batch.guided and self._grammars is not None:
            self._start_fill(batch, self._grammars)
        self._num_steps += 1
        if self._num_steps % 256 == 0:
            self._forget_dead()
        return torch.full((len(requests),), -1, dtype=torch.int32)

    def before_warpers(self, scores: torch.Tensor) -> torch.Tensor:
        batch = self._batch
        if batch is None:
            return scores
        device = scores.device
        rows = torch.tensor(batch.rows, dtype=torch.long, device=device)
        logits = scores.index_select(0, rows)
        # 1) What the grammar allows (a row whose grammar failed may only end).
        if batch.guided:
            allowed = self._allowed_tokens(batch, logits.shape[1], device)
            positions = torch.tensor(batch.guided, dtype=torch.long, device=device)
            logits[positions] = logits[positions].masked_fill(~allowed, _NEG_INF)
        # 2) The logprobs the request sees: the model's distribution within the grammar.
        if batch.with_logprobs:
            positions = torch.tensor(batch.with_logprobs, dtype=torch.long, device=device)
            batch.logprobs = torch.log_softmax(logits[positions], dim=-1)
        # 3) No end before min_tokens.
        if batch.min_tokens:
            entries = [batch.entries[p] for p in batch.min_tokens]
            row_ids, token_ids = _flat_index(batch.min_tokens, [e.stop_ids for e in entries])
            logits.index_put_((row_ids.to(device), token_ids.to(device)), _scalar(_NEG_INF, logits))
        # 4) logit_bias.
        if batch.biased:
            entries = [batch.entries[p] for p in batch.biased]
            row_ids, token_ids = _flat_index(batch.biased, [e.bias_ids for e in entries])
            values = torch.cat([e.bias_values for e in entries if e.bias_values is not None])
            logits.index_put_(
                (row_ids.to(device), token_ids.to(device)), values.to(device), accumulate=True
            )
        # 5) Presence, frequency and repetition penalties.
        if batch.penalized:
            logits = self._penalize(batch, logits)
        return scores.index_copy(0, rows, logits)

    def after_warpers(self, scores: torch.Tensor) -> torch.Tensor:
        batch, self._batch = self._batch, None
        if batch is None or not batch.sampled:
            return scores
        device = scores.device
        rows = torch.tensor([batch.rows[p] for p in batch.sampled], dtype=torch.long, device=device)
        probs = torch.softmax(scores.index_select(0, rows), dim=-1)
        generators = [batch.entries[p].generator for p in batch.sampled]
        token_ids = sample_rows(probs, generators)
        one_hot = torch.full_like(probs, _NEG_INF)
        one_hot.scatter_(1, token_ids.unsqueeze(1), 0.0)
        if batch.with_logprobs:
            self._record_logprobs(batch, token_ids)
        return scores.index_copy(0, rows, one_hot)

    # ---- helpers --------------------------------------------------------------------------------------
    def _start_fill(self, batch: _Batch, grammars: GrammarCompiler) -> None:
        batch.filling = [
            i
            for i, p in enumerate(batch.guided)
            if batch.entries[p].error is None and batch.entries[p].matcher is not None
        ]
        if not batch.filling:
            return
        words = (self.vocab_size + 31) // 32
        batch.filled = torch.empty((len(batch.filling), words), dtype=torch.int32)
        matchers = [batch.entries[batch.guided[i]].matcher for i in batch.filling]
        self._fill = grammars.start_fill(matchers, batch.filled)

    def _settle_fill(self) -> None:
        fill, self._fill = self._fill, None
        if fill is not None:
            fill.result()

    def _register(self, state: Any, spec: RequestSampling) -> _Entry:
        request_id = state.request_id
        entry = _Entry(request_id, spec, weakref.ref(state))
        if spec.has_penalties:
            entry.counts = torch.zeros(self.vocab_size, device=self._device)
            if spec.sampling.repetition_penalty != 1.0:
                prompt = [t for t in _prompt_tokens(state) if 0 <= t < self.vocab_size]
                mask = torch.zeros(self.vocab_size, dtype=torch.bool)
                mask[prompt] = True
                entry.prompt_mask = mask.to(self._device)
        if spec.sampling.logit_bias:
            pairs = [(t, b) for t, b in spec.sampling.logit_bias if 0 <= t < self.vocab_size]
            entry.bias_ids = torch.tensor([t for t, _ in pairs], dtype=torch.long)
            entry.bias_values = torch.tensor([b for _, b in pairs], dtype=torch.float32)
        if spec.stop_token_ids:
            entry.stop_ids = torch.tensor(spec.stop_token_ids, dtype=torch.long)
        if spec.sampling.seed is not None:
            entry.generator = torch.Generator(device=self._device)
            entry.generator.manual_seed(spec.sampling.seed)
        if spec.guided_decoding is not None:
            try:
                if self._grammars is None:
                    raise ValueError("this engine has no tokenizer for guided decoding")
                entry.matcher = self._grammars.matcher(spec.guided_decoding)
            except ValueError as error:
                self._fail(entry, f"the grammar does not compile: {error}")
        self._entries[request_id] = entry
        return entry

    def _advance(self, entry: _Entry, new_token_ids: list[int]) -> None:
        if not new_token_ids:
            return
        if entry.counts is not None:
            for token_id in new_token_ids:
                if 0 <= token_id < self.vocab_size:
                    entry.counts[token_id] += 1
        matcher = entry.matcher
        if matcher is not None and entry.error is None and not matcher.is_stopped():
            if not matcher.consume_tokens(new_token_ids):
                self._fail(entry, f"the grammar rejected a token: {matcher.get_error()}")

    def _fail(self, entry: _Entry, message: str) -> None:
        """The request is ended by its stop tokens at once; the executor fails it with `message`."""
        logger.error("guided decoding failed for request_id=%s: %s", entry.request_id, message)
        entry.error = message
        with self._lock:
            self._errors[entry.request_id] = message

    def _allowed_tokens(self, batch: _Batch, vocab_size: int, device: torch.device) -> torch.Tensor:
        """[guided rows, vocab] bool: llguidance fills the bitmask on the host; it is unpacked and adjusted
        where the logits are (a bitmask is 32 times smaller than the mask)."""
        entries = [batch.entries[p] for p in batch.guided]
        grammars = self._grammars
        bitmask = torch.zeros((len(entries), (vocab_size + 31) // 32), dtype=torch.int32)
        self._settle_fill()
        if batch.filled is not None:
            words = min(bitmask.shape[1], batch.filled.shape[1])
            bitmask[batch.filling, :words] = batch.filled[:, :words]
        allowed = unpack_bitmask(bitmask.to(device), vocab_size)
        # llguidance allows the tokenizer's EOS where the grammar may end; a request ends with its own stop
        # tokens instead (a chat turn's end-of-turn token, say), and a failed grammar may only end.
        eos = grammars.eos_token_id if grammars is not None else None
        cleared: list[int] = []
        ends: list[tuple[int, torch.Tensor]] = []
        for i, entry in enumerate(entries):
            if eos is not None and eos not in entry.spec.stop_token_ids:
                cleared.append(i)
            may_end = entry.error is not None or entry.matcher.is_accepting()
            if may_end and entry.stop_ids is not None:
                ends.append((i, entry.stop_ids))
        if cleared and eos is not None:
            allowed[torch.tensor(cleared, device=device), eos] = False
        if ends:
            row_ids, token_ids = _flat_index([i for i, _ in ends], [ids for _, ids in ends])
            allowed[row_ids.to(device), token_ids.to(device)] = True
        for i, has_any in enumerate(allowed.any(dim=1).tolist()):
            if has_any:
                continue
            if entries[i].error is None:
                self._fail(
                    entries[i], "the grammar allows no token and the request has no stop token"
                )
            allowed[i] = True  # nothing can end it: the executor cancels it on the error
        return allowed

    def _penalize(self, batch: _Batch, logits: torch.Tensor) -> torch.Tensor:
        device = logits.device
        entries = [batch.entries[p] for p in batch.penalized]
        positions = torch.tensor(batch.penalized, dtype=torch.long, device=device)
        counts = torch.stack([e.counts for e in entries if e.counts is not None]).to(device)
        if any(e.prompt_mask is not None for e in entries):
            empty = torch.zeros(self.vocab_size, dtype=torch.bool, device=self._device)
            prompt_mask: torch.Tensor | None = torch.stack(
                [e.prompt_mask if e.prompt_mask is not None else empty for e in entries]
            ).to(device)
        else:
            prompt_mask = None

        def column(name: str) -> torch.Tensor:
            values = [getattr(e.spec.sampling, name) for e in entries]
            return torch.tensor(values, dtype=logits.dtype, device=device)

        width = counts.shape[1]
        penalized = apply_penalties(
            logits[positions, :width],
            counts,
            prompt_mask,
            column("presence_penalty"),
            column("frequency_penalty"),
            column("repetition_penalty"),
        )
        logits[positions, :width] = penalized
        return logits

    def _record_logprobs(self, batch: _Batch, token_ids: torch.Tensor) -> None:
        assert batch.logprobs is not None
        sampled_position = {p: i for i, p in enumerate(batch.sampled)}
        chosen = token_ids[[sampled_position[p] for p in batch.with_logprobs]]
        logprobs = batch.logprobs
        chosen_logprobs = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
        num_top = max(batch.entries[p].spec.num_logprobs for p in batch.with_logprobs)
        top_values: list[list[float]] = []
        top_ids: list[list[int]] = []
        if num_top > 0:
            top = logprobs.topk(min(num_top, logprobs.shape[1]), dim=-1)
            top_values, top_ids = top.values.tolist(), top.indices.tolist()
        with self._lock:
            for i, position in enumerate(batch.with_logprobs):
                entry = batch.entries[position]
                k = entry.spec.num_logprobs
                pairs = tuple(zip(top_ids[i][:k], top_values[i][:k], strict=True)) if k else ()
                outputs = self._outputs.setdefault(entry.request_id, [])
                outputs.append(StepOutput(chosen_logprobs[i], pairs))

    def _forget_released(self) -> None:
        while self._released:
            request_id = self._released.popleft()
            self._entries.pop(request_id, None)
            with self._lock:
                self._outputs.pop(request_id, None)
                self._errors.pop(request_id, None)

    def _forget_dead(self) -> None:
        """A safety net for requests whose end the executor never reported (another process's ranks)."""
        for request_id in [r for r, e in self._entries.items() if e.state() is None]:
            del self._entries[request_id]


def _flat_index(
    positions: list[int], token_ids: list[torch.Tensor | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index pairs for `index_put_`: each position repeated once per token of its row."""
    present = [ids if ids is not None else torch.empty(0, dtype=torch.long) for ids in token_ids]
    counts = torch.tensor([len(ids) for ids in present], dtype=torch.long)
    rows = torch.repeat_interleave(torch.tensor(positions, dtype=torch.long), counts)
    return rows, torch.cat(present)


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=like.dtype, device=like.device)
