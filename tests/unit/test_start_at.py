"""``--since`` as a Kafka timestamp: whole milliseconds exactly, never the one before."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.replay.run import epoch_ms as _epoch_ms

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def test_a_whole_millisecond_is_itself() -> None:
    # One of the values ``int(at.timestamp() * 1000)`` turns into the millisecond before.
    at = EPOCH + timedelta(milliseconds=2183226373411)
    assert int(at.timestamp() * 1000) == 2183226373410
    assert _epoch_ms(at) == 2183226373411


def test_part_of_a_millisecond_starts_at_the_next() -> None:
    assert _epoch_ms(EPOCH + timedelta(milliseconds=5, microseconds=1)) == 6
    assert _epoch_ms(EPOCH + timedelta(milliseconds=5)) == 5


def test_a_naive_time_is_local_time_as_timestamp_reads_it() -> None:
    naive = datetime(2026, 11, 29, 12, 0, 0)
    assert _epoch_ms(naive) == round(naive.timestamp() * 1000)
