"""The consume-process-produce loop every stage runs in.

One batch at a time (bounded by ``batch_max_records``, ``batch_max_bytes`` and
``batch_max_seconds``):

1. consume records from the input topics (``read_committed``: aborted output of an upstream
   stage is never seen);
2. prepare the batch (:mod:`services.common.batches`): decode each record into the stage's
   input type (undecodable or schema-invalid records become dead letters), run the stage's
   pure ``process`` (records it raises on become dead letters), encode the outputs;
3. produce outputs and dead letters (:mod:`services.common.outputs`), and commit.

Exactly-once (the default): one Kafka transaction per batch, in the order
:mod:`services.common.transactions` gives, committed here (:meth:`StreamRuntime._transact`).
At-least-once: an idempotent producer without transactions; a batch's offsets are stored
only once its outputs are delivered (:meth:`StreamRuntime._confirm`).

Errors: a record-level failure never stops the service (the DLQ boundary). Anything else, a
fenced producer, an undeliverable output, a broker unreachable past ``broker_down_seconds``
(:mod:`services.common.health`), a missing input, output or dead-letter topic (output topics
are checked when first used), raises :class:`FatalRuntimeError`; the service exits non-zero
with the reason logged and the uncommitted batch left to be consumed again.

State: a :class:`~services.common.stage.StatefulStage` (filter, router) is run per input
partition with that partition's state (:mod:`services.common.state`). Its changes go to the
changelog topic in the batch's transaction; its timers (``tick``) run every ``tick_seconds``
even when no input arrives, in a transaction of their own if need be. Assigned partitions are
restored from the changelog before their first record is processed, revoked ones dropped, and
after an abort every owned partition is restored again.

Bounded runs (replays, ``runtime.bounds``): see :mod:`services.common.bounds`; the loop stops
by itself, with :attr:`StreamRuntime.finished` set, once every partition is at its end.

Stop (SIGTERM/SIGINT or :meth:`StreamRuntime.stop`): no new batch starts; the one in flight is
committed within ``shutdown_timeout_seconds``. A commit that cannot finish in that time cannot
be aborted either (librdkafka keeps it in progress): the service exits non-zero, and the broker
aborts the transaction at ``transaction_timeout_ms``, or the restarted instance fences it.

Over 300 lines: the loop, its two commit paths, the rebalance hooks and the shutdown all act
on the one batch in flight (open, pending or being collected), and their order is the
guarantee; every concern that does not touch that batch is a module of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka import Message as KafkaMessage

from services.common import metrics as m
from services.common.batches import BatchProcessor, PreparedBatch, first_offsets
from services.common.bounds import Bounds
from services.common.clients import consumer_config, producer_config, transactional_producer
from services.common.config import ServiceSettings
from services.common.errors import AccessDenied, ConfigError, FatalRuntimeError, Interrupted
from services.common.health import BrokerHealth
from services.common.membership import Membership
from services.common.offsets import high_watermarks, positions
from services.common.outputs import OutputWriter
from services.common.stage import COMMIT_AT_ONCE, INTERRUPT, Stage, StatefulStage
from services.common.state import StateStore
from services.common.transactions import Transactions

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Collecting:
    """The batch being consumed; a revoke in the middle trims it."""

    records: list[KafkaMessage] = field(default_factory=list)
    started: float = 0.0


class StreamRuntime:
    """Runs one :class:`Stage` over ``input_topics`` until stopped. See the module docstring."""

    def __init__(
        self, settings: ServiceSettings, stage: Stage[Any] | StatefulStage[Any],
        input_topics: Sequence[str],
        *, dlq_topic: str | None = None,
    ) -> None:
        if not input_topics:
            raise ValueError("a stage needs at least one input topic")
        self.settings = settings
        self.stage = stage
        self._at_once = bool(getattr(stage, COMMIT_AT_ONCE, False))
        self.input_topics = list(input_topics)
        self.dlq_topic = dlq_topic or settings.topic("dlq")
        self.exactly_once = settings.runtime.delivery == "exactly_once"
        self._stop = threading.Event()
        self._alive = False
        self._members = Membership(assigned=self._on_assign, released=self._on_release,
                                   changed=self._set_ready)
        self._health = BrokerHealth(settings)
        self._collecting = _Collecting()
        self._delivery_error: KafkaError | None = None
        self._unconfirmed: list[TopicPartition] | None = None
        self._open_batch: PreparedBatch | None = None
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._writer: OutputWriter | None = None
        self._transactions: Transactions | None = None
        self._store: StateStore | None = None
        rt = settings.runtime
        self._bounds = Bounds(rt.bounds, self.input_topics, shared=rt.shared_bounds) \
            if rt.bounds is not None else None
        self.finished = False
        """Bounded (``runtime.bounds``): every partition was processed to its end."""
        self._settled = False
        """Stopped cleanly: every change to the state is committed (a local checkpoint)."""
        if isinstance(stage, StatefulStage):
            if not self.exactly_once:
                raise ConfigError(f"{settings.service} keeps state: it needs "
                                  "runtime.delivery=exactly_once")
            if len(self.input_topics) != 1:
                raise ConfigError("a stage with state reads exactly one input topic")
            self._store = stage.state
        self._known_topics: set[str] = set()
        self._batches = BatchProcessor(settings, stage, known_topics=self._known_topics,
                                       require_topic=self._require_topic,
                                       fence_offsets=self._fence_offsets)
        svc = settings.service
        self._m_batch_seconds = m.BATCH_SECONDS.labels(svc)
        self._m_batch_records = m.BATCH_RECORDS.labels(svc)
        self._m_ready = m.READY.labels(svc)
        for topic in self.input_topics:  # at 0 from the start: increase() sees the first one
            m.RECORDS_CONSUMED.labels(svc, topic)
            for kind in ("decode", "schema", "stage"):
                m.RECORDS_DEAD_LETTERED.labels(svc, topic, kind)

    # -- state seen by /healthz and /readyz -------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def ready(self) -> bool:
        return self._alive and self._health.connected and bool(self._members.owned)

    @property
    def health(self) -> BrokerHealth:
        return self._health

    def stop(self) -> None:
        """Ask the loop to finish the batch in flight and return (a stage with ``interrupt``,
        :data:`~services.common.stage.INTERRUPT`, is told to cut it short). Safe from any
        thread."""
        self._stop.set()
        interrupt = getattr(self.stage, INTERRUPT, None)
        if callable(interrupt):
            interrupt()

    def _set_ready(self) -> None:
        self._m_ready.set(1 if self.ready else 0)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Consume, process and produce until :meth:`stop`; raise FatalRuntimeError on failure."""
        interrupted = False
        try:
            self._open()
            while not self._stop.is_set():
                self._health.raise_if_fatal()
                try:
                    self._handle(self._collect())
                except Interrupted as exc:
                    if not self._stop.is_set():
                        raise FatalRuntimeError(f"interrupted without a stop: {exc}") from exc
                    log.info("stopping: the batch in flight was interrupted (%s); it is "
                             "processed again after the restart", exc)
                    interrupted = True
                    break
                self._check_health()
                if self._bounds is not None and self._reached_end():
                    log.info("every input partition processed up to its end offset; stopping")
                    self.finished = True
                    self._stop.set()
            if self._open_batch is not None:
                self._commit_open()  # stopping: the last batch, within shutdown_timeout
            # Everything processed is committed (or was aborted and restored): state is what
            # its changelog holds.
            self._settled = self._open_batch is None and not interrupted
        except KafkaException as exc:
            raise FatalRuntimeError(f"Kafka client error: {exc.args[0]}") from exc
        finally:
            self._close()

    def _open(self) -> None:
        s = self.settings
        on_error = self._health.on_error
        tid = s.transactional_id if self.exactly_once else None
        producer_conf = producer_config(s, transactional_id=tid, error_cb=on_error,
                                        on_failed_delivery=self._on_failed_delivery)
        if self.exactly_once:
            self._producer = transactional_producer(
                producer_conf, s.runtime.transaction_timeout_ms / 1000)
            self._transactions = Transactions(self._producer, s.runtime, s.service, self._stop)
        else:
            self._producer = Producer(producer_conf)
        self._writer = OutputWriter(
            self._producer, s, self.dlq_topic,
            self._store.changelog_topic if self._store is not None else None,
            known=self._known_topics)
        self._require_topic(self.dlq_topic)
        if self._store is not None:
            self._writer.require_changelog(self.input_topics)
        self._consumer = Consumer(consumer_config(s, transactional=self.exactly_once,
                                                  error_cb=on_error))
        self._members.subscribe(self._consumer, self.input_topics)
        self._alive = True
        self._health.connected = True
        log.info(
            "runtime started: service=%s instance=%s delivery=%s inputs=%s group=%s%s",
            s.service, s.instance_id, s.runtime.delivery, ",".join(self.input_topics),
            s.group_id, f" transactional.id={s.transactional_id}" if self.exactly_once else "",
        )

    def _collect(self) -> list[KafkaMessage]:
        """Up to ``batch_max_records`` records or ``batch_max_bytes`` of values, waiting at most
        ``batch_max_seconds`` after the first; an empty list after a short idle wait so the
        loop can look at stop and health."""
        assert self._consumer is not None
        consumer, bounds = self._consumer, self._bounds
        rt = self.settings.runtime
        batch = self._collecting
        batch.records = []
        size = 0
        while (len(batch.records) < rt.batch_max_records and size < rt.batch_max_bytes
               and not self._stop.is_set()):
            if batch.records:
                timeout = batch.started + rt.batch_max_seconds - time.monotonic()
                if timeout <= 0:
                    break
            else:
                timeout = 0.2
            got = consumer.consume(
                min(rt.batch_max_records - len(batch.records), 1000), timeout=min(timeout, 0.2)
            )
            for msg in got:
                err = msg.error()
                if err is None and bounds is not None and bounds.beyond_end(consumer, msg):
                    continue
                if err is None:
                    if not batch.records:
                        batch.started = time.monotonic()
                    batch.records.append(msg)
                    size += len(msg)
                else:
                    self._on_consume_error(err)
            if not batch.records:
                break
        # on_revoke may have trimmed the list while consume() ran; this is what is still ours.
        records, batch.records = batch.records, []
        return records

    def _handle(self, records: list[KafkaMessage]) -> None:
        """One step of the loop with a batch (possibly empty, meaning the consumer is idle)."""
        batches = self._batches
        batch = batches.prepare(records) if records or batches.tick_due() else None
        if batch is not None and batch.empty():
            batch = None
        if self.exactly_once:
            self._transact(batch)
        elif batch is not None:
            self._produce_unconfirmed(batch)
            self._finished(batch)
        elif self._unconfirmed is not None:
            self._confirm()

    def _finished(self, batch: PreparedBatch) -> None:
        """Metrics for a batch whose outputs are committed (or, at-least-once, produced)."""
        svc = self.settings.service
        records, dead = batch.records, batch.dead
        consumed = (
            {self.input_topics[0]: len(records)} if len(self.input_topics) == 1
            else Counter(r.topic() for r in records)
        )
        for topic, n in consumed.items():
            m.RECORDS_CONSUMED.labels(svc, topic).inc(n)
        for topic, n in Counter(topic for topic, _, _ in batch.encoded).items():
            m.RECORDS_PRODUCED.labels(svc, topic).inc(n)
        for (topic, kind), n in Counter((d.topic, d.kind) for d in dead).items():
            m.RECORDS_DEAD_LETTERED.labels(svc, topic, kind).inc(n)
        if records:
            self._m_batch_seconds.observe(time.perf_counter() - batch.started)
            self._m_batch_records.observe(len(records))

    def _fence_offsets(self) -> list[TopicPartition]:
        """Offsets to send with a transaction that consumed nothing (timer outputs only):
        ``send_offsets_to_transaction`` carries the group generation, which is what fences a
        member that lost its partitions without knowing yet. Re-committing where the group
        already is changes nothing."""
        assert self._consumer is not None
        owned = self._members.partitions()
        if not owned:
            return []
        return [TopicPartition(t, p, at) for (t, p), at in
                positions(self._consumer, owned).items() if at >= 0]

    # -- exactly-once -----------------------------------------------------------------------

    def _transact(self, batch: PreparedBatch | None) -> None:
        """Commit the open transaction (the previous batch), then open one for ``batch``.

        Pipelined: the commit of batch N is deferred until batch N+1 has been consumed and
        processed (or the consumer is idle, or partitions are revoked, or the runtime stops).
        N's records were produced before N+1 was consumed, so by now the broker has mostly
        acknowledged them and the commit is short: the broker's work overlaps the stage's
        instead of following it. Latency grows by at most one batch. On an abort both batches
        are rewound (the consumer seeks back to the first offset of each in every partition)
        and this one's outputs are dropped: both are processed again.

        A stage with ``commit_at_once`` (:data:`~services.common.stage.COMMIT_AT_ONCE`) is not
        pipelined: each batch commits right after its outputs are produced.
        """
        if self._open_batch is not None and not self._commit_open(also_rewind=batch):
            return
        if batch is None:
            return
        assert self._transactions is not None and self._writer is not None
        self._open_batch = batch  # from here on, an abort rewinds it
        try:
            self._transactions.begin()
            self._writer.produce(batch.encoded, batch.dead, batch.state)
        except KafkaException as exc:
            self._abort_open(exc)
            return
        if self._at_once:
            self._commit_open()

    def _commit_open(self, also_rewind: PreparedBatch | None = None) -> bool:
        """send_offsets_to_transaction + commit_transaction for the open batch; False if the
        transaction had to be aborted. Then the open batch, and ``also_rewind`` (a batch
        processed after it, not produced yet), are rewound together."""
        assert self._transactions is not None and self._consumer is not None
        batch = self._open_batch
        assert batch is not None
        try:
            self._transactions.commit(batch.offsets, self._consumer)
        except KafkaException as exc:
            self._abort_open(exc, also_rewind)
            return False
        self._open_batch = None
        self._finished(batch)
        return True

    def _abort_open(self, exc: KafkaException, also_rewind: PreparedBatch | None = None) -> None:
        """Abort the open transaction after ``exc`` and rewind its batch (and ``also_rewind``);
        fatal if it cannot be aborted, or if transactions keep aborting. On the fatal paths
        the batch stays open, so :meth:`_close` still tries to abort it."""
        assert self._transactions is not None
        self._transactions.recover(exc)
        batch, self._open_batch = self._open_batch, None
        records = [*(batch.records if batch else ()), *(also_rewind.records if also_rewind else ())]
        self._rewind(records)
        if self._store is not None:
            # Memory is ahead of the changelog by the aborted batches: read it back.
            self._restore(self._store.owned())

    def _rewind(self, records: list[KafkaMessage]) -> None:
        """Seek each still-owned partition back to the lowest offset ``records`` hold in it,
        and drop what was collected from those partitions since (it will be read again)."""
        assert self._consumer is not None
        first = first_offsets(records)
        for (topic, partition), offset in first.items():
            if (topic, partition) in self._members.owned:
                self._consumer.seek(TopicPartition(topic, partition, offset))
        self._collecting.records = [
            r for r in self._collecting.records if (r.topic(), r.partition()) not in first
        ]

    # -- at-least-once ----------------------------------------------------------------------

    def _produce_unconfirmed(self, batch: PreparedBatch) -> None:
        """Confirm the previous batch, then produce this one; its offsets wait for the next
        confirmation. One flush per batch, not a Python callback per record: the flush for
        batch N runs just before batch N+1 is produced (or when the loop idles, or partitions
        are revoked, or at stop), so the broker acknowledges N while N+1 is consumed and
        processed. A crash replays what was not committed, so outputs may repeat; none is
        lost."""
        assert self._writer is not None
        self._confirm()
        self._writer.produce(batch.encoded, batch.dead)
        self._unconfirmed = batch.offsets

    def _confirm(self) -> None:
        """Flush (every produced record acknowledged), then store the pending batch's offsets;
        the consumer auto-commits what was stored."""
        assert self._producer is not None and self._consumer is not None
        left = self._producer.flush(self.settings.runtime.transaction_timeout_ms / 1000)
        if self._delivery_error is not None:
            raise FatalRuntimeError(f"output not delivered: {self._delivery_error}")
        if left:
            raise FatalRuntimeError(f"{left} outputs not acknowledged in time")
        offsets, self._unconfirmed = self._unconfirmed, None
        owned = self._members.owned
        mine = [tp for tp in offsets or () if (tp.topic, tp.partition) in owned]
        if mine:
            self._consumer.store_offsets(offsets=mine)

    # -- topics and state -------------------------------------------------------------------

    def _require_topic(self, topic: str) -> None:
        assert self._writer is not None
        self._writer.require(topic)

    def _restore(self, partitions: list[int]) -> None:
        """A transaction a predecessor left open holds the restore back until the broker
        aborts it (transaction_timeout_ms) or its instance is fenced: wait that long and more."""
        assert self._store is not None
        self._store.restore(self.settings.kafka.client_config(), partitions,
                            self.settings.runtime.transaction_timeout_ms / 1000 + 60)
        restored = getattr(self.stage, "restored", None)
        if restored is not None:  # optional: a stage showing its state in gauges
            for partition in partitions:
                restored(self._store.partition(partition))

    # -- rebalance hooks and callbacks from librdkafka (inside consume/poll, on this thread) -

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._bounds is not None:
            self._bounds.on_assign(consumer, partitions)
        if self._store is not None:
            # Before any record of these partitions is processed.
            self._restore([tp.partition for tp in partitions])

    def _on_release(self, _consumer: Consumer, partitions: list[TopicPartition],
                    lost: bool) -> None:
        if lost:
            # The group already moved on (session timed out): committing would be fenced, and
            # the new owners re-read from the committed offsets. Abort what is open.
            if self._open_batch is not None:
                self._open_batch = None
                assert self._transactions is not None
                self._transactions.abort()
            self._unconfirmed = None
        else:
            # Still a member of the old generation: finish what was processed while we may.
            if self._open_batch is not None:
                self._commit_open()
            if self._unconfirmed is not None:
                self._confirm()  # at-least-once: store what was delivered before offsets go
        gone = {(tp.topic, tp.partition) for tp in partitions}
        # Records collected for a revoked partition but not yet in a transaction belong to the
        # partition's next owner, which will read them from the last committed offset.
        self._collecting.records = [
            r for r in self._collecting.records if (r.topic(), r.partition()) not in gone
        ]
        if self._store is not None:
            self._store.drop([partition for _, partition in gone])
        self._health.forget(gone)

    def _on_failed_delivery(self, err: KafkaError | None, msg: KafkaMessage) -> None:
        if err is not None:
            log.error("delivery to %s failed: %s", msg.topic(), err)
            self._delivery_error = self._delivery_error or err

    def _on_consume_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.fatal() or err.code() == KafkaError._FATAL:
            # e.g. a static member fenced after a broker outage (librdkafka #3437): this
            # consumer can never fetch again; the service rebuilds its clients (serve()).
            raise FatalRuntimeError(f"fatal consumer error: {err}")
        if err.code() in (KafkaError.TOPIC_AUTHORIZATION_FAILED,
                          KafkaError.GROUP_AUTHORIZATION_FAILED):
            raise AccessDenied(f"consumer error: {err} (this principal's ACLs: "
                               "`flywheel acls apply`)")
        if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            raise FatalRuntimeError(
                f"consumer error: {err} (do the input topics exist? `flywheel topics apply`)"
            )
        log.warning("consumer error: %s", err)

    # -- health, bounds ---------------------------------------------------------------------

    def _check_health(self) -> None:
        assert self._producer is not None and self._consumer is not None
        if self._health.check(self._producer, self._consumer, self.input_topics[0],
                              self._members.owned):
            self._set_ready()

    def _reached_end(self) -> bool:
        assert self._consumer is not None and self._bounds is not None
        # Called between batches: nothing is being collected.
        return self._bounds.reached(self._consumer, self._members.owned,
                                    settled=self._members.settled)

    # -- shutdown ---------------------------------------------------------------------------

    def _checkpoint(self) -> None:
        """A clean stop: the state on disk is kept as of the changelog's end offsets, for a
        restart on this disk to read only what comes after (:meth:`StateStore.keep`)."""
        store = self._store
        if store is None or not store.on_disk or not store.owned():
            return
        try:
            marks = high_watermarks(self.settings.kafka.client_config(), store.changelog_topic,
                                    store.owned(), 10)
        except (KafkaException, FatalRuntimeError) as exc:
            log.warning("no local checkpoint of the state (%s): the next start restores it "
                        "from the whole changelog", exc)
            return
        store.keep({p: high for p, (_, high) in marks.items()})
        log.info("state kept on disk as of %s offsets %s", store.changelog_topic,
                 {p: high for p, (_, high) in sorted(marks.items())})

    def _close(self) -> None:
        self._alive = False
        self._m_ready.set(0)
        deadline = self.settings.runtime.shutdown_timeout_seconds
        if self._transactions is not None:
            self._transactions.close()
            if self._transactions.wedged:  # any call of it could block: leave it be
                log.error("the transactional producer is wedged; not flushed or aborted (its "
                          "successor's init_transactions aborts its transaction)")
                self._producer = None
                self._open_batch = None
        if self._producer is not None and self._open_batch is not None:
            # Leaving on an error mid-transaction: abort now rather than let the open
            # transaction hold back read_committed readers until transaction_timeout_ms.
            # Cleared either way, so the revoke that consumer.close() triggers leaves it alone.
            self._open_batch = None
            try:
                self._producer.abort_transaction(deadline)
            except KafkaException as exc:
                log.warning("could not abort the open transaction: %s", exc.args[0])
        if self._producer is not None:
            try:
                left = self._producer.flush(deadline)
            except KafkaException as exc:  # a fatal producer: nothing more will be delivered
                log.error("producer flush at shutdown: %s", exc.args[0])
                left = len(self._producer)
            if left:
                log.error("%d produced records not acknowledged at shutdown", left)
            elif self._unconfirmed is not None and self._delivery_error is None:
                try:
                    self._confirm()
                except (FatalRuntimeError, KafkaException) as exc:
                    log.error("last batch not confirmed at shutdown: %s", exc)
        # Whatever is still unconfirmed stays uncommitted: the revoke that close() triggers
        # must not flush again.
        self._unconfirmed = None
        if self._settled:
            self._checkpoint()  # before close() gives the partitions up
        if self._consumer is not None:
            # At-least-once, commits the stored offsets. A dynamic member leaves the group at
            # once; a static one keeps its partitions until session_timeout_ms, for its restart.
            try:
                self._consumer.close()
            except KafkaException as exc:
                log.warning("consumer close: %s", exc.args[0])
        self._consumer = self._producer = None  # a rebuilt loop's predecessor holds no client
        log.info("runtime stopped: service=%s", self.settings.service)
