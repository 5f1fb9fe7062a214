"""The consume-process-produce loop every stage runs in.

One batch at a time (bounded by ``batch_max_records``, ``batch_max_bytes`` and
``batch_max_seconds``):

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
at all. The commit of batch N is deferred until batch N+1 has been consumed and processed (or
the consumer is idle, or partitions are revoked, or the runtime stops): the broker
acknowledges N's records while the stage works on N+1, so the commit rarely waits. Latency
grows by at most one batch. If the commit fails with an abortable error, the transaction is
aborted and the consumer is rewound to the first offsets of every batch not committed, so they
are processed again (after ``MAX_CONSECUTIVE_ABORTS`` aborts in a row the cause is taken to be
persistent: fatal). The
``transactional.id`` is stable per instance: a restarted instance calling
``init_transactions`` aborts its predecessor's open transaction and fences it.

At-least-once: an idempotent producer without transactions. A batch's input offsets are
stored, and then auto-committed by the consumer, only after a producer flush has confirmed
every output and dead letter of that batch. The flush for batch N runs just before batch N+1
is produced (or when the loop idles, or partitions are revoked, or at stop), so the broker
acknowledges N while N+1 is consumed and processed. A crash replays what was not committed,
so outputs may repeat; none is lost.

Errors: a record-level failure never stops the service (the DLQ boundary). Anything else, a
fenced producer, an undeliverable output, a broker unreachable past ``broker_down_seconds``, a
missing input, output or dead-letter topic (output topics are checked when first used),
raises :class:`FatalRuntimeError`; the service exits non-zero with the reason logged and the
uncommitted batch left to be consumed again.

State: a :class:`~services.common.stage.StatefulStage` (filter, router) is run per input
partition with that partition's state (:mod:`services.common.state`). Its changes go to the
changelog topic in the batch's transaction; its timers (``tick``) run every ``tick_seconds``
even when no input arrives, in a transaction of their own if need be. Assigned partitions are
restored from the changelog before their first record is processed, revoked ones dropped, and
after an abort every owned partition is restored again.

Bounded runs (replays, ``runtime.bounds``): each input partition is processed over
``[start, end)`` offsets: a partition without a committed offset starts at its start, a record
at or past its end is skipped and its partition paused, and the loop stops by itself, with
:attr:`StreamRuntime.finished` set, once every partition is there. With ``shared_bounds``
(a replay's workers) a member stops once the partitions it owns are there, and whoever runs
the members checks that the group's offsets reached the ends.

Stop (SIGTERM/SIGINT or :meth:`StreamRuntime.stop`): no new batch starts; the one in flight is
committed within ``shutdown_timeout_seconds``. A commit that cannot finish in that time cannot
be aborted either (librdkafka keeps it in progress): the service exits non-zero, and the broker
aborts the transaction at ``transaction_timeout_ms``, or the restarted instance fences it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka import Message as KafkaMessage
from pydantic import ValidationError

from schemas import Message, ProducerInfo
from services.common import metrics as m
from services.common.config import ServiceSettings
from services.common.dlq import DeadLetter
from services.common.errors import ConfigError, FatalRuntimeError, FlywheelError
from services.common.offsets import positions
from services.common.produce import produce_when_room
from services.common.stage import (
    DecodeFailure,
    Output,
    Stage,
    StageResult,
    StatefulStage,
    apply_process,
    apply_stage,
    decode,
)
from services.common.state import StateStore

log = logging.getLogger(__name__)

CONSUMER_TUNING: dict[str, Any] = {
    # librdkafka pauses fetching a partition for fetch.queue.backoff.ms (default 1000 ms) once
    # its prefetch queue is over the thresholds below: a consumer working through a backlog
    # then idles for a second at a time (bench runtime: 50k -> 140k records/s at-least-once).
    "fetch.queue.backoff.ms": 20,
    # 16 MiB of prefetch per consumer is a full batch (batch_max_bytes) ahead; the default
    # 64 MiB only costs memory.
    "queued.max.messages.kbytes": 16384,
}
PRODUCER_TUNING: dict[str, Any] = {"linger.ms": 5}
MAX_CONSECUTIVE_ABORTS = 5


class _Sources:
    """The bytes each decoded input record was read as, for outputs that forward it."""

    __slots__ = ("_by_id", "_next", "_raw", "_records")

    def __init__(self, records: list[Message], raw: list[bytes | None]) -> None:
        self._records, self._raw = records, raw
        self._by_id: dict[int, bytes | None] | None = None
        self._next = 0

    def raw(self, record: Message) -> bytes | None:
        # Stages that forward usually do so in input order: try the next record first.
        i = self._next
        if i < len(self._records) and self._records[i] is record:
            self._next = i + 1
            return self._raw[i]
        if self._by_id is None:  # built on the first out-of-order forward only
            pairs = zip(self._records, self._raw, strict=True)
            self._by_id = {id(r): raw for r, raw in pairs}
        try:
            return self._by_id[id(record)]
        except KeyError:
            raise ValueError("Output(forward=True) names a record that is not an input of "
                             "this batch; build a new message instead") from None


_Encoded = tuple[str, str | None, bytes | None]
"""An output ready to produce: topic, key, value."""


@dataclass(slots=True)
class _Prepared:
    """A batch that was decoded, processed and encoded: what to produce, which offsets."""

    records: list[KafkaMessage]
    encoded: list[_Encoded]
    dead: list[DeadLetter]
    offsets: list[TopicPartition]
    started: float
    state: list[tuple[int, str, bytes | None]] = field(default_factory=list)
    """Changelog records of a stateful stage: (partition, key, value)."""

    def empty(self) -> bool:
        return not (self.records or self.encoded or self.dead or self.state)


@dataclass(slots=True)
class _Batch:
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
        self.input_topics = list(input_topics)
        self.dlq_topic = dlq_topic or settings.topic("dlq")
        self.exactly_once = settings.runtime.delivery == "exactly_once"
        self._identity = ProducerInfo(service=settings.service, instance=settings.instance_id)
        self._stop = threading.Event()
        self._alive = False
        self._assignment: set[tuple[str, int]] = set()
        self._between_assignments = True
        """From the start, and from a revoke to the assignment that follows (shared bounds: a
        member owning nothing then is not done)."""
        self._pending = _Batch()
        self._delivery_error: KafkaError | None = None
        self._unconfirmed: list[TopicPartition] | None = None
        self._fatal: KafkaError | None = None
        self._aborts_in_a_row = 0
        self._open_batch: _Prepared | None = None
        self._known_topics: set[str] = set()
        self._connected = False
        self._down_since: float | None = None
        self._next_health = 0.0
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._stateful: StatefulStage[Any] | None = None
        self._store: StateStore | None = None
        self._next_tick = 0.0
        self._ends: dict[tuple[str, int], int] | None = None
        self._starts: dict[tuple[str, int], int] = {}
        self.finished = False
        """Bounded (``runtime.bounds``): every partition was processed to its end."""
        if isinstance(stage, StatefulStage):
            if not self.exactly_once:
                raise ConfigError(f"{settings.service} keeps state: it needs "
                                  "runtime.delivery=exactly_once")
            if len(self.input_topics) != 1:
                raise ConfigError("a stage with state reads exactly one input topic")
            self._stateful, self._store = stage, stage.state
        svc = settings.service
        self._m_batch_seconds = m.BATCH_SECONDS.labels(svc)
        self._m_batch_records = m.BATCH_RECORDS.labels(svc)
        self._m_committed = m.TRANSACTIONS.labels(svc, "committed")
        self._m_aborted = m.TRANSACTIONS.labels(svc, "aborted")
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
        return self._alive and self._connected and bool(self._assignment)

    def stop(self) -> None:
        """Ask the loop to finish the batch in flight and return. Safe from any thread."""
        self._stop.set()

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Consume, process and produce until :meth:`stop`; raise FatalRuntimeError on failure."""
        try:
            self._open()
            while not self._stop.is_set():
                self._raise_if_fatal()
                self._handle(self._collect())
                self._check_health()
                if self._ends is not None and self._reached_end():
                    log.info("every input partition processed up to its end offset; stopping")
                    self.finished = True
                    self._stop.set()
            if self._open_batch is not None:
                self._commit_open()  # stopping: the last batch, within shutdown_timeout
        except KafkaException as exc:
            raise FatalRuntimeError(f"Kafka client error: {exc.args[0]}") from exc
        finally:
            self._close()

    def _open(self) -> None:
        s = self.settings
        common = s.kafka.client_config() | {"error_cb": self._on_error}
        # Defaults the user's client_properties (inside `common`) may override; the keys after
        # `common` are what the delivery guarantees rest on and are not overridable.
        consumer_conf = CONSUMER_TUNING | common | {
            "group.id": s.group_id,
            "client.id": f"{s.transactional_id}.consumer",
            "isolation.level": "read_committed",
            "auto.offset.reset": s.runtime.auto_offset_reset,
            "enable.auto.offset.store": False,
            "enable.auto.commit": not self.exactly_once,
            "auto.commit.interval.ms": 1000,
            "session.timeout.ms": s.runtime.session_timeout_ms,
            "max.poll.interval.ms": s.runtime.max_poll_interval_ms,
        }
        if s.runtime.shared_bounds:
            # Replay workers join one after the other at start; a member learns of the
            # rebalance at its next heartbeat (every 3 s by default), working alone till then.
            consumer_conf["heartbeat.interval.ms"] = 200
        if s.runtime.static_membership:
            consumer_conf["group.instance.id"] = s.instance_id
        producer_conf = PRODUCER_TUNING | common | {
            "client.id": f"{s.transactional_id}.producer",
            # Room for the largest record the runtime lets through, plus framing.
            "message.max.bytes": s.runtime.max_record_bytes + 2**16,
            "enable.idempotence": True,
            # Successes need no callback: a transaction's commit, or at-least-once's flush,
            # confirms them all at once. Failures are recorded.
            "delivery.report.only.error": True,
            "on_delivery": self._on_failed_delivery,
        }
        if self.exactly_once:
            producer_conf |= {
                "transactional.id": s.transactional_id,
                "transaction.timeout.ms": s.runtime.transaction_timeout_ms,
            }
        self._producer = Producer(producer_conf)
        if self.exactly_once:
            try:
                # Fences a previous incarnation with the same transactional.id and aborts the
                # transaction it left open.
                self._producer.init_transactions(s.runtime.transaction_timeout_ms / 1000)
            except KafkaException as exc:
                raise FatalRuntimeError(f"init_transactions failed: {exc.args[0]}") from exc
        self._require_topic(self.dlq_topic)
        if self._store is not None:
            self._require_changelog(self._store.changelog_topic)
        self._consumer = Consumer(consumer_conf)
        if s.runtime.bounds is not None:
            self._ends = {(topic, p): end for topic in self.input_topics
                          for p, (_, end) in s.runtime.bounds.get(topic, {}).items()}
            self._starts = {(topic, p): start for topic in self.input_topics
                            for p, (start, _) in s.runtime.bounds.get(topic, {}).items()}
        self._consumer.subscribe(
            self.input_topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._alive = True
        self._connected = True
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
        rt = self.settings.runtime
        batch = self._pending
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
            got = self._consumer.consume(
                min(rt.batch_max_records - len(batch.records), 1000), timeout=min(timeout, 0.2)
            )
            for msg in got:
                err = msg.error()
                if err is None and self._ends is not None and self._beyond_end(msg):
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

    def _prepare(self, records: list[KafkaMessage]) -> _Prepared:
        """Decode, validate and run the stage: everything about a batch that is pure."""
        started = time.perf_counter()
        dead: list[DeadLetter] = []
        good: list[Message] = []
        good_src: list[KafkaMessage] = []
        good_raw: list[bytes | None] = []
        model = self.stage.input_type
        validate = model.__pydantic_validator__.validate_json
        last: dict[tuple[Any, Any], Any] = {}  # (topic, partition) -> offset, never None here
        # The per-record hot path: validate directly, classify a failure only when one occurs.
        for msg in records:
            last[msg.topic(), msg.partition()] = msg.offset()
            value = msg.value()
            try:
                if value is None:
                    raise TypeError("tombstone")
                good.append(validate(value))
                good_src.append(msg)
                good_raw.append(value)
            except (ValidationError, TypeError):
                try:
                    good.append(decode(model, value))  # raises DecodeFailure, with its kind
                    good_src.append(msg)
                    good_raw.append(value)
                except DecodeFailure as exc:
                    cls = type(exc.cause).__name__ if exc.cause else "DecodeFailure"
                    dead.append(_dead_letter(msg, exc.kind, cls, str(exc)))
        store = self._store
        result = self._run_stage(good, good_src)
        for index, error in result.failed:
            letter = _dead_letter(good_src[index], "stage", type(error).__name__, str(error))
            dead.append(letter)
            log.warning(
                "stage raised on %s[%d]@%d: %s: %s", letter.topic, letter.partition,
                letter.offset, letter.error_class, error,
            )
        sources = _Sources(good, good_raw)
        encoded, too_big = self._encode(result.outputs, sources)
        limit = self.settings.runtime.max_record_bytes
        if too_big or (store is not None and store.largest_change(0) > limit):
            failed = {i for i, _ in result.failed}
            encoded = self._isolate_oversized(good, good_src, failed, sources, dead)
        offsets = [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]
        if store is not None and self._tick_due():
            # After the records, so the oversized path above never undoes timer work.
            mark = store.mark()
            timed, timed_dead = self._tick(sources)
            if not offsets and (timed or timed_dead or store.mark() > mark):
                offsets = self._fence_offsets()
                if not offsets:  # nothing to fence a transaction with yet: try again later
                    store.undo(mark)
                    timed, timed_dead = [], []
            encoded.extend(timed)
            dead.extend(timed_dead)
        return _Prepared(
            records=records, encoded=encoded, dead=dead, offsets=offsets, started=started,
            state=store.changes() if store is not None else [],
        )

    def _run_stage(self, good: list[Message], src: list[KafkaMessage]) -> StageResult[Any]:
        """The stage over the decoded records. A stateful stage runs per input partition,
        with that partition's state, and then its timers when they are due."""
        stage, store = self._stateful, self._store
        if stage is None or store is None:
            return apply_stage(cast(Stage[Any], self.stage), good)
        store.begin()
        by_partition: dict[int, list[int]] = {}
        for i, msg in enumerate(src):
            by_partition.setdefault(cast(int, msg.partition()), []).append(i)
        outputs: list[Output] = []
        failed: list[tuple[int, BaseException]] = []
        for partition, indexes in by_partition.items():
            state = store.partition(partition)
            result = apply_process(
                lambda batch, state=state: stage.process_partition(state, batch),  # type: ignore[misc]
                [good[i] for i in indexes], store,
            )
            outputs.extend(result.outputs)
            failed.extend((indexes[j], exc) for j, exc in result.failed)
        return StageResult(outputs, failed)

    def _tick(self, sources: _Sources) -> tuple[list[_Encoded], list[DeadLetter]]:
        """The stage's timers for every owned partition (every ``tick_seconds``). A timer that
        raises is logged and undone; it runs again at the next tick. A timer output too large
        to produce becomes a dead letter naming it (its state change is kept: retrying would
        fail the same way forever)."""
        stage, store = self._stateful, self._store
        assert stage is not None and store is not None
        self._next_tick = time.monotonic() + stage.tick_seconds
        limit = self.settings.runtime.max_record_bytes
        encoded: list[_Encoded] = []
        dead: list[DeadLetter] = []
        wall = time.time()
        for partition in store.owned():
            mark = store.mark()
            try:
                outputs = stage.tick(store.partition(partition), wall)
                if store.largest_change(mark) > limit:
                    raise ValueError("a timer's state change exceeds max_record_bytes")
                mine, too_big = self._encode(outputs, sources)
            except FlywheelError:
                raise
            except Exception:
                store.undo(mark)
                log.exception("timer of partition %d failed; retried at the next tick",
                              partition)
                continue
            for topic, key, data in mine:
                if too_big and data is not None and len(data) > limit:
                    log.error("timer output for %s (key %s) of %d bytes exceeds "
                              "max_record_bytes; dead-lettered", topic, key, len(data))
                    dead.append(DeadLetter(
                        kind="stage", error_class="OutputTooLarge",
                        message=f"timer output of {len(data)} bytes for {topic} exceeds "
                        f"max_record_bytes ({limit})", topic=topic, partition=partition,
                        offset=-1, key=key.encode() if key else None, value=None, headers=[]))
                else:
                    encoded.append((topic, key, data))
        return encoded, dead

    def _fence_offsets(self) -> list[TopicPartition]:
        """Offsets to send with a transaction that consumed nothing (timer outputs only):
        ``send_offsets_to_transaction`` carries the group generation, which is what fences a
        member that lost its partitions without knowing yet. Re-committing where the group
        already is changes nothing."""
        assert self._consumer is not None
        owned = [TopicPartition(t, p) for t, p in sorted(self._assignment)]
        if not owned:
            return []
        return [TopicPartition(t, p, at) for (t, p), at in
                positions(self._consumer, owned).items() if at >= 0]

    def _encode(self, outputs: Iterable[Output], sources: _Sources) -> tuple[list[_Encoded], bool]:
        """Topic, key and bytes of each output, and whether any is over ``max_record_bytes``.

        Forwarded outputs reuse the bytes they were read as; new messages get this service as
        their producer unless the stage named one. Output topics are checked on first use.
        """
        identity, known = self._identity, self._known_topics
        limit = self.settings.runtime.max_record_bytes
        encoded: list[_Encoded] = []
        too_big = False
        for out in outputs:
            if out.topic not in known:
                self._require_topic(out.topic)
            value = out.value
            if out.forward:
                data = sources.raw(value)
            else:
                if value.producer is None:
                    value.producer = identity
                data = value.to_bytes()
            if data is not None and len(data) > limit:
                too_big = True
            encoded.append((out.topic, out.key or value.partition_key(), data))
        return encoded, too_big

    def _isolate_oversized(
        self, good: list[Message], good_src: list[KafkaMessage], failed: set[int],
        sources: _Sources, dead: list[DeadLetter],
    ) -> list[_Encoded]:
        """Rare path: some output is too large to produce. Process record by record, and
        dead-letter each input whose outputs do not fit; keep the others' outputs."""
        limit = self.settings.runtime.max_record_bytes
        encoded: list[_Encoded] = []
        store = self._store
        if store is not None:
            store.undo(0)  # the whole batch's changes; redone below, record by record
        for i, record in enumerate(good):
            if i in failed:
                continue  # already dead-lettered
            mark = store.mark() if store is not None else 0
            try:
                mine, too_big = self._encode(self._process_one(good_src[i], record), sources)
            except FlywheelError:
                raise
            except Exception as exc:
                if store is not None:
                    store.undo(mark)
                dead.append(_dead_letter(good_src[i], "stage", type(exc).__name__, str(exc)))
                continue
            if store is not None and store.largest_change(mark) > limit:
                store.undo(mark)
                dead.append(_dead_letter(
                    good_src[i], "stage", "StateTooLarge",
                    f"its state change exceeds max_record_bytes ({limit})"))
                continue
            if too_big and store is not None:
                store.undo(mark)
            if too_big:
                size = max(len(d) for _, _, d in mine if d is not None)
                dead.append(_dead_letter(
                    good_src[i], "stage", "OutputTooLarge",
                    f"an output of {size} bytes exceeds max_record_bytes ({limit})",
                ))
            else:
                encoded.extend(mine)
        return encoded

    def _process_one(self, msg: KafkaMessage, record: Message) -> list[Output]:
        """One record alone, on the oversized-output path. A stateful stage's changes for the
        batch were undone first; this redoes them record by record (undone again if the
        record's outputs do not fit)."""
        if self._stateful is None or self._store is None:
            return cast(Stage[Any], self.stage).process([record])
        return self._stateful.process_partition(
            self._store.partition(cast(int, msg.partition())), [record])

    def _handle(self, records: list[KafkaMessage]) -> None:
        """One step of the loop with a batch (possibly empty, meaning the consumer is idle)."""
        batch = self._prepare(records) if records or self._tick_due() else None
        if batch is not None and batch.empty():
            batch = None
        if self.exactly_once:
            self._transact_pipelined(batch)
        elif batch is not None:
            self._produce_unconfirmed(batch)
            self._finished(batch)
        elif self._unconfirmed is not None:
            self._confirm()

    def _tick_due(self) -> bool:
        return self._stateful is not None and time.monotonic() >= self._next_tick

    def _finished(self, batch: _Prepared) -> None:
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

    # -- exactly-once -----------------------------------------------------------------------

    def _transact_pipelined(self, batch: _Prepared | None) -> None:
        """Commit the open transaction (the previous batch), then open one for ``batch``.

        The previous batch's records were produced before this batch was consumed and
        processed, so by now the broker has mostly acknowledged them and the commit is short:
        the broker's work overlaps the stage's instead of following it. On an abort both
        batches are rewound and this one's outputs are dropped.
        """
        if self._open_batch is not None and not self._commit_open(also_rewind=batch):
            return
        if batch is None:
            return
        assert self._producer is not None
        self._open_batch = batch  # from here on, an abort rewinds it
        try:
            self._producer.begin_transaction()
            self._produce_all(batch.encoded, batch.dead, batch.state)
        except KafkaException as exc:
            self._abort_open(exc)

    def _commit_open(self, also_rewind: _Prepared | None = None) -> bool:
        """send_offsets_to_transaction + commit_transaction for the open batch; False if the
        transaction had to be aborted. Then the open batch, and ``also_rewind`` (a batch
        processed after it, not produced yet), are rewound together."""
        assert self._producer is not None and self._consumer is not None
        batch, producer = self._open_batch, self._producer
        assert batch is not None
        try:
            if batch.offsets:  # a batch of timer outputs alone consumed nothing
                group = self._consumer.consumer_group_metadata()
                self._bounded(
                    lambda t: producer.send_offsets_to_transaction(batch.offsets, group, t))
            self._bounded(producer.commit_transaction)
        except KafkaException as exc:
            self._abort_open(exc, also_rewind)
            return False
        self._open_batch = None
        self._aborts_in_a_row = 0
        self._m_committed.inc()
        self._finished(batch)
        return True

    def _abort_open(self, exc: KafkaException, also_rewind: _Prepared | None = None) -> None:
        """Abort the open transaction after ``exc`` and rewind its batch (and ``also_rewind``);
        fatal if it cannot be aborted, or if transactions keep aborting."""
        err: KafkaError = exc.args[0]
        # On the fatal paths the batch stays open, so _close() still tries to abort it.
        if err.fatal() or not err.txn_requires_abort():
            if err.retriable():
                # A call that timed out stays in progress inside librdkafka: it can only be
                # resumed, not aborted. The broker aborts it after transaction.timeout.ms, or
                # the restarted instance fences it at once.
                raise FatalRuntimeError(
                    f"transaction did not complete in time: {err}; it will be aborted by the "
                    "broker or by this instance's successor"
                ) from exc
            raise FatalRuntimeError(f"transaction failed: {err}") from exc
        self._aborts_in_a_row += 1
        if self._aborts_in_a_row > MAX_CONSECUTIVE_ABORTS:
            raise FatalRuntimeError(
                f"{self._aborts_in_a_row} transactions aborted in a row, last: {err}"
            ) from exc
        log.warning("transaction aborted, batch will be processed again: %s", err)
        self._abort_transaction()
        batch, self._open_batch = self._open_batch, None
        records = [*(batch.records if batch else ()), *(also_rewind.records if also_rewind else ())]
        self._rewind(records)
        if self._store is not None:
            # Memory is ahead of the changelog by the aborted batches: read it back.
            self._restore(self._store.owned())

    def _abort_transaction(self) -> None:
        """abort_transaction within the bounds of ``_bounded``; fatal if it fails."""
        assert self._producer is not None
        try:
            self._bounded(self._producer.abort_transaction)
        except KafkaException as exc:
            raise FatalRuntimeError(f"abort_transaction failed: {exc.args[0]}") from exc
        self._m_aborted.inc()

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
                time.sleep(0.05)  # some retriable errors return at once

    def _rewind(self, records: list[KafkaMessage]) -> None:
        """Seek each still-assigned partition back to the lowest offset ``records`` hold in it,
        and drop what was collected from those partitions since (it will be read again)."""
        assert self._consumer is not None
        first = _first_offsets(records)
        for (topic, partition), offset in first.items():
            if (topic, partition) in self._assignment:
                self._consumer.seek(TopicPartition(topic, partition, offset))
        self._pending.records = [
            r for r in self._pending.records if (r.topic(), r.partition()) not in first
        ]

    # -- at-least-once ----------------------------------------------------------------------

    def _produce_unconfirmed(self, batch: _Prepared) -> None:
        """Confirm the previous batch, then produce this one; its offsets wait for the next
        confirmation. One flush per batch, not a Python callback per record."""
        self._confirm()
        self._produce_all(batch.encoded, batch.dead)
        self._unconfirmed = batch.offsets

    def _confirm(self) -> None:
        """Flush (every produced record acknowledged), then store the pending batch's offsets."""
        assert self._producer is not None and self._consumer is not None
        left = self._producer.flush(self.settings.runtime.transaction_timeout_ms / 1000)
        if self._delivery_error is not None:
            raise FatalRuntimeError(f"output not delivered: {self._delivery_error}")
        if left:
            raise FatalRuntimeError(f"{left} outputs not acknowledged in time")
        offsets, self._unconfirmed = self._unconfirmed, None
        mine = [tp for tp in offsets or () if (tp.topic, tp.partition) in self._assignment]
        if mine:
            self._consumer.store_offsets(offsets=mine)

    # -- producing --------------------------------------------------------------------------

    def _produce_all(
        self, encoded: list[_Encoded], dead: list[DeadLetter],
        state: Sequence[tuple[int, str, bytes | None]] = (),
    ) -> None:
        """Hand every output, dead letter and state change to the producer. The per-record
        hot path: no per-record headers (a topic's message type is fixed, see
        ``schemas.messages``)."""
        assert self._producer is not None
        produce = self._producer.produce
        if state:
            assert self._store is not None
            changelog = self._store.changelog_topic
            for partition, state_key, value in state:
                produce_when_room(self._producer, changelog, value, state_key,
                                  partition=partition)
        for topic, key, data in encoded:
            try:  # the hot path: one call, the helper only when the queue is full
                produce(topic, data, key)
            except BufferError:
                produce_when_room(self._producer, topic, data, key)
        s = self.settings
        limit = s.runtime.max_record_bytes
        for d in dead:
            headers = d.record_headers(s.service, s.instance_id)
            value = d.value
            if value is not None and len(value) > limit:
                # Too large to carry: the headers say where the original still is.
                headers.append(("flywheel-value-omitted", f"{len(value)} bytes".encode()))
                value = None
            produce_when_room(self._producer, self.dlq_topic, value, d.key, headers=headers)

    def _require_topic(self, topic: str) -> None:
        """Fail fast on a topic that does not exist: librdkafka would only fail its records
        after a metadata timeout, and every transaction holding them would abort."""
        assert self._producer is not None
        try:
            meta = self._producer.list_topics(topic, timeout=10).topics.get(topic)
        except KafkaException as exc:
            raise FatalRuntimeError(f"cannot look up topic {topic!r}: {exc.args[0]}") from exc
        if meta is None or meta.error is not None:
            why = meta.error if meta is not None else "no metadata"
            raise FatalRuntimeError(
                f"topic {topic!r} is not available ({why}); create the topics with "
                "`flywheel topics apply`"
            )
        self._known_topics.add(topic)

    def _require_changelog(self, topic: str) -> None:
        """The changelog must exist and have a partition for every input partition: the state
        of input partition p is written to its partition p."""
        self._require_topic(topic)
        assert self._producer is not None
        meta = self._producer.list_topics(timeout=10).topics
        need = max(len(meta[t].partitions) for t in self.input_topics if t in meta) \
            if any(t in meta for t in self.input_topics) else 0
        have = len(meta[topic].partitions)
        if have < need:
            raise FatalRuntimeError(
                f"state changelog {topic!r} has {have} partitions but the input has {need}; "
                "give it as many (deploy/topics.yaml) and `flywheel topics apply`")

    def _restore(self, partitions: list[int]) -> None:
        """A transaction a predecessor left open holds the restore back until the broker
        aborts it (transaction_timeout_ms) or its instance is fenced: wait that long and more."""
        assert self._store is not None
        self._store.restore(self.settings.kafka.client_config(), partitions,
                            self.settings.runtime.transaction_timeout_ms / 1000 + 60)
        restored = getattr(self._stateful, "restored", None)
        if restored is not None:  # optional: a stage showing its state in gauges
            for partition in partitions:
                restored(self._store.partition(partition))

    # -- callbacks from librdkafka (run inside consume/poll on this thread) -----------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._ends is not None:
            self._start_at_bounds(consumer, partitions)
            # librdkafka keeps a partition's pause across a revoke: one this member paused at
            # its end and gets back after another member took it meanwhile would never be
            # fetched again, nor its position move past the markers to its end.
            consumer.resume(partitions)
        if self._store is not None:
            # Before any record of these partitions is processed.
            self._restore([tp.partition for tp in partitions])
        self._assignment.update((tp.topic, tp.partition) for tp in partitions)
        self._between_assignments = False
        self._m_ready.set(1 if self.ready else 0)
        log.info("assigned %s", _fmt(partitions))

    def _start_at_bounds(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions without a committed offset start at their bound's start."""
        committed = consumer.committed(partitions, timeout=10)
        fresh = {(tp.topic, tp.partition) for tp in committed if tp.offset < 0}
        if not fresh:
            return
        for tp in partitions:
            if (tp.topic, tp.partition) in fresh:
                # A partition the bounds do not list starts anywhere: it has nothing to do.
                tp.offset = self._starts.get((tp.topic, tp.partition), 0)
        consumer.assign(partitions)
        log.info("starting at %s", _fmt(partitions))

    def _beyond_end(self, msg: KafkaMessage) -> bool:
        """A record at or past its partition's end (bounded runs): not processed, and the
        partition paused, so the consumer stops fetching what the run will never take."""
        assert self._consumer is not None and self._ends is not None
        topic, partition, offset = _origin(msg)
        if offset < self._ends.get((topic, partition), 0):
            return False
        self._consumer.pause([TopicPartition(topic, partition)])
        return True

    def _reached_end(self) -> bool:
        """Every input partition with something to process is owned and processed to its end
        (or the group's committed offset is there already)."""
        assert self._consumer is not None and self._ends is not None
        todo = {k: end for k, end in self._ends.items() if end > self._starts.get(k, 0)}
        if self.settings.runtime.shared_bounds:  # the other members see to the rest
            if self._between_assignments:
                return False
            todo = {k: end for k, end in todo.items() if k in self._assignment}
        if self._pending.records or set(todo) - self._assignment:
            return False
        at = positions(self._consumer, [TopicPartition(t, p) for t, p in todo])
        return all(offset >= self._ends[key] for key, offset in at.items())

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Still a member of the old generation: finish what was processed while we may.
        if self._open_batch is not None:
            self._commit_open()
        if self._unconfirmed is not None:
            self._confirm()  # at-least-once: store what was delivered before the offsets go
        self._unassign(partitions)
        self._between_assignments = True
        log.info("revoked %s", _fmt(partitions))

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The group already moved on (session timed out): committing would be fenced, and the
        # new owners re-read from the committed offsets. Abort what is open.
        if self._open_batch is not None:
            self._open_batch = None
            self._abort_transaction()
        self._unconfirmed = None
        self._unassign(partitions)
        self._between_assignments = True
        log.warning("lost %s (session expired); uncommitted work dropped", _fmt(partitions))

    def _unassign(self, partitions: list[TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        # Records collected for a revoked partition but not yet in a transaction belong to the
        # partition's next owner, which will read them from the last committed offset.
        self._pending.records = [
            r for r in self._pending.records if (r.topic(), r.partition()) not in gone
        ]
        self._assignment -= gone
        if self._store is not None:
            self._store.drop([partition for _, partition in gone])
        for topic, partition in gone:
            with contextlib.suppress(KeyError):  # no lag reported for it yet
                m.CONSUMER_LAG.remove(self.settings.service, topic, str(partition))
        self._m_ready.set(1 if self.ready else 0)

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
            self._delivery_error = self._delivery_error or err

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
            try:
                self._update_lag()
            except KafkaException as exc:  # a metric is not worth stopping for
                log.warning("could not refresh consumer lag: %s", exc.args[0])
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
        at = positions(consumer, [TopicPartition(t, p) for t, p in sorted(self._assignment)],
                       timeout=2)
        svc = self.settings.service
        for (topic, partition), pos in at.items():
            tp = TopicPartition(topic, partition)
            low, high = consumer.get_watermark_offsets(tp, cached=True)
            if high < 0:
                continue  # no fetch response for this partition yet
            if pos < 0:
                pos = low if low >= 0 else 0
            m.CONSUMER_LAG.labels(svc, tp.topic, str(tp.partition)).set(max(0, high - pos))

    # -- shutdown ---------------------------------------------------------------------------

    def _close(self) -> None:
        self._alive = False
        self._m_ready.set(0)
        deadline = self.settings.runtime.shutdown_timeout_seconds
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
            left = self._producer.flush(deadline)
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
        if self._consumer is not None:
            # At-least-once, commits the stored offsets. A dynamic member leaves the group at
            # once; a static one keeps its partitions until session_timeout_ms, for its restart.
            try:
                self._consumer.close()
            except KafkaException as exc:
                log.warning("consumer close: %s", exc.args[0])
        log.info("runtime stopped: service=%s", self.settings.service)


def _origin(msg: KafkaMessage) -> tuple[str, int, int]:
    """Topic, partition, offset of a consumed record (always set on a consumed record)."""
    return cast(str, msg.topic()), cast(int, msg.partition()), cast(int, msg.offset())


def _first_offsets(records: list[KafkaMessage]) -> dict[tuple[str, int], int]:
    """The lowest offset per partition among ``records`` (in any order)."""
    first: dict[tuple[str, int], int] = {}
    for msg in records:
        topic, partition, offset = _origin(msg)
        key = (topic, partition)
        if key not in first or offset < first[key]:
            first[key] = offset
    return first


def _dead_letter(msg: KafkaMessage, kind: str, error_class: str, message: str) -> DeadLetter:
    topic, partition, offset = _origin(msg)
    headers = msg.headers() or []
    return DeadLetter(
        kind=kind, error_class=error_class, message=message, topic=topic, partition=partition,
        offset=offset, key=msg.key(), value=msg.value(),
        headers=list(headers.items() if isinstance(headers, dict) else headers),
    )


def _fmt(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"
