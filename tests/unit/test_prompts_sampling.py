"""How requests map onto SamplingParams when the engine decodes greedily only (`transformers.sampling: greedy`)."""

from __future__ import annotations

from typing import Any

import pytest

from deployments.errors import RequestError
from deployments.prompts import PromptBuilder
from deployments.protocol import ChatCompletionRequest


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


@pytest.mark.parametrize(
    "fields", [{}, {"temperature": 0}, {"top_p": 1.0}, {"top_k": 1}, {"temperature": 0, "top_k": 0}]
)
def test_unset_or_greedy_sampling_decodes_greedily(fields: dict[str, Any]) -> None:
    sampling = PromptBuilder._greedy_only(chat(**fields))
    assert sampling.is_greedy


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"temperature": 0.7}, "temperature"), ({"top_p": 0.9}, "top_p"), ({"top_k": 40}, "top_k")],
)
def test_asking_a_greedy_only_engine_to_sample_is_a_400_naming_the_field(
    fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(RequestError) as refused:
        PromptBuilder._greedy_only(chat(**fields))
    assert refused.value.status_code == 400 and refused.value.param == param
    assert refused.value.message.startswith(f"{param}: ")
