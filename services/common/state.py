"""Keyed stage state that survives restarts and moves with its partitions.

Some stages must remember: the filter its dedup memory and the groups it is assembling, the
router the RL groups it is assembling. Their state is partitioned exactly like their input:
the state of input partition ``p`` lives in memory on the instance that owns ``p``, and every
change to it is also written to partition ``p`` of a compacted *changelog* topic, inside the
same Kafka transaction as the batch's outputs and input offsets (Kafka Streams' design). So:

- after a crash, the state a new owner restores from the changelog is exactly the state that
  goes with the committed input offsets: no decision is lost or taken twice;
- when a partition moves to another instance, the new owner restores it the same way;
- a batch whose transaction aborts is discarded by restoring its partitions again.

Within a batch, changes are journaled so that the runtime can undo what a failing ``process``
call did before it re-runs records one by one (see :func:`services.common.stage.apply_stage`).

Values are JSON: anything ``json.dumps`` takes, or a pydantic model, kept as the object and
encoded only when the batch's changelog is written (a value put and deleted within one batch,
as a group whose members arrive together, is never encoded). A restored value is what the
JSON decodes to: a stage that puts a model validates a ``dict`` it gets back (see
:func:`as_model`). A value is never changed in place once put (put a new one instead): the
store may reuse the encoding it made of it earlier in the batch. Keys are strings; a stage
picks a prefix per kind of entry (``"group/<id>"``...) and scans them with
:meth:`PartitionState.keys`.

Formats change: a stage that renames its keys or fields gives its store an ``upgrade``
(:class:`Renames`), which reads entries written in the older format as they are restored.
The changelog is rewritten with the first transaction that changes anything afterwards: the
old key deleted, the new one written, so that a key deleted later in the new format is not
brought back by its old copy at the next restore.

Over 300 lines: the journal, the changelog records a batch makes of it, the restore and the
reader of older formats are one contract (memory equals what the changelog holds, after any
batch, abort or restore), and each part is written against the others.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import msgspec
from confluent_kafka import Consumer, KafkaException, TopicPartition
from pydantic import BaseModel

from schemas import fast
from services.common.config import ServiceSettings
from services.common.errors import FatalRuntimeError
from services.common.offsets import high_watermarks
from services.common.state_storage import DiskDatabase, DiskTable, MemoryTable, encode

Table = MemoryTable | DiskTable

log = logging.getLogger(__name__)

_ABSENT = object()
M = TypeVar("M", bound=BaseModel)
R = TypeVar("R", bound=fast.Received)


def as_model(model: type[M], value: Any) -> M:
    """A state value put as a ``model``: the object itself, or validated from its restored
    JSON."""
    return value if isinstance(value, model) else model.model_validate(value)


def as_record(type_: type[R], value: Any) -> R:
    """A state value put as a record of the hot path (:mod:`schemas.fast`): the object itself,
    or decoded from its restored JSON (written by this version as the bytes the record was
    read as, by an older one as its pydantic model: the same wire format)."""
    if isinstance(value, type_):
        return value
    return cast(R, fast.decoder(type_)(msgspec.json.encode(value)))


class PartitionState:
    """The state of one input partition: a dict of JSON values."""

    __slots__ = ("_data", "_store", "partition")

    @property
    def assigned_at(self) -> float:
        """Wall time this instance took the partition (restored it): not persisted."""
        return self._store._assigned_at.get(self.partition, 0.0)

    def __init__(self, store: StateStore, partition: int, data: Table) -> None:
        self._store = store
        self.partition = partition
        self._data = data

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def put(self, key: str, value: Any) -> None:
        self._store._journal.append((self.partition, key, self._data.get(key, _ABSENT)))
        self._data[key] = value

    def delete(self, key: str) -> None:
        if key in self._data:
            self._store._journal.append((self.partition, key, self._data.pop(key)))

    def keys(self, prefix: str = "") -> list[str]:
        """Keys starting with ``prefix`` (a copy: safe to mutate while iterating); for few
        entries (groups assembling): :meth:`scan` for many."""
        return self._data.keys_with(prefix)

    def scan(self, prefix: str) -> Iterator[tuple[str, Any]]:
        """(key, value) of every entry under ``prefix``, read as it goes: on disk the entries
        are never all in memory. Safe to put and delete meanwhile."""
        return self._data.scan(prefix)


def disk_for(settings: ServiceSettings, changelog_topic: str) -> DiskDatabase | None:
    """The RocksDB of a store, when ``settings.state`` asks for one: in a folder of this
    instance (its transactional id) and changelog, so no two live processes share one, and
    a restarted instance reuses (wipes) its own."""
    if settings.state.backend == "memory":
        return None
    root = settings.state.dir or Path(tempfile.gettempdir()) / "flywheel-state"
    return DiskDatabase(root / settings.transactional_id / changelog_topic,
                        settings.state.memory_mb)


class StateStore:
    """Every partition's state for one stage, and the changelog that makes it durable.

    The runtime owns the lifecycle: :meth:`restore` on assignment, :meth:`drop` on
    revocation, :meth:`begin` / :meth:`changes` around each batch, :meth:`mark` /
    :meth:`undo` around each ``process`` call. Stages only use :meth:`partition`.
    """

    def __init__(self, changelog_topic: str,
                 upgrade: Callable[[str, Any], tuple[str, Any] | None] | None = None,
                 disk: DiskDatabase | None = None) -> None:
        self.changelog_topic = changelog_topic
        self._upgrade = upgrade
        self._disk = disk
        """Where the partitions' entries live; None: in memory (services.common.state_storage)."""
        self._rewrite: dict[tuple[int, str], None] = {}
        """Keys upgraded at restore (old and new): rewritten in the changelog with the next
        batch's changes."""
        self._parts: dict[int, Table] = {}
        self._kept: dict[int, int] = {}
        """Partitions kept on disk at a clean stop, with their changelog offsets (keep)."""
        self.last_restore: dict[str, float] = {}
        """What the last :meth:`restore` did: partitions, how many from a local checkpoint,
        keys read from the changelog, seconds."""
        self._assigned_at: dict[int, float] = {}
        self._journal: list[tuple[int, str, Any]] = []
        self._sized: dict[tuple[int, str], tuple[Any, bytes]] = {}
        """(partition, key) -> (value, its encoding) measured by :meth:`largest_change` in
        this batch, so that :meth:`changes` does not encode it again."""

    # -- used by stages ----------------------------------------------------------------------

    def partition(self, partition: int) -> PartitionState:
        """The state of an owned input partition."""
        try:
            return PartitionState(self, partition, self._parts[partition])
        except KeyError:
            raise KeyError(f"partition {partition} is not owned by this instance") from None

    def owned(self) -> list[int]:
        return sorted(self._parts)

    def adopt(self, partition: int, data: dict[str, Any] | None = None) -> None:
        """Own ``partition`` with ``data`` (empty by default); :meth:`restore` does this from
        the changelog, tests and tools directly."""
        table = self._table(partition)
        for key, value in (data or {}).items():
            table[key] = value
        table.settle({})
        self._parts[partition] = table
        self._assigned_at[partition] = time.time()

    def _table(self, partition: int) -> Table:
        """An empty table for ``partition`` (on disk: its old entries cleared)."""
        if self._disk is None:
            return MemoryTable()
        table = self._disk.table(partition)
        table.clear_all()
        return table

    def close(self) -> None:
        """Release the disk (its content is a copy of the changelog's): kept with a local
        checkpoint of the partitions :meth:`keep` named, deleted otherwise."""
        if self._disk is not None:
            self._disk.close(self._kept)
            self._kept = {}

    @property
    def on_disk(self) -> bool:
        return self._disk is not None

    def keep(self, offsets: dict[int, int]) -> None:
        """At a clean stop, every change committed: the owned partitions' entries are what the
        changelog holds up to ``offsets`` (its end offset of each). On disk they are kept,
        for the next restore on this disk to read only what comes after; a partition given
        up after this keeps its entries."""
        if self._disk is not None:
            self._kept = {p: o for p, o in offsets.items() if p in self._parts}

    # -- used by the runtime -----------------------------------------------------------------

    def begin(self) -> None:
        """Start a batch: from here, every change is journaled."""
        self._journal = []
        self._sized = {}

    def mark(self) -> int:
        return len(self._journal)

    def undo(self, mark: int) -> None:
        """Revert every change made since ``mark``."""
        while len(self._journal) > mark:
            partition, key, old = self._journal.pop()
            data = self._parts.get(partition)
            if data is None:
                continue
            if old is _ABSENT:
                data.pop(key, None)
            else:
                data[key] = old

    def largest_change(self, mark: int) -> int:
        """Encoded size of the largest value changed since ``mark`` (0 if none): the runtime
        keeps changelog records under ``max_record_bytes``."""
        largest = 0
        for partition, key, _ in self._journal[mark:]:
            data = self._parts.get(partition)
            if data is not None and key in data:
                largest = max(largest, len(self._encoded(partition, key, data[key])))
        return largest

    def _encoded(self, partition: int, key: str, value: Any) -> bytes:
        known = self._sized.get((partition, key))
        if known is not None and known[0] is value:  # values are replaced, never mutated
            return known[1]
        data = encode(value)
        self._sized[partition, key] = (value, data)
        return data

    def changes(self) -> list[tuple[int, str, bytes | None]]:
        """The batch's changelog records: (partition, key, JSON value or None for a delete),
        one per key changed, with its value at the end of the batch."""
        touched: dict[tuple[int, str], None] = {}
        for partition, key, _ in self._journal:
            touched[partition, key] = None
        if touched and self._rewrite:
            # Only with changes of its own: a batch that changes nothing may carry no offsets
            # to fence its transaction with.
            touched = self._rewrite | touched
            self._rewrite = {}
        out: list[tuple[int, str, bytes | None]] = []
        settled: dict[int, dict[str, bytes | None]] = {p: {} for p in self._parts}
        for partition, key in touched:
            data = self._parts.get(partition)
            if data is None:
                continue  # revoked meanwhile: its next owner restores from the changelog
            raw = self._encoded(partition, key, data[key]) if key in data else None
            out.append((partition, key, raw))
            settled[partition][key] = raw
        for partition, encoded in settled.items():
            self._parts[partition].settle(encoded)
        self._journal = []
        self._sized = {}
        return out

    def drop(self, partitions: list[int]) -> None:
        for p in partitions:
            table = self._parts.pop(p, None)
            if table is not None and p not in self._kept:
                table.clear_all()
            self._assigned_at.pop(p, None)

    def restore(self, consumer_config: dict[str, Any], partitions: list[int],
                timeout: float) -> None:
        """Rebuild the state of ``partitions`` from the changelog (read_committed, up to its
        end), replacing what is in memory: from the start, or, for a partition the disk holds
        as of a local checkpoint (:class:`~services.common.state_storage.DiskDatabase`), from
        the checkpoint's offset on, over the entries it holds."""
        if not partitions:
            return
        started = time.monotonic()
        for p in partitions:  # what a partition held is replaced, whatever happens next
            self.drop([p])
        marks = high_watermarks(consumer_config, self.changelog_topic, partitions,
                                min(timeout, 30))
        fresh: dict[int, Table] = {}
        starts: dict[int, int] = {}
        for p in partitions:
            low, high = marks.get(p, (0, 0))
            at = self._disk.take(p) if self._disk is not None else None
            if self._disk is not None and at is not None and low <= at <= high:
                fresh[p], starts[p] = self._disk.table(p), at  # kept: only what came after
            else:
                fresh[p], starts[p] = self._table(p), 0
        ends = {p: high for p, (low, high) in marks.items() if high > max(low, starts[p])}
        consumer = Consumer(consumer_config | {
            "group.id": f"{self.changelog_topic}.restore",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        })
        # Keys read, for a partition restored over its kept entries (only they can be in an
        # older format); a count for one read whole (every entry is then looked at).
        loaded: dict[int, set[str] | None] = {p: set() if starts[p] else None
                                               for p in partitions}
        counts = dict.fromkeys(partitions, 0)
        try:
            if ends:
                consumer.assign([TopicPartition(self.changelog_topic, p, starts[p])
                                 for p in ends])
                self._read(consumer, fresh, ends, started + timeout, loaded, counts)
        except KafkaException as exc:
            raise FatalRuntimeError(
                f"cannot restore state from {self.changelog_topic}: {exc.args[0]}") from exc
        finally:
            consumer.close()
        for p, table in fresh.items():
            if self._upgrade is not None:  # kept entries were read in this format already
                self._upgraded(p, table, loaded[p])
            self._parts[p] = table
            self._assigned_at[p] = time.time()
        self._kept = {p: o for p, o in self._kept.items() if p not in partitions}
        read = sum(counts.values())
        kept = sorted(p for p in partitions if starts[p])
        self.last_restore = {"partitions": len(partitions), "from_checkpoint": len(kept),
                             "records_read": read, "seconds": time.monotonic() - started}
        log.info("restored partitions %s from %s in %.2f s: %d changelog records read%s",
                 partitions, self.changelog_topic, time.monotonic() - started, read,
                 f", after the local checkpoint of {kept}" if kept else "")

    def _upgraded(self, partition: int, data: Table, keys: set[str] | None = None) -> None:
        """Read every entry of ``data`` (of ``keys``, when given) in an older format into the
        current one, in place. Where both formats hold a key (versions mixed in one group:
        not supported, but not to be made worse), the current one wins."""
        assert self._upgrade is not None
        old: list[tuple[str, str, Any]] = []
        entries = data.scan("") if keys is None else \
            ((k, data[k]) for k in sorted(keys) if k in data)
        for key, value in entries:  # only the old entries are collected
            new = self._upgrade(key, value)
            if new is not None:
                old.append((key, *new))
        for key, _, _ in old:
            data.pop(key)
        for key, new_key, value in old:
            if new_key not in data:
                data[new_key] = value
            self._rewrite[partition, key] = None
            self._rewrite[partition, new_key] = None
        data.settle({})
        count = len(old)
        if count:
            log.info("read %d state entries of partition %d in an older format; rewritten "
                     "with the next change", count, partition)

    def _read(self, consumer: Consumer, fresh: dict[int, Table], ends: dict[int, int],
              deadline: float, loaded: dict[int, set[str] | None],
              counts: dict[int, int]) -> None:
        """Consume until every partition's position reached its end offset. Under
        read_committed the position also moves past transaction markers and aborted
        records, which is why positions, not record offsets, are compared."""
        waiting = dict(ends)
        while waiting:
            if time.monotonic() > deadline:
                raise FatalRuntimeError(
                    f"state restore from {self.changelog_topic} did not reach the end of "
                    f"partitions {sorted(waiting)} in time (an open transaction?)")
            # consume() waits out its timeout unless it fills the batch: a short one, or the
            # last few records of a restore would cost half a second.
            for msg in consumer.consume(1000, timeout=0.05):
                err = msg.error()
                if err is not None:
                    if err.code() != err._PARTITION_EOF:
                        raise KafkaException(err)
                    continue
                partition, key = cast(int, msg.partition()), cast(bytes, msg.key()).decode()
                fresh[partition].load(key, msg.value())
                counts[partition] += 1
                keys = loaded[partition]
                if keys is not None:
                    keys.add(key)
            positions = consumer.position(
                [TopicPartition(self.changelog_topic, p) for p in waiting])
            for tp in positions:
                if tp.offset >= waiting[tp.partition]:
                    del waiting[tp.partition]


class Renames:
    """An ``upgrade`` for :class:`StateStore`: keys and fields renamed since a format was
    written. ``keys`` maps an old key to its new one, or an old prefix (ending in ``/``) to
    its new prefix; ``fields`` maps, per new prefix or key, old field names of a dict value to
    new ones. An entry in the current format is left alone (None)."""

    def __init__(self, keys: dict[str, str],
                 fields: dict[str, dict[str, str]] | None = None) -> None:
        self.keys, self.fields = keys, fields or {}

    def __call__(self, key: str, value: Any) -> tuple[str, Any] | None:
        for old, new in self.keys.items():
            if old.endswith("/") and key.startswith(old):
                key, renamed_to = new + key[len(old):], new
                break
            if key == old:
                key, renamed_to = new, new
                break
        else:
            return None
        names = self.fields.get(renamed_to)
        if names and isinstance(value, dict):
            value = {names.get(k, k): v for k, v in value.items()}
        return key, value

