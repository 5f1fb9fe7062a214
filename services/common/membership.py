"""The partitions a consumer group member owns, kept by the rebalance callbacks.

librdkafka calls back inside ``consume``/``poll``, on the loop's thread. The owner's hooks run
while the partitions are still its own: ``assigned`` before any record of them is handed out
(restore state, seek), ``released`` before they go (commit what was processed while the
member may; or, when ``lost``, drop it: the group moved on and a commit would be fenced).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from confluent_kafka import Consumer, TopicPartition

log = logging.getLogger(__name__)

Partition = tuple[str, int]


class Membership:
    def __init__(
        self, *,
        assigned: Callable[[Consumer, list[TopicPartition]], None] | None = None,
        released: Callable[[Consumer, list[TopicPartition], bool], None] | None = None,
        changed: Callable[[], None] | None = None,
    ) -> None:
        self._assigned, self._released, self._changed = assigned, released, changed
        self.owned: set[Partition] = set()
        self.settled = False
        """False from the start, and from a revoke until the assignment that follows."""

    def subscribe(self, consumer: Consumer, topics: list[str]) -> None:
        consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                           on_lost=self._on_lost)

    def partitions(self, topic: str | None = None) -> list[TopicPartition]:
        """The owned partitions (of ``topic``), in order."""
        return [TopicPartition(t, p) for t, p in sorted(self.owned) if topic in (None, t)]

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._assigned is not None:
            self._assigned(consumer, partitions)
        self.owned.update((tp.topic, tp.partition) for tp in partitions)
        self.settled = True
        self._after()
        log.info("assigned %s", _fmt(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._release(consumer, partitions, lost=False)
        log.info("revoked %s", _fmt(partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._release(consumer, partitions, lost=True)
        log.warning("lost %s (session expired); uncommitted work dropped", _fmt(partitions))

    def _release(self, consumer: Consumer, partitions: list[TopicPartition], lost: bool) -> None:
        if self._released is not None:
            self._released(consumer, partitions, lost)
        self.owned -= {(tp.topic, tp.partition) for tp in partitions}
        self.settled = False
        self._after()

    def _after(self) -> None:
        if self._changed is not None:
            self._changed()


def _fmt(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"
