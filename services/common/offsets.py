"""Where a partition really ends."""

from __future__ import annotations

import time
import uuid
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from services.common.errors import FatalRuntimeError

COORDINATOR_MOVING = frozenset({KafkaError.NOT_COORDINATOR,
                                KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                                KafkaError.COORDINATOR_NOT_AVAILABLE})
"""A group coordinator not (yet) where the client asked: retry, as clients do."""


def high_watermarks(client_config: dict[str, Any], topic: str, partitions: list[int],
                    timeout: float = 30.0) -> dict[int, tuple[int, int]]:
    """(low, high) watermark of each partition, asked read_uncommitted.

    Under read_committed the broker answers with the last stable offset, which stops before a
    transaction that is still open, or that committed a moment ago (its markers are written
    after the commit returns). A reader that must see every committed record up to now reads
    read_committed until its position passes these ends.
    """
    consumer = Consumer(client_config | {
        "group.id": f"watermarks-{uuid.uuid4().hex}", "enable.auto.commit": False,
        "isolation.level": "read_uncommitted",
    })
    try:  # each partition waited for while its leader settles (a changelog just created)
        return {p: watermarks(consumer, topic, p, timeout) for p in partitions}
    finally:
        consumer.close()


_SETTLING = {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
             KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.UNKNOWN_LEADER_EPOCH,
             KafkaError._TIMED_OUT}


def watermarks(consumer: Consumer, topic: str, partition: int, timeout: float = 30.0
               ) -> tuple[int, int]:
    """``(low, high)`` of one partition, waiting up to ``timeout`` seconds while its leader
    settles (a topic created a moment ago, a leader moving)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition),
                                                       timeout=min(10.0, timeout))
            return int(low), int(high)
        except KafkaException as exc:
            if exc.args[0].code() not in _SETTLING or time.monotonic() > deadline:
                raise FatalRuntimeError(f"cannot read the offsets of {topic} [{partition}]: "
                                        f"{exc.args[0]}") from exc
            time.sleep(0.2)


def positions(consumer: Consumer, partitions: list[TopicPartition], timeout: float = 10.0
              ) -> dict[tuple[str, int], int]:
    """Where the consumer stands in each partition: its position, else (nothing fetched yet
    since the assignment) the group's committed offset, else -1."""
    if not partitions:
        return {}
    found = consumer.position(partitions)
    unknown = [tp for tp in found if tp.offset < 0]
    committed = {(tp.topic, tp.partition): tp.offset
                 for tp in (consumer.committed(unknown, timeout=timeout) if unknown else [])}
    return {(tp.topic, tp.partition): tp.offset if tp.offset >= 0
            else committed.get((tp.topic, tp.partition), -1) for tp in found}
