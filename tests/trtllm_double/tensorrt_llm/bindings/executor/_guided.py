"""`GuidedDecodingConfig` and `GuidedDecodingParams` of the 1.2 bindings.

Signatures from nanobind/executor/executorConfig.cpp@c40f1157 (`GuidedDecodingConfig(backend, encoded_vocab=None,
tokenizer_str=None, stop_token_ids=None)`, backend enum XGRAMMAR / LLGUIDANCE, read-write properties)
and nanobind/executor/request.cpp@ac456dca (`GuidedDecodingParams(guide_type, guide=None)`, GuideType
JSON / JSON_SCHEMA / REGEX / EBNF_GRAMMAR / STRUCTURAL_TAG, read-only properties). Checks from
executor/guidedDecodingParams.cpp (a guide is required unless the type is JSON), guidedDecodingConfig.cpp
(`validate`: xgrammar needs the encoded vocabulary) and batch_manager/guidedDecoder.cpp (the C++ runtime
refuses LLGUIDANCE). The double records what it is given; it does not constrain its "model".
"""

from __future__ import annotations

import enum
from typing import Any

_ASSERT = "[TensorRT-LLM][ERROR] Assertion failed: "


class _GuidedDecodingBackend(enum.Enum):
    XGRAMMAR = 0
    LLGUIDANCE = 1


class GuidedDecodingConfig:
    GuidedDecodingBackend = _GuidedDecodingBackend

    def __init__(
        self,
        backend: _GuidedDecodingBackend,
        encoded_vocab: list[str] | None = None,
        tokenizer_str: str | None = None,
        stop_token_ids: list[int] | None = None,
    ) -> None:
        if not isinstance(backend, _GuidedDecodingBackend):
            raise TypeError(f"__init__(): incompatible function arguments (backend={backend!r})")
        self.backend = backend
        self.encoded_vocab = None if encoded_vocab is None else list(encoded_vocab)
        self.tokenizer_str = tokenizer_str
        self.stop_token_ids = None if stop_token_ids is None else list(stop_token_ids)

    def validate(self) -> None:
        """guidedDecodingConfig.cpp (called when the executor is created)."""
        if self.backend is _GuidedDecodingBackend.XGRAMMAR and self.encoded_vocab is None:
            raise RuntimeError(
                _ASSERT + "Guided decoding is enabled with xgrammar, but EncodedVocab is not set"
            )

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.backend, self.encoded_vocab, self.tokenizer_str, self.stop_token_ids)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        if len(state) != 4:
            raise RuntimeError("Invalid GuidedDecodingConfig state!")
        self.__init__(*state)  # type: ignore[misc]


def check_cpp_runtime(config: GuidedDecodingConfig) -> None:
    """`GuidedDecoder`'s constructor on the C++ (TensorRT engine) runtime."""
    config.validate()
    if config.backend is _GuidedDecodingBackend.LLGUIDANCE:
        raise RuntimeError(
            _ASSERT + "LLGuidance is not supported for guided decoding in C++ runtime."
        )


class _GuideType(enum.Enum):
    JSON = 0
    JSON_SCHEMA = 1
    REGEX = 2
    EBNF_GRAMMAR = 3
    STRUCTURAL_TAG = 4


class GuidedDecodingParams:
    GuideType = _GuideType

    def __init__(self, guide_type: _GuideType, guide: str | None = None) -> None:
        if not isinstance(guide_type, _GuideType) or not isinstance(guide, str | None):
            raise TypeError(
                "__init__(): incompatible function arguments. The following argument types are "
                "supported:\n    1. __init__(self, guide_type: GuidedDecodingParams.GuideType, "
                "guide: str | None = None) -> None"
            )
        if guide_type is not _GuideType.JSON and guide is None:
            raise RuntimeError(
                _ASSERT + "The guide string must be provided unless using GuideType::kJSON."
            )
        self._guide_type = guide_type
        self._guide = guide

    @property
    def guide_type(self) -> _GuideType:
        return self._guide_type

    @property
    def guide(self) -> str | None:
        return self._guide

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, GuidedDecodingParams)
            and other.guide_type is self.guide_type
            and other.guide == self.guide
        )

    def __hash__(self) -> int:
        return hash((self._guide_type, self._guide))

    def __getstate__(self) -> tuple[Any, ...]:
        return (self._guide_type, self._guide)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        if len(state) != 2:
            raise RuntimeError("Invalid GuidedDecodingParams state!")
        self.__init__(*state)  # type: ignore[misc]
