"""Token id lists as compact JSON strings: base64 of little-endian int32s, for frames and stored sessions.

A session's prompt grows with its history, and every turn writes it to the session store and sends it to an
Engine replica. As a JSON list of numbers, a 6,000-token prompt costs about 1 ms to encode and as much to
decode, each time, on the Router's event loop; packed, a fifth of that to encode and under half to decode.
Ids that do not fit an int32 (never a real vocabulary's, but a client may send one) stay a plain list, which
`unpack_token_ids` also reads, so rows and frames written before packing still load.
"""

from __future__ import annotations

import base64
import binascii
import struct
import sys
from array import array
from collections.abc import Sequence

_INT32 = "i"
assert array(_INT32).itemsize == 4, "a C int of 4 bytes"
_IS_BIG_ENDIAN = sys.byteorder == "big"


def pack_token_ids(token_ids: Sequence[int]) -> str | list[int]:
    """`token_ids` as base64 of little-endian int32s; as a plain list when one does not fit an int32."""
    try:
        data = struct.pack(f"<{len(token_ids)}i", *token_ids)
    except struct.error:
        return list(token_ids)
    return base64.b64encode(data).decode("ascii")


def unpack_token_ids(value: object) -> list[int]:
    """The ids `pack_token_ids` packed, or a plain list of ints as it is.

    Raises:
        ValueError: for anything else (not base64, not whole int32s, not a list).
    """
    if isinstance(value, list):
        return value
    if not isinstance(value, str):
        raise ValueError(f"token ids are a list or a packed string, not {type(value).__name__}")
    try:
        data = base64.b64decode(value, validate=True)
    except binascii.Error as error:
        raise ValueError(f"packed token ids are not base64: {error}") from None
    if len(data) % 4:
        raise ValueError(f"packed token ids of {len(data)} bytes are not whole int32s")
    packed = array(_INT32)
    packed.frombytes(data)
    if _IS_BIG_ENDIAN:
        packed.byteswap()
    return packed.tolist()
