"""Where a partition really ends."""

from __future__ import annotations

import uuid
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from services.common.errors import FatalRuntimeError


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
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
                for p in partitions}
    except KafkaException as exc:
        raise FatalRuntimeError(f"cannot read the end offsets of {topic}: {exc.args[0]}"
                                ) from exc
    finally:
        consumer.close()
