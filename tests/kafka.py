"""Helpers for integration tests against a real broker: topics, producing, reading back."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from services.common.offsets import watermarks
from services.common.produce import produce_when_room

_COORDINATOR_MOVING = {KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                       KafkaError.COORDINATOR_NOT_AVAILABLE}


@dataclass(frozen=True)
class Broker:
    bootstrap: str
    auth: dict[str, Any] = field(default_factory=dict, repr=False)
    """librdkafka security properties (a SASL broker's admin), for every client here."""

    def conf(self, **props: Any) -> dict[str, Any]:
        return {"bootstrap.servers": self.bootstrap} | self.auth | props

    def admin(self) -> AdminClient:
        return AdminClient(self.conf())

    def create_topics(self, names: Iterable[str], partitions: int = 3) -> None:
        admin = self.admin()  # must outlive its futures
        futures = admin.create_topics([NewTopic(n, partitions, 1) for n in names])
        for fut in futures.values():
            fut.result()

    def produce(
        self, topic: str, records: Iterable[tuple[bytes | None, bytes | None]],
        headers: list[tuple[str, bytes]] | None = None,
    ) -> int:
        """Produce (key, value) pairs and wait until all are acknowledged."""
        producer = Producer(self.conf(**{"linger.ms": 5}))
        errors: list[KafkaError] = []

        def report(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                errors.append(err)

        n = 0
        for key, value in records:
            produce_when_room(producer, topic, value, key, headers=headers, on_delivery=report)
            n += 1
        assert producer.flush(60) == 0, "records left unacknowledged"
        assert not errors, errors
        return n

    def end_offsets(self, topic: str, isolation: str = "read_committed") -> dict[int, int]:
        consumer = Consumer(self.conf(**{"group.id": "offsets-probe",
                                         "isolation.level": isolation}))
        try:
            md = consumer.list_topics(topic, timeout=10)
            # A topic created a moment ago may not have its leaders yet: wait, as clients do.
            return {p: watermarks(consumer, topic, p)[1] for p in md.topics[topic].partitions}
        finally:
            consumer.close()

    def read_all(
        self, topic: str, *, isolation: str = "read_committed", timeout: float = 60,
        start: dict[int, int] | None = None,
    ) -> list[Message]:
        """Every record of ``topic`` (from ``start``, an offset per partition) up to the end
        offsets as of now (for read_committed: the last stable offset, so a transaction still
        open is not waited for)."""
        ends = self.end_offsets(topic, isolation)
        first = {p: (start or {}).get(p, 0) for p in ends}
        consumer = Consumer(self.conf(**{
            "group.id": "reader", "isolation.level": isolation, "enable.auto.commit": False,
            "enable.partition.eof": True,
        }))
        consumer.assign([TopicPartition(topic, p, first[p]) for p in ends])
        out: list[Message] = []
        done = {p for p, end in ends.items() if end <= first[p]}
        deadline = time.monotonic() + timeout
        try:
            while len(done) < len(ends):
                assert time.monotonic() < deadline, f"reading {topic} timed out"
                for msg in consumer.consume(1000, 0.5):
                    err = msg.error()
                    if err is not None:
                        assert err.code() == KafkaError._PARTITION_EOF, err
                        if msg.offset() >= ends[msg.partition()]:
                            done.add(msg.partition())
                        continue
                    out.append(msg)
                    if msg.offset() + 1 >= ends[msg.partition()]:
                        done.add(msg.partition())
        finally:
            consumer.close()
        return out

    def committed(self, group: str, topic: str) -> dict[int, int]:
        """Committed offset per partition; 0 where the group committed nothing yet. Offsets sent
        in a transaction not yet committed do not count (a read_committed probe would instead
        wait for that transaction, which never ends while its producer is frozen)."""
        consumer = Consumer(self.conf(**{"group.id": group,
                                         "isolation.level": "read_uncommitted"}))
        try:
            md = consumer.list_topics(topic, timeout=10)
            tps = [TopicPartition(topic, p) for p in md.topics[topic].partitions]
            deadline = time.monotonic() + 60
            while True:
                try:
                    found = consumer.committed(tps, timeout=10)
                    return {tp.partition: max(0, tp.offset) for tp in found}
                except KafkaException as exc:
                    # On a broker just started the group coordinator may still be loading.
                    if exc.args[0].code() not in _COORDINATOR_MOVING or \
                            time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        finally:
            consumer.close()

    def left(self, group: str, topic: str) -> int:
        """Committed records of ``topic`` after ``group``'s committed offsets: its input left.
        Records, not offsets: transaction markers take offsets too."""
        return len(self.read_all(topic, start=self.committed(group, topic)))

    def aborted(self, topic: str) -> int:
        """Records of aborted transactions: in the log, invisible to read_committed."""
        return len(self.read_all(topic, isolation="read_uncommitted")) - len(self.read_all(topic))


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
