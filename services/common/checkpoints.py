"""Following the ``checkpoints`` topic: what generators reload from and the filter measures
staleness against."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Protocol

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from pydantic import ValidationError

from schemas import CheckpointEvent
from services.common.config import KafkaSettings
from services.common.errors import FatalRuntimeError
from services.common.offsets import high_watermarks

log = logging.getLogger(__name__)


class Listener(Protocol):
    def offer(self, event: CheckpointEvent) -> None:
        """Called from the follower's thread for every valid event, in topic order."""


class LatestPromoted:
    """The newest promoted version per model: the filter's reference for staleness."""

    def __init__(self) -> None:
        self._versions: dict[str, int] = {}
        self._lock = threading.Lock()

    def offer(self, event: CheckpointEvent) -> None:
        if event.status != "promoted":
            return
        with self._lock:
            if event.version > self._versions.get(event.model, -1):
                self._versions[event.model] = event.version

    def get(self, model: str) -> int | None:
        with self._lock:
            return self._versions.get(model)


class CheckpointFollower:
    """Reads the whole ``checkpoints`` topic and keeps following it, offering every event."""

    def __init__(self, kafka: KafkaSettings, topic: str, listener: Listener,
                 on_invalid: Callable[[], None] | None = None) -> None:
        self.topic, self.listener, self.on_invalid = topic, listener, on_invalid
        self._kafka = kafka
        self._consumer = Consumer(kafka.client_config() | {
            # Not a member of any real group: it reads everything, commits nothing.
            "group.id": f"checkpoint-follower-{uuid.uuid4().hex}",
            "enable.auto.commit": False, "isolation.level": "read_committed",
        })
        meta = self._consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            raise FatalRuntimeError(f"topic {topic!r} is not available; `flywheel topics apply`")
        self._partitions = sorted(meta.partitions)
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING)
                               for p in self._partitions])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="checkpoint-follower",
                                        daemon=True)
        self._read = threading.Condition()
        self._positions: dict[int, int] = {}
        """Per partition, the offset the following thread has read to."""
        self._ends: Consumer | None = None

    def catch_up(self, timeout: float = 60.0, *, true_end: bool = False) -> None:
        """Read up to the end of the topic as it is now (a late generator's first step).

        By default "the end" is the last stable offset: fast, and what a generator needs
        (its follower keeps reading after). ``true_end`` waits for every transaction open
        now to end, so nothing committed is missed; a trainer resuming needs that, and
        ``timeout`` must then cover the longest transaction another producer may hold."""
        if true_end:
            ends = {p: high for p, (_, high) in high_watermarks(
                self._kafka.client_config(), self.topic, self._partitions).items()}
        else:
            ends = {p: self._consumer.get_watermark_offsets(TopicPartition(self.topic, p),
                                                            timeout=10, cached=False)[1]
                    for p in self._partitions}
        deadline = time.monotonic() + timeout
        while True:
            positions = self._consumer.position([TopicPartition(self.topic, p)
                                                 for p in self._partitions])
            if all(tp.offset >= ends[tp.partition] or ends[tp.partition] == 0
                   for tp in positions):
                return
            if time.monotonic() > deadline:
                raise FatalRuntimeError(f"could not read {self.topic} to its end in time")
            self._poll_once(0.5)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self._consumer.close()
        if self._ends is not None:
            self._ends.close()

    def current(self, timeout: float) -> bool:
        """Wait until the following thread has read everything committed on the topic now
        (its last stable offsets), so a decision made before this call is known after it.
        False if that took longer than ``timeout``."""
        if self._ends is None:  # its own client: the following thread owns the other one
            self._ends = Consumer(self._kafka.client_config() | {
                "group.id": f"checkpoint-ends-{uuid.uuid4().hex}",
                "enable.auto.commit": False, "isolation.level": "read_committed"})
        ends = {p: self._ends.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10,
                                                    cached=False)[1] for p in self._partitions}
        with self._read:
            return self._read.wait_for(
                lambda: all(end == 0 or self._positions.get(p, 0) >= end
                            for p, end in ends.items()),
                timeout)

    def _follow(self) -> None:
        tps = [TopicPartition(self.topic, p) for p in self._partitions]
        while not self._stop.is_set():
            self._poll_once(0.5)
            positions = {tp.partition: tp.offset for tp in self._consumer.position(tps)}
            with self._read:
                self._positions = positions
                self._read.notify_all()

    def _poll_once(self, timeout: float) -> None:
        msg = self._consumer.poll(timeout)
        if msg is None:
            return
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("checkpoint follower: %s", err)
            return
        try:
            event = CheckpointEvent.from_bytes(msg.value() or b"")
        except ValidationError as exc:
            if self.on_invalid is not None:
                self.on_invalid()
            log.error("invalid checkpoint event at %s[%s]@%s: %s", msg.topic(), msg.partition(),
                      msg.offset(), exc.errors(include_url=False)[:3])
            return
        self.listener.offer(event)
