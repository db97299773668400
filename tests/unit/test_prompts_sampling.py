"""How a request's sampling fields become SamplingParams, for an engine that samples per request and for a
greedy-only one (`engine.transformers.sampling: greedy`)."""

from __future__ import annotations

from typing import Any

import pytest

from deployments.errors import RequestError
from deployments.messages import EngineCapabilities, SamplingParams
from deployments.prompts import PromptBuilder
from deployments.protocol import ChatCompletionRequest


def sampling_of(caps: EngineCapabilities, **fields: Any) -> SamplingParams:
    builder = PromptBuilder.__new__(
        PromptBuilder
    )  # `_sampling` reads only the engine's capabilities
    builder._capabilities = caps
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )
    return builder._sampling(body)


GREEDY_ONLY = EngineCapabilities(supports_sampling=False)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"temperature": 0},
        {"temperature": 0, "top_p": 0.95},
        {"temperature": 0, "top_k": 40},
        {"top_p": 0.9},
        {"temperature": 0.7, "top_k": 1},
    ],
)
def test_a_greedy_only_engine_serves_every_request_that_decodes_greedily(
    fields: dict[str, Any],
) -> None:
    assert sampling_of(GREEDY_ONLY, **fields).is_greedy


@pytest.mark.parametrize("fields", [{"temperature": 0.7}, {"temperature": 1.0, "top_p": 0.9}])
def test_asking_a_greedy_only_engine_to_sample_is_a_400_naming_temperature(
    fields: dict[str, Any],
) -> None:
    with pytest.raises(RequestError) as refused:
        sampling_of(GREEDY_ONLY, **fields)
    assert refused.value.status_code == 400 and refused.value.param == "temperature"
    assert refused.value.message.startswith("temperature: ")


def test_an_engine_that_samples_keeps_openais_default_temperature_of_one() -> None:
    sampling = sampling_of(EngineCapabilities())
    assert sampling.temperature == 1.0 and not sampling.is_greedy
