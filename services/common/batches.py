"""What the runtime does to a batch between consuming and producing, all of it pure of Kafka
calls: decode and validate each record, run the stage (per input partition, with that
partition's state, for a stateful stage), run its timers when due, encode the outputs, and
turn every record-level failure into a dead letter.

Over 300 lines: the rare paths belong with the common one they undo: an output or a
state change too large to produce sends the batch through the stage again, record by record,
so that only the inputs behind it are dead-lettered; a timer that fails is undone alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from confluent_kafka import Message as KafkaMessage
from confluent_kafka import TopicPartition
from pydantic import ValidationError

from schemas import Message, ProducerInfo, fast
from services.common.config import ServiceSettings
from services.common.dlq import DeadLetter
from services.common.errors import FlywheelError
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

Encoded = tuple[str, str | None, bytes | None]
"""An output ready to produce: topic, key, value."""


class Sources:
    """The bytes each decoded input record was read as, for outputs that forward it."""

    __slots__ = ("_by_id", "_next", "_raw", "_records")

    def __init__(self, records: list[Message], raw: list[bytes | None]) -> None:
        self._records, self._raw = records, raw
        self._by_id: dict[int, bytes | None] | None = None
        self._next = 0

    def raw(self, record: object) -> bytes | None:
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


@dataclass(slots=True)
class PreparedBatch:
    """A batch that was decoded, processed and encoded: what to produce, which offsets."""

    records: list[KafkaMessage]
    encoded: list[Encoded]
    dead: list[DeadLetter]
    offsets: list[TopicPartition]
    started: float
    state: list[tuple[int, str, bytes | None]] = field(default_factory=list)
    """Changelog records of a stateful stage: (partition, key, value)."""

    def empty(self) -> bool:
        return not (self.records or self.encoded or self.dead or self.state)


class BatchProcessor:
    """Prepares batches for one stage.

    ``require_topic`` is called for an output topic not in ``known_topics`` yet (it fails on
    a topic that does not exist, and adds it). ``fence_offsets`` gives the offsets to send
    with a transaction of timer outputs alone.
    """

    def __init__(
        self, settings: ServiceSettings, stage: Stage[Any] | StatefulStage[Any], *,
        known_topics: set[str], require_topic: Callable[[str], None],
        fence_offsets: Callable[[], list[TopicPartition]],
    ) -> None:
        self.settings = settings
        self.stage = stage
        self._stateful = stage if isinstance(stage, StatefulStage) else None
        self._store: StateStore | None = self._stateful.state if self._stateful else None
        self._identity = ProducerInfo(service=settings.service, instance=settings.instance_id)
        self._fast_identity = fast.ProducerInfo(service=settings.service,
                                                instance=settings.instance_id)
        self._known = known_topics
        self._require_topic = require_topic
        self._fence_offsets = fence_offsets
        self._next_tick = 0.0

    def tick_due(self) -> bool:
        return self._stateful is not None and time.monotonic() >= self._next_tick

    def prepare(self, records: list[KafkaMessage]) -> PreparedBatch:
        """Decode, validate and run the stage: everything about a batch that is pure."""
        started = time.perf_counter()
        dead: list[DeadLetter] = []
        good: list[Message] = []
        good_src: list[KafkaMessage] = []
        good_raw: list[bytes | None] = []
        model = self.stage.input_type
        validate: Callable[[bytes], Any] = fast.decoder(model) if fast.is_fast(model) \
            else cast(type[Message], model).__pydantic_validator__.validate_json
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
            except (ValidationError, fast.Unrepresentable, TypeError):
                try:
                    good.append(decode(model, value))  # raises DecodeFailure, with its kind
                    good_src.append(msg)
                    good_raw.append(value)
                except DecodeFailure as exc:
                    cls = type(exc.cause).__name__ if exc.cause else "DecodeFailure"
                    dead.append(dead_letter(msg, exc.kind, cls, str(exc)))
        admit = getattr(self.stage, "admit", None)
        if admit is not None:
            good, good_src, good_raw = self._admitted(admit, good, good_src, good_raw, dead)
        store = self._store
        result = self._run_stage(good, good_src)
        for index, error in result.failed:
            letter = dead_letter(good_src[index], "stage", type(error).__name__, str(error))
            dead.append(letter)
            log.warning(
                "stage raised on %s[%d]@%d: %s: %s", letter.topic, letter.partition,
                letter.offset, letter.error_class, error,
            )
        sources = Sources(good, good_raw)
        encoded, too_big = self._encode(result.outputs, sources)
        limit = self.settings.runtime.max_record_bytes
        if too_big or (store is not None and store.largest_change(0) > limit):
            failed = {i for i, _ in result.failed}
            encoded = self._isolate_oversized(good, good_src, failed, sources, dead)
        offsets = [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]
        if store is not None and self.tick_due():
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
        return PreparedBatch(
            records=records, encoded=encoded, dead=dead, offsets=offsets, started=started,
            state=store.changes() if store is not None else [],
        )

    @staticmethod
    def _admitted(admit: Callable[[Any], None], good: list[Message], src: list[KafkaMessage],
                  raw: list[bytes | None], dead: list[DeadLetter]
                  ) -> tuple[list[Message], list[KafkaMessage], list[bytes | None]]:
        """The records the stage's optional ``admit(record)`` check lets through; the others
        are dead-lettered one by one, without the batch retried record by record (for a
        stage whose batch is costly, such as a generator's)."""
        kept: tuple[list[Message], list[KafkaMessage], list[bytes | None]] = ([], [], [])
        for record, msg, value in zip(good, src, raw, strict=True):
            try:
                admit(record)
            except ValueError as exc:
                dead.append(dead_letter(msg, "stage", type(exc).__name__, str(exc)))
                continue
            kept[0].append(record)
            kept[1].append(msg)
            kept[2].append(value)
        return kept

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

    def _tick(self, sources: Sources) -> tuple[list[Encoded], list[DeadLetter]]:
        """The stage's timers for every owned partition (every ``tick_seconds``). A timer that
        raises is logged and undone; it runs again at the next tick. A timer output too large
        to produce becomes a dead letter naming it (its state change is kept: retrying would
        fail the same way forever)."""
        stage, store = self._stateful, self._store
        assert stage is not None and store is not None
        self._next_tick = time.monotonic() + stage.tick_seconds
        limit = self.settings.runtime.max_record_bytes
        encoded: list[Encoded] = []
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

    def _encode(self, outputs: Iterable[Output], sources: Sources) -> tuple[list[Encoded], bool]:
        """Topic, key and bytes of each output, and whether any is over ``max_record_bytes``.

        Forwarded outputs reuse the bytes they were read as; new messages get this service as
        their producer unless the stage named one. Output topics are checked on first use.
        """
        identity, known = self._identity, self._known
        limit = self.settings.runtime.max_record_bytes
        encoded: list[Encoded] = []
        too_big = False
        for out in outputs:
            if out.topic not in known:
                self._require_topic(out.topic)
            value = out.value
            if out.forward:
                data = sources.raw(value)
            else:
                if value.producer is None:
                    value.producer = identity if isinstance(value, Message) \
                        else self._fast_identity
                data = value.to_bytes()
            if data is not None and len(data) > limit:
                too_big = True
            encoded.append((out.topic, out.key or value.partition_key(), data))
        return encoded, too_big

    def _isolate_oversized(
        self, good: list[Message], good_src: list[KafkaMessage], failed: set[int],
        sources: Sources, dead: list[DeadLetter],
    ) -> list[Encoded]:
        """Rare path: some output is too large to produce. Process record by record, and
        dead-letter each input whose outputs do not fit; keep the others' outputs."""
        limit = self.settings.runtime.max_record_bytes
        encoded: list[Encoded] = []
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
                dead.append(dead_letter(good_src[i], "stage", type(exc).__name__, str(exc)))
                continue
            if store is not None and store.largest_change(mark) > limit:
                store.undo(mark)
                dead.append(dead_letter(
                    good_src[i], "stage", "StateTooLarge",
                    f"its state change exceeds max_record_bytes ({limit})"))
                continue
            if too_big and store is not None:
                store.undo(mark)
            if too_big:
                size = max(len(d) for _, _, d in mine if d is not None)
                dead.append(dead_letter(
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


def origin(msg: KafkaMessage) -> tuple[str, int, int]:
    """Topic, partition, offset of a consumed record (always set on a consumed record)."""
    return cast(str, msg.topic()), cast(int, msg.partition()), cast(int, msg.offset())


def first_offsets(records: list[KafkaMessage]) -> dict[tuple[str, int], int]:
    """The lowest offset per partition among ``records`` (in any order)."""
    first: dict[tuple[str, int], int] = {}
    for msg in records:
        topic, partition, offset = origin(msg)
        key = (topic, partition)
        if key not in first or offset < first[key]:
            first[key] = offset
    return first


def dead_letter(msg: KafkaMessage, kind: str, error_class: str, message: str) -> DeadLetter:
    topic, partition, offset = origin(msg)
    headers = msg.headers() or []
    return DeadLetter(
        kind=kind, error_class=error_class, message=message, topic=topic, partition=partition,
        offset=offset, key=msg.key(), value=msg.value(),
        headers=list(headers.items() if isinstance(headers, dict) else headers),
    )
