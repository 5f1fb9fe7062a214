"""The consume-process-produce loop every stage runs in.

One batch at a time (bounded by ``batch_max_records`` and ``batch_max_seconds``):

1. consume records from the input topics (``read_committed``: aborted output of an upstream
   stage is never seen);
2. decode each into the stage's input type; undecodable or schema-invalid records become dead
   letters;
3. ``apply_stage``: the stage's pure ``process``; records it raises on become dead letters;
4. produce outputs and dead letters.

Exactly-once (the default), in this order, per batch:
``begin_transaction`` -> produce outputs and dead letters -> ``send_offsets_to_transaction``
(next offset per input partition, with the consumer's group metadata) ->
``commit_transaction``. Outputs, dead letters and input offsets become visible together or not
at all. If the commit fails with an abortable error, the transaction is aborted and the consumer
is rewound to the batch's first offsets, so the batch is processed again. The
``transactional.id`` is stable per instance: a restarted instance calling
``init_transactions`` aborts its predecessor's open transaction and fences it.

At-least-once: an idempotent producer without transactions. A batch's input offsets are stored
(and auto-committed) only once every output and dead letter of that batch, and of every batch
before it, is acknowledged by the broker. A crash replays the uncommitted tail, so outputs may
repeat; none is lost.

Errors: a record-level failure never stops the service (the DLQ boundary). Anything else, a
fenced producer, an undeliverable output, a broker unreachable past ``broker_down_seconds``, a
missing input topic, raises :class:`FatalRuntimeError`; the service exits non-zero with the
reason logged and the uncommitted batch left to be consumed again.

Stop (SIGTERM/SIGINT or :meth:`StreamRuntime.stop`): no new batch starts; the one in flight is
committed, and if that does not finish within ``shutdown_timeout_seconds`` it is aborted.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message as KafkaMessage,
    Producer,
    TopicPartition,
)

from schemas import Message, Producer as ProducerInfo
from services.common import metrics as m
from services.common.config import ServiceSettings
from services.common.dlq import DeadLetter
from services.common.errors import FatalRuntimeError
from services.common.stage import DecodeFailure, Stage, apply_stage, decode

log = logging.getLogger(__name__)

TYPE_HEADER = "flywheel-type"


@dataclass(slots=True)
class _Acks:
    """At-least-once bookkeeping for one batch: outputs not yet acknowledged, offsets to store."""

    offsets: list[TopicPartition]
    remaining: int = 0
    error: KafkaError | None = None

    def ack(self, err: KafkaError | None, _msg: KafkaMessage) -> None:
        self.remaining -= 1
        if err is not None and self.error is None:
            self.error = err


@dataclass(slots=True)
class _Batch:
    records: list[KafkaMessage] = field(default_factory=list)
    started: float = 0.0


class StreamRuntime:
    """Runs one :class:`Stage` over ``input_topics`` until stopped. See the module docstring."""

    def __init__(
        self, settings: ServiceSettings, stage: Stage[Any], input_topics: Sequence[str],
        *, dlq_topic: str | None = None,
    ) -> None:
        if not input_topics:
            raise ValueError("a stage needs at least one input topic")
        self.settings = settings
        self.stage = stage
        self.input_topics = list(input_topics)
        self.dlq_topic = dlq_topic or settings.topic("dlq")
        self.exactly_once = settings.runtime.delivery == "exactly_once"
        self._identity = ProducerInfo(service=settings.service, instance=settings.instance_id)
        self._stop = threading.Event()
        self._alive = False
        self._assignment: set[tuple[str, int]] = set()
        self._pending = _Batch()
        self._acks: deque[_Acks] = deque()
        self._fatal: KafkaError | None = None
        self._connected = False
        self._down_since: float | None = None
        self._next_health = 0.0
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        svc = settings.service
        self._m_batch_seconds = m.BATCH_SECONDS.labels(svc)
        self._m_batch_records = m.BATCH_RECORDS.labels(svc)
        self._m_committed = m.TRANSACTIONS.labels(svc, "committed")
        self._m_aborted = m.TRANSACTIONS.labels(svc, "aborted")
        self._m_ready = m.READY.labels(svc)

    # -- state seen by /healthz and /readyz -------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def ready(self) -> bool:
        return self._alive and self._connected and bool(self._assignment)

    def stop(self) -> None:
        """Ask the loop to finish the batch in flight and return. Safe from any thread."""
        self._stop.set()

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Consume, process and produce until :meth:`stop`; raise FatalRuntimeError on failure."""
        self._open()
        try:
            while not self._stop.is_set():
                self._raise_if_fatal()
                batch = self._collect()
                if batch:
                    self._handle(batch)
                if not self.exactly_once:
                    self._store_acked_offsets()
                self._check_health()
        finally:
            self._close()

    def _open(self) -> None:
        s = self.settings
        common = s.kafka.client_config() | {"error_cb": self._on_error}
        consumer_conf = common | {
            "group.id": s.group_id,
            "client.id": f"{s.transactional_id}.consumer",
            "isolation.level": "read_committed",
            "auto.offset.reset": s.runtime.auto_offset_reset,
            "enable.auto.offset.store": False,
            "enable.auto.commit": not self.exactly_once,
            "auto.commit.interval.ms": 1000,
        }
        producer_conf = common | {
            "client.id": f"{s.transactional_id}.producer",
            "enable.idempotence": True,
            "linger.ms": 5,
        }
        if self.exactly_once:
            producer_conf |= {
                "transactional.id": s.transactional_id,
                "transaction.timeout.ms": s.runtime.transaction_timeout_ms,
                # Transactional delivery failures surface at commit; report only those.
                "delivery.report.only.error": True,
                "on_delivery": self._on_failed_delivery,
            }
        self._producer = Producer(producer_conf)
        if self.exactly_once:
            try:
                # Fences a previous incarnation with the same transactional.id and aborts the
                # transaction it left open.
                self._producer.init_transactions(s.runtime.transaction_timeout_ms / 1000)
            except KafkaException as exc:
                raise FatalRuntimeError(f"init_transactions failed: {exc.args[0]}") from exc
        self._consumer = Consumer(consumer_conf)
        self._consumer.subscribe(
            self.input_topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )
        self._alive = True
        self._connected = True
        log.info(
            "runtime started: service=%s instance=%s delivery=%s inputs=%s group=%s%s",
            s.service, s.instance_id, s.runtime.delivery, ",".join(self.input_topics),
            s.group_id, f" transactional.id={s.transactional_id}" if self.exactly_once else "",
        )

    def _collect(self) -> list[KafkaMessage]:
        """Up to ``batch_max_records`` records, waiting at most ``batch_max_seconds`` after the
        first; an empty list after a short idle wait so the loop can look at stop and health."""
        assert self._consumer is not None
        rt = self.settings.runtime
        batch = self._pending
        batch.records = []
        while len(batch.records) < rt.batch_max_records and not self._stop.is_set():
            if batch.records:
                timeout = batch.started + rt.batch_max_seconds - time.monotonic()
                if timeout <= 0:
                    break
            else:
                timeout = 0.2
            got = self._consumer.consume(
                rt.batch_max_records - len(batch.records), timeout=min(timeout, 0.2)
            )
            for msg in got:
                err = msg.error()
                if err is None:
                    if not batch.records:
                        batch.started = time.monotonic()
                    batch.records.append(msg)
                else:
                    self._on_consume_error(err)
            if not batch.records:
                break
        # on_revoke may have trimmed the list while consume() ran; this is what is still ours.
        records, batch.records = batch.records, []
        return records

    def _handle(self, records: list[KafkaMessage]) -> None:
        started = time.perf_counter()
        dead: list[DeadLetter] = []
        good: list[Message] = []
        good_src: list[KafkaMessage] = []
        model = self.stage.input_type
        for msg in records:
            try:
                good.append(decode(model, msg.value()))
                good_src.append(msg)
            except DecodeFailure as exc:
                cls = type(exc.cause).__name__ if exc.cause else "DecodeFailure"
                dead.append(_dead_letter(msg, exc.kind, cls, str(exc)))
        result = apply_stage(self.stage, good)
        for index, exc in result.failed:
            dead.append(_dead_letter(good_src[index], "stage", type(exc).__name__, str(exc)))
            log.warning(
                "stage raised on %s[%d]@%d: %s: %s", good_src[index].topic(),
                good_src[index].partition(), good_src[index].offset(), type(exc).__name__, exc,
            )
        offsets = _next_offsets(records)
        if self.exactly_once:
            if not self._transact(result.outputs, dead, offsets, records):
                return
        else:
            self._produce_acked(result.outputs, dead, offsets)
        self._count(records, result.outputs, dead)
        self._m_batch_seconds.observe(time.perf_counter() - started)
        self._m_batch_records.observe(len(records))

    # -- exactly-once -----------------------------------------------------------------------

    def _transact(
        self, outputs: list[Any], dead: list[DeadLetter], offsets: list[TopicPartition],
        records: list[KafkaMessage],
    ) -> bool:
        """One transaction for the batch; False if it was aborted and the batch rewound."""
        assert self._producer is not None and self._consumer is not None
        producer, consumer = self._producer, self._consumer
        try:
            producer.begin_transaction()
            self._produce_all(outputs, dead, None)
            group = consumer.consumer_group_metadata()
            self._bounded(lambda t: producer.send_offsets_to_transaction(offsets, group, t))
            self._bounded(producer.commit_transaction)
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.fatal() or not (err.txn_requires_abort() or err.retriable()):
                raise FatalRuntimeError(f"transaction failed: {err}") from exc
            log.warning("transaction aborted, batch will be processed again: %s", err)
            self._abort(records)
            return False
        self._m_committed.inc()
        return True

    def _bounded(self, call: Any) -> None:
        """Run a transactional call in short slices, retrying timeouts and retriable errors,
        until ``transaction_timeout_ms``, or ``shutdown_timeout_seconds`` once stop is asked.

        Short slices keep SIGTERM responsive: Python runs signal handlers only between calls.
        """
        rt = self.settings.runtime
        deadline = time.monotonic() + rt.transaction_timeout_ms / 1000
        stop_deadline: float | None = None
        while True:
            if stop_deadline is None and self._stop.is_set():
                stop_deadline = time.monotonic() + rt.shutdown_timeout_seconds
                deadline = min(deadline, stop_deadline)
            left = deadline - time.monotonic()
            try:
                call(max(0.1, min(1.0, left)))
                return
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if not err.retriable() or time.monotonic() >= deadline:
                    raise
                log.debug("transactional call retrying: %s", err)

    def _abort(self, records: list[KafkaMessage]) -> None:
        assert self._producer is not None and self._consumer is not None
        try:
            self._bounded(self._producer.abort_transaction)
        except KafkaException as exc:
            raise FatalRuntimeError(f"abort_transaction failed: {exc.args[0]}") from exc
        self._m_aborted.inc()
        self._rewind(records)

    def _rewind(self, records: list[KafkaMessage]) -> None:
        """Seek each still-assigned partition back to the batch's first offset in it."""
        assert self._consumer is not None
        first: dict[tuple[str, int], int] = {}
        for msg in records:
            first.setdefault((msg.topic(), msg.partition()), msg.offset())
        for (topic, partition), offset in first.items():
            if (topic, partition) in self._assignment:
                self._consumer.seek(TopicPartition(topic, partition, offset))

    # -- at-least-once ----------------------------------------------------------------------

    def _produce_acked(
        self, outputs: list[Any], dead: list[DeadLetter], offsets: list[TopicPartition]
    ) -> None:
        acks = _Acks(offsets, remaining=len(outputs) + len(dead))
        self._acks.append(acks)
        self._produce_all(outputs, dead, acks.ack)
        assert self._producer is not None
        self._producer.poll(0)

    def _store_acked_offsets(self) -> None:
        """Store the offsets of every leading batch whose outputs are all acknowledged."""
        assert self._consumer is not None and self._producer is not None
        self._producer.poll(0)
        while self._acks and self._acks[0].remaining <= 0:
            acks = self._acks.popleft()
            if acks.error is not None:
                raise FatalRuntimeError(f"output not delivered: {acks.error}")
            mine = [tp for tp in acks.offsets if (tp.topic, tp.partition) in self._assignment]
            if mine:
                self._consumer.store_offsets(offsets=mine)

    # -- producing --------------------------------------------------------------------------

    def _produce_all(self, outputs: Iterable[Any], dead: list[DeadLetter], on_delivery: Any) -> None:
        assert self._producer is not None
        produce = self._produce
        for out in outputs:
            value: Message = out.value
            if value.producer is None:
                value.producer = self._identity
            produce(
                out.topic, value.to_bytes(), (out.key or value.partition_key()).encode(),
                [(TYPE_HEADER, value.message_type.encode())], on_delivery,
            )
        s = self.settings
        for d in dead:
            produce(
                self.dlq_topic, d.value, d.key, d.record_headers(s.service, s.instance_id),
                on_delivery,
            )

    def _produce(
        self, topic: str, value: bytes | None, key: bytes | None,
        headers: list[tuple[str, bytes]], on_delivery: Any,
    ) -> None:
        assert self._producer is not None
        while True:
            try:
                if on_delivery is None:
                    self._producer.produce(topic, value, key, headers=headers)
                else:
                    self._producer.produce(
                        topic, value, key, headers=headers, on_delivery=on_delivery
                    )
                return
            except BufferError:
                # Local queue full: serve delivery reports until there is room.
                self._producer.poll(0.05)

    # -- callbacks from librdkafka (run inside consume/poll on this thread) -----------------

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assignment.update((tp.topic, tp.partition) for tp in partitions)
        self._m_ready.set(1 if self.ready else 0)
        log.info("assigned %s", _fmt(partitions))

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        # Records collected for a revoked partition but not yet in a transaction belong to the
        # partition's next owner, which will read them from the last committed offset.
        self._pending.records = [
            r for r in self._pending.records if (r.topic(), r.partition()) not in gone
        ]
        if not self.exactly_once and self._producer is not None:
            self._producer.flush(self.settings.runtime.shutdown_timeout_seconds)
            self._store_acked_offsets()
        self._assignment -= gone
        for topic, partition in gone:
            with contextlib.suppress(KeyError):  # no lag reported for it yet
                m.CONSUMER_LAG.remove(self.settings.service, topic, str(partition))
        self._m_ready.set(1 if self.ready else 0)
        log.info("revoked %s", _fmt(partitions))

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = err
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._connected = False
            self._down_since = self._down_since or time.monotonic()
            log.warning("all brokers down: %s", err)
        else:
            log.warning("kafka client error: %s", err)

    def _on_failed_delivery(self, err: KafkaError | None, msg: KafkaMessage) -> None:
        if err is not None:
            log.error("delivery to %s failed: %s", msg.topic(), err)

    def _on_consume_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.fatal() or err.code() in (
            KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.TOPIC_AUTHORIZATION_FAILED,
            KafkaError.GROUP_AUTHORIZATION_FAILED,
        ):
            raise FatalRuntimeError(
                f"consumer error: {err} (do the input topics exist? `flywheel topics apply`)"
            )
        log.warning("consumer error: %s", err)

    # -- health, lag, metrics ---------------------------------------------------------------

    def _raise_if_fatal(self) -> None:
        if self._fatal is not None:
            raise FatalRuntimeError(f"fatal Kafka client error: {self._fatal}")

    def _check_health(self) -> None:
        """Every ``lag_interval_seconds``: probe the broker with a metadata request, refresh
        the lag gauges, and give up once no broker answered for ``broker_down_seconds``.

        The probe goes through the producer: on the consumer's connection it would queue
        behind the fetch long-poll (``fetch.wait.max.ms``) and stall the loop.
        """
        now = time.monotonic()
        if now < self._next_health:
            return
        self._next_health = now + self.settings.runtime.lag_interval_seconds
        assert self._producer is not None
        try:
            self._producer.list_topics(self.input_topics[0], timeout=2)
        except KafkaException as exc:
            self._connected = False
            self._down_since = self._down_since or now
            log.warning("broker probe failed: %s", exc.args[0])
        else:
            self._connected, self._down_since = True, None
            self._update_lag()
        self._m_ready.set(1 if self.ready else 0)
        if self._down_since and now - self._down_since > self.settings.runtime.broker_down_seconds:
            raise FatalRuntimeError(
                f"no broker reachable for {now - self._down_since:.0f} s "
                f"({self.settings.kafka.bootstrap_servers})"
            )

    def _update_lag(self) -> None:
        """Lag = end of partition - position, from the watermarks the last fetch response
        carried (``cached=True``). An uncached query costs ~0.5 s per partition under
        read_committed in librdkafka, which would stall the loop."""
        assert self._consumer is not None
        if not self._assignment:
            return
        consumer = self._consumer
        positions = consumer.position([TopicPartition(t, p) for t, p in sorted(self._assignment)])
        unknown = [tp for tp in positions if tp.offset < 0]
        committed = {
            (tp.topic, tp.partition): tp.offset
            for tp in (consumer.committed(unknown, timeout=2) if unknown else [])
        }
        svc = self.settings.service
        for tp in positions:
            low, high = consumer.get_watermark_offsets(tp, cached=True)
            if high < 0:
                continue  # no fetch response for this partition yet
            pos = tp.offset if tp.offset >= 0 else committed.get((tp.topic, tp.partition), -1)
            if pos < 0:
                pos = low if low >= 0 else 0
            m.CONSUMER_LAG.labels(svc, tp.topic, str(tp.partition)).set(max(0, high - pos))

    def _count(
        self, records: list[KafkaMessage], outputs: list[Any], dead: list[DeadLetter]
    ) -> None:
        svc = self.settings.service
        for topic, n in Counter(r.topic() for r in records).items():
            m.RECORDS_CONSUMED.labels(svc, topic).inc(n)
        for topic, n in Counter(o.topic for o in outputs).items():
            m.RECORDS_PRODUCED.labels(svc, topic).inc(n)
        for (topic, kind), n in Counter((d.topic, d.kind) for d in dead).items():
            m.RECORDS_DEAD_LETTERED.labels(svc, topic, kind).inc(n)

    # -- shutdown ---------------------------------------------------------------------------

    def _close(self) -> None:
        self._alive = False
        self._m_ready.set(0)
        deadline = self.settings.runtime.shutdown_timeout_seconds
        if self._producer is not None:
            left = self._producer.flush(deadline)
            if left:
                log.error("%d produced records not acknowledged at shutdown", left)
            if not self.exactly_once and self._consumer is not None and not left:
                self._store_acked_offsets()
        if self._consumer is not None:
            # Leaves the group (a prompt rebalance for the others) and, at-least-once,
            # commits the stored offsets.
            self._consumer.close()
        log.info("runtime stopped: service=%s", self.settings.service)


def _dead_letter(msg: KafkaMessage, kind: str, error_class: str, message: str) -> DeadLetter:
    return DeadLetter(
        kind=kind, error_class=error_class, message=message, topic=msg.topic(),
        partition=msg.partition(), offset=msg.offset(), key=msg.key(), value=msg.value(),
        headers=list(msg.headers() or []),
    )


def _next_offsets(records: list[KafkaMessage]) -> list[TopicPartition]:
    """The offset to resume from for each partition in the batch (last offset + 1)."""
    last: dict[tuple[str, int], int] = {}
    for msg in records:
        last[(msg.topic(), msg.partition())] = msg.offset()
    return [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]


def _fmt(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"
