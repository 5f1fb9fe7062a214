"""Publishing tasks, and measuring how many are still waiting for a generator."""

from __future__ import annotations

import time
from collections.abc import Iterable

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from schemas import ProducerInfo, Task
from services.common.config import KafkaSettings
from services.common.errors import BrokerUnreachable, FatalRuntimeError
from services.common.offsets import COORDINATOR_MOVING
from services.common.produce import produce_when_room


class TaskPublisher:
    """An idempotent producer for ``Task`` records, keyed by ``task_id``."""

    def __init__(self, kafka: KafkaSettings, topic: str, identity: ProducerInfo) -> None:
        self.topic, self.identity = topic, identity
        self._producer = Producer(kafka.client_config() | {
            "enable.idempotence": True, "linger.ms": 5, "on_delivery": self._on_delivery,
            "delivery.report.only.error": True,
        })
        self._error: KafkaError | None = None

    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None and self._error is None:
            self._error = err

    def publish(self, tasks: Iterable[Task], timeout: float = 60.0) -> int:
        """Produce every task and wait until the broker acknowledged them all."""
        n = 0
        for task in tasks:
            if task.producer is None:
                task.producer = self.identity
            produce_when_room(self._producer, self.topic, task.to_bytes(), task.partition_key())
            n += 1
        left = self._producer.flush(timeout)
        if self._error is not None or left:
            raise FatalRuntimeError(
                f"publishing tasks to {self.topic} failed: {self._error or f'{left} unacked'}"
            )
        return n


_MOVING = COORDINATOR_MOVING | {KafkaError.NOT_LEADER_FOR_PARTITION,
                                KafkaError.LEADER_NOT_AVAILABLE}
_AWAY = {KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._ALL_BROKERS_DOWN,
         KafkaError._UNKNOWN_PARTITION}  # no metadata for the partition: the broker is away


class Backlog:
    """Tasks published but not yet committed by the generators' consumer group."""

    def __init__(self, kafka: KafkaSettings, topic: str, group: str) -> None:
        self.topic = topic
        # Not subscribed: this consumer only reads the group's committed offsets.
        self._consumer = Consumer(kafka.client_config() | {
            "group.id": group, "enable.auto.commit": False,
        })

    def size(self, timeout: float = 30.0) -> int:
        """The backlog now. A coordinator that is moving or still loading (a broker just
        started, a leader elected) is waited for up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._size()
            except KafkaException as exc:
                err = exc.args[0]
                away = err.code() in _AWAY
                if not (away or err.code() in _MOVING or err.retriable()):
                    raise FatalRuntimeError(
                        f"cannot measure the backlog of {self.topic}: {err}") from exc
                if time.monotonic() > deadline:
                    raise BrokerUnreachable(
                        f"cannot measure the backlog of {self.topic}: {err}") from exc
                time.sleep(0.2)

    def _size(self) -> int:
        meta = self._consumer.list_topics(self.topic, timeout=10).topics[self.topic]
        tps = [TopicPartition(self.topic, p) for p in meta.partitions]
        committed = {tp.partition: tp.offset for tp in self._consumer.committed(tps, 10)}
        total = 0
        for tp in tps:
            low, high = self._consumer.get_watermark_offsets(tp, timeout=10, cached=False)
            start = committed.get(tp.partition, -1)
            total += high - max(start, low)
        return total

    def close(self) -> None:
        self._consumer.close()
