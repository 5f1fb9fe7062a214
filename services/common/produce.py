"""Producing when librdkafka's local queue may be full."""

from __future__ import annotations

from typing import Any

from confluent_kafka import Producer


def produce_when_room(producer: Producer, topic: str, value: bytes | None,
                      key: str | bytes | None = None, **kwargs: Any) -> None:
    """``producer.produce(...)``; while the local queue is full (``BufferError``), serve
    delivery reports until there is room. ``kwargs``: ``partition``, ``headers``,
    ``on_delivery``."""
    while True:
        try:
            producer.produce(topic, value, key, **kwargs)
            return
        except BufferError:
            producer.poll(0.05)
