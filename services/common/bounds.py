"""Bounded runs (replays, ``runtime.bounds``): each input partition processed over
``[start, end)`` offsets, and a loop that knows when it is done.

A partition without a committed offset starts at its start; a record at or past its end is
skipped and its partition paused; the run is finished once every partition is there. With
``shared_bounds`` (a replay's workers) a member is done once the partitions it owns are there,
and whoever runs the members checks that the group's offsets reached the ends.
"""

from __future__ import annotations

import logging
from typing import cast

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka import Message as KafkaMessage

from services.common.offsets import positions

log = logging.getLogger(__name__)

Partition = tuple[str, int]


class Bounds:
    def __init__(self, bounds: dict[str, dict[int, tuple[int, int]]], topics: list[str],
                 *, shared: bool) -> None:
        self.ends = {(topic, p): end for topic in topics
                     for p, (_, end) in bounds.get(topic, {}).items()}
        self.starts = {(topic, p): start for topic in topics
                       for p, (start, _) in bounds.get(topic, {}).items()}
        self.shared = shared

    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions without a committed offset start at their bound's start; every assigned
        partition is fetched again.

        librdkafka keeps a partition's pause across a revoke: one this member paused at its
        end and gets back after another member took it meanwhile would never be fetched
        again, nor its position move past the markers to its end.
        """
        committed = consumer.committed(partitions, timeout=10)
        fresh = {(tp.topic, tp.partition) for tp in committed if tp.offset < 0}
        if fresh:
            for tp in partitions:
                if (tp.topic, tp.partition) in fresh:
                    # A partition the bounds do not list starts anywhere: nothing to do there.
                    tp.offset = self.starts.get((tp.topic, tp.partition), 0)
            consumer.assign(partitions)
            log.info("starting at %s", ", ".join(
                f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in partitions))
        consumer.resume(partitions)

    def beyond_end(self, consumer: Consumer, msg: KafkaMessage) -> bool:
        """A record at or past its partition's end: not processed, and the partition paused,
        so the consumer stops fetching what the run will never take."""
        topic, partition = cast(str, msg.topic()), cast(int, msg.partition())
        if cast(int, msg.offset()) < self.ends.get((topic, partition), 0):
            return False
        consumer.pause([TopicPartition(topic, partition)])
        return True

    def reached(self, consumer: Consumer, owned: set[Partition], *, settled: bool) -> bool:
        """Every input partition with something to process is owned and processed to its end
        (or the group's committed offset is there already). With shared bounds, only the
        partitions owned, and not while between a revoke and the next assignment
        (``settled`` false): a member owning nothing then is not done."""
        todo = {k: end for k, end in self.ends.items() if end > self.starts.get(k, 0)}
        if self.shared:  # the other members see to the rest
            if not settled:
                return False
            todo = {k: end for k, end in todo.items() if k in owned}
        if set(todo) - owned:
            return False
        at = positions(consumer, [TopicPartition(t, p) for t, p in todo])
        return all(offset >= self.ends[key] for key, offset in at.items())
