"""Hostile records (tests/hostile.py) against each topic's message type: every one that is not
a valid message is classified ('decode' or 'schema', the dead letter's error type), never
raised as anything else. The services on the broker get them in tests/faults/."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.stage import DecodeFailure, decode
from tests import hostile


@pytest.mark.parametrize("topic", sorted(hostile.TYPES))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_invalid_record_is_classified_for_the_dead_letter_topic(
        topic: str, data: st.DataObject) -> None:
    kind, value = data.draw(hostile.hostile(topic))
    if kind == "unknown_env":  # valid: the consuming stage refuses it (tests/faults)
        decode(hostile.TYPES[topic], value)
        return
    with pytest.raises(DecodeFailure) as info:
        decode(hostile.TYPES[topic], value)
    expected = {"not_json": {"decode"}, "truncated": {"decode"}, "tombstone": {"decode"}}
    assert info.value.kind in expected.get(kind, {"decode", "schema"}), (kind, str(info.value))
    assert str(info.value)
