from __future__ import annotations

import json

import pytest

from deployments.token_packing import pack_token_ids, unpack_token_ids


@pytest.mark.parametrize(
    "token_ids", [[], [0], [1, 2, 3], [2**31 - 1, -(2**31), 0, -1], list(range(5000))]
)
def test_packed_ids_unpack_to_the_same_ids(token_ids: list[int]) -> None:
    packed = pack_token_ids(token_ids)
    assert isinstance(packed, str)
    assert unpack_token_ids(json.loads(json.dumps(packed))) == token_ids


def test_ids_past_int32_stay_a_plain_list_and_still_round_trip() -> None:
    token_ids = [5, 2**31, 7]
    assert pack_token_ids(token_ids) == token_ids
    assert unpack_token_ids(pack_token_ids(token_ids)) == token_ids


def test_a_plain_list_written_before_packing_reads_as_it_is() -> None:
    assert unpack_token_ids([4, 5, 6]) == [4, 5, 6]


@pytest.mark.parametrize("bad", ["not base64!", "AAA=", 12, None])
def test_anything_else_is_a_value_error(bad: object) -> None:
    with pytest.raises(ValueError):
        unpack_token_ids(bad)
