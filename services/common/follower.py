"""Following a topic in the background: read it from its start (or the last ``history``
records of each partition) and keep reading, handing every record to a callback.

A follower joins no consumer group and commits nothing: every process that follows a topic
(generators and the filter follow ``checkpoints``, the trainer the gate's decisions on it, the
feeder ``scored`` for its curriculum) reads all of it for itself.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka import Message as KafkaMessage

from services.common.config import KafkaSettings
from services.common.errors import FatalRuntimeError
from services.common.metrics import FOLLOWER_SKIPPED
from services.common.offsets import high_watermarks, watermarks

log = logging.getLogger(__name__)


class TopicFollower:
    """Hands every record of ``topic`` (read_committed, in order per partition) to
    ``on_record``, on its own thread once :meth:`start` is called.

    ``caught_up`` is set once it has read up to where the partitions ended when it was made.
    """

    def __init__(self, kafka: KafkaSettings, topic: str,
                 on_record: Callable[[KafkaMessage], None], *, history: int | None = None,
                 name: str = "follower") -> None:
        self.topic, self.on_record, self.name = topic, on_record, name
        self._kafka = kafka
        self._consumer = Consumer(_reader(kafka, name) | {"enable.partition.eof": True})
        meta = self._consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            raise FatalRuntimeError(f"topic {topic!r} is not available; `flywheel topics apply`")
        self.partitions = sorted(meta.partitions)
        start, self._behind = [], set()
        for p in self.partitions:
            if history is None:
                start.append(TopicPartition(topic, p, OFFSET_BEGINNING))
                self._behind.add(p)
                continue
            low, high = watermarks(self._consumer, topic, p)
            start.append(TopicPartition(topic, p, max(low, high - history)))
            if high > max(low, high - history):
                self._behind.add(p)
        self._consumer.assign(start)
        self.caught_up = threading.Event()
        if not self._behind:
            self.caught_up.set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name=name, daemon=True)
        self._read = threading.Condition()
        self._positions: dict[int, int] = {}
        """Per partition, the offset the following thread has read to."""
        self._ends: Consumer | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self._consumer.close()
        if self._ends is not None:
            self._ends.close()

    def catch_up(self, timeout: float = 60.0, *, true_end: bool = False) -> None:
        """Before :meth:`start`, on the caller's thread: read up to the end of the topic as
        it is now (a late generator's first step).

        By default "the end" is the last stable offset: fast, and enough for a follower that
        keeps reading after. ``true_end`` waits for every transaction open now to end, so
        nothing committed is missed; ``timeout`` must then cover the longest transaction
        another producer may hold."""
        if true_end:
            ends = {p: high for p, (_, high) in high_watermarks(
                self._kafka.client_config(), self.topic, self.partitions).items()}
        else:
            ends = {p: self._consumer.get_watermark_offsets(TopicPartition(self.topic, p),
                                                            timeout=10, cached=False)[1]
                    for p in self.partitions}
        deadline = time.monotonic() + timeout
        while True:
            positions = self._consumer.position([TopicPartition(self.topic, p)
                                                 for p in self.partitions])
            if all(tp.offset >= ends[tp.partition] or ends[tp.partition] == 0
                   for tp in positions):
                return
            if time.monotonic() > deadline:
                raise FatalRuntimeError(f"could not read {self.topic} to its end in time")
            self._read_some(0.5)

    def current(self, timeout: float) -> bool:
        """Wait until the following thread has read everything committed on the topic now
        (its last stable offsets), so a record committed before this call is seen after it.
        False if that took longer than ``timeout``."""
        if self._ends is None:  # its own client: the following thread owns the other one
            self._ends = Consumer(_reader(self._kafka, f"{self.name}-ends"))
        try:
            ends = {p: self._ends.get_watermark_offsets(TopicPartition(self.topic, p),
                                                        timeout=10, cached=False)[1]
                    for p in self.partitions}
        except KafkaException as exc:  # the broker away: not known to be current
            log.warning("%s: end offsets not read: %s", self.name, exc.args[0])
            return False
        with self._read:
            return self._read.wait_for(
                lambda: all(end == 0 or self._positions.get(p, 0) >= end
                            for p, end in ends.items()),
                timeout)

    def _follow(self) -> None:
        tps = [TopicPartition(self.topic, p) for p in self.partitions]
        while not self._stop.is_set():
            self._read_some(0.5)
            positions = {tp.partition: tp.offset for tp in self._consumer.position(tps)}
            with self._read:
                self._positions = positions
                self._read.notify_all()

    def _read_some(self, timeout: float) -> None:
        # poll() returns with the first record; consume() would wait out its timeout unless
        # it filled the batch. What else is fetched already comes with it.
        first = self._consumer.poll(timeout)
        if first is None:
            return
        for msg in [first, *self._consumer.consume(499, 0)]:
            err = msg.error()
            if err is None:
                try:
                    self.on_record(msg)
                except Exception as exc:  # one bad record: skipped and counted, never the end
                    FOLLOWER_SKIPPED.labels(self.name).inc()
                    log.error("%s: record %s[%s]@%s skipped: %s: %s", self.name, msg.topic(),
                              msg.partition(), msg.offset(), type(exc).__name__,
                              str(exc)[:300])
            elif err.code() == KafkaError._PARTITION_EOF:
                self._behind.discard(msg.partition())
                if not self._behind:
                    self.caught_up.set()
            else:
                log.warning("%s: %s", self.name, err)


def _reader(kafka: KafkaSettings, name: str) -> dict[str, object]:
    """A consumer that reads for itself: not a member of any real group, commits nothing."""
    return kafka.client_config() | {"group.id": f"{name}-{uuid.uuid4().hex}",
                                    "enable.auto.commit": False,
                                    "isolation.level": "read_committed"}
