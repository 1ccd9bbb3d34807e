"""Decoding lookups: the checked parts lists a shard keeps stay as strict as checking anew."""

from __future__ import annotations

import numpy as np
import pytest

from recserve.contracts.errors import BadRequest
from recserve.rpc.wire import PartRequest, decode_header, decode_lookup, encode_lookup


def test_a_kept_parts_list_still_refuses_bools_and_floats_of_its_values() -> None:
    """True == 1 and 0.0 == 0: a parts list kept from a good lookup must not answer for
    one whose bags or row starts are booleans or floats of the same values."""
    frames = encode_lookup(1, None, [PartRequest("t", 0, 1)], np.array([3, 4]), np.array([2]))
    header = decode_header(frames[0])
    for _ in range(2):  # checked, then kept
        got = decode_lookup(header, frames[1:])
        assert got.parts == (PartRequest("t", 0, 1, "sum"),)
        np.testing.assert_array_equal(got.ids, [3, 4])
    for name, value in (("bags", True), ("bags", 1.0), ("row_start", False),
                        ("row_start", 0.0), ("bags", [1])):  # fmt: skip
        bad = {**header, "parts": {**header["parts"], name: [value]}}
        with pytest.raises(BadRequest) as err:
            decode_lookup(bad, frames[1:])
        assert err.value.field == f"parts.{name}[0]"


def test_lengths_are_checked_unless_the_caller_checks_them() -> None:
    frames = encode_lookup(1, None, [PartRequest("t", 0, 2)], np.array([3, 4]), np.array([3, -1]))
    header = decode_header(frames[0])
    with pytest.raises(BadRequest, match="must not be negative") as err:
        decode_lookup(header, frames[1:])
    assert err.value.field == "lengths"
    got = decode_lookup(header, frames[1:], check_lengths=False)  # a shard's compiled pass
    np.testing.assert_array_equal(got.lengths, [3, -1])
