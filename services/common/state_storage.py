"""Where a stage's state lives between batches: in memory, or on disk in RocksDB.

:class:`services.common.state.StateStore` keeps one *table* per owned input partition. A table
is a mapping of string keys to JSON values with the few operations a store needs
(``get``, ``in``, set, ``pop``, ``keys_with(prefix)``), plus ``load`` for a restore that feeds
it changelog records as they are read.

- :class:`MemoryTable`: a dict. State grows with what a stage remembers.
- :class:`DiskTable`: the partition's entries in one RocksDB per store (through rocksdict),
  keyed by a 4-byte partition number and the key. Changes made during a batch stay in memory,
  as objects, until the store has encoded them for the changelog; then they are written in one
  write batch (:meth:`DiskTable.settle`). RocksDB's own memory is bounded by
  ``StateSettings.memory_mb``: one write-buffer manager and one block cache for the whole
  database. The changelog stays the source of truth: the database is only ever a copy of
  what it holds. A clean stop keeps the database with a local checkpoint (the changelog
  offset of each partition), so a restart on the same disk reads only what the changelog
  got after it; otherwise (a crash, another disk) the database is wiped when the store opens
  and a partition is restored from the whole changelog.

Keys of a disk table come back sorted (``keys_with``), those of a memory table in insertion
order; no stage depends on either order.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
from pydantic import BaseModel
from rocksdict import (
    BlockBasedOptions,
    Cache,
    Options,
    Rdict,
    WriteBatch,
    WriteBufferManager,
)

from schemas.fast import Received

_ENCODE = msgspec.json.Encoder().encode
_DECODE = msgspec.json.Decoder().decode
"""Plain JSON values (what ``json`` reads and writes), several times faster."""
_MISSING = object()
_GONE = object()


def encode(value: Any) -> bytes:
    """Compact UTF-8 JSON (non-ASCII kept as is: escaping would double CJK text); a model as
    it is written to Kafka; a record of the hot path (:mod:`schemas.fast`) as the bytes it
    was read as."""
    if isinstance(value, Received):
        return value.raw
    if isinstance(value, BaseModel):
        return value.__pydantic_serializer__.to_json(value)
    return _ENCODE(value)


class MemoryTable(dict[str, Any]):
    """A partition's state as a dict."""

    def keys_with(self, prefix: str) -> list[str]:
        return [k for k in self if k.startswith(prefix)]

    def scan(self, prefix: str) -> Iterator[tuple[str, Any]]:
        """(key, value) under ``prefix``; safe to change the table meanwhile."""
        return iter([(k, v) for k, v in self.items() if k.startswith(prefix)])

    def load(self, key: str, raw: bytes | None) -> None:
        if raw is None:
            self.pop(key, None)
        else:
            self[key] = _DECODE(raw)

    def settle(self, encoded: dict[str, bytes | None]) -> None:
        """Nothing to write: the dict is the state."""

    def clear_all(self) -> None:
        self.clear()


CHECKPOINT = "flywheel-checkpoint.json"
"""In a database's folder: the changelog offset of each partition whose entries the database
holds as of that offset (written by a clean stop, :meth:`DiskDatabase.close`)."""
MAX_CHECKPOINT_AGE_SECONDS = 12 * 3600.0
"""An older checkpoint is not trusted: the changelog is compacted, and the broker drops a
delete's tombstone after ``delete.retention.ms`` (a day by default); a copy older than that
could keep an entry the changelog deleted since."""


class DiskDatabase:
    """One RocksDB for every partition of one store, in a folder of its own.

    Its content is a copy of the changelog's. A clean stop leaves it on disk with a local
    checkpoint (:data:`CHECKPOINT`: each partition's changelog offset it is a copy as of); the
    next open on the same disk keeps those partitions, so their restore reads only the
    changelog written after (:meth:`take`). The checkpoint is deleted as the database opens:
    after a crash there is none, and the folder is wiped, as it is without one."""

    def __init__(self, path: Path, memory_mb: int) -> None:
        self.path = path
        self.kept: dict[int, int] = {}
        """Partitions held as of a local checkpoint, and its changelog offset of each."""
        checkpoint = path / CHECKPOINT
        if checkpoint.exists():
            try:
                saved = json.loads(checkpoint.read_text())
                if time.time() - float(saved["written_at"]) < MAX_CHECKPOINT_AGE_SECONDS:
                    self.kept = {int(p): int(o) for p, o in saved["offsets"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                self.kept = {}  # unreadable: the changelog alone, as after a crash
            checkpoint.unlink()  # from here on, a crash leaves no checkpoint to trust
        if path.exists() and not self.kept:
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        budget = memory_mb * 2**20
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        # One budget: the block cache, with the memtables charged against it (they are
        # flushed to disk beyond half of it).
        cache = Cache(budget)
        opts.set_write_buffer_manager(
            WriteBufferManager.new_write_buffer_manager_with_cache(budget // 2, False, cache))
        opts.set_write_buffer_size(max(budget // 8, 2**20))
        opts.set_max_write_buffer_number(2)
        opts.set_max_open_files(256)
        table = BlockBasedOptions()
        table.set_block_cache(cache)
        table.set_cache_index_and_filter_blocks(True)
        table.set_pin_l0_filter_and_index_blocks_in_cache(True)
        # Most lookups are of keys that are not there (a group not seen yet): a Bloom filter
        # answers those without reading a block.
        table.set_bloom_filter(10, False)
        opts.set_block_based_table_factory(table)
        self.db = Rdict(str(path), opts)

    def table(self, partition: int) -> DiskTable:
        return DiskTable(self.db, partition)

    def take(self, partition: int) -> int | None:
        """The changelog offset ``partition``'s entries are held as of, if the database was
        opened with them from a local checkpoint; once (a later restore reads it all)."""
        return self.kept.pop(partition, None)

    def close(self, checkpoint: dict[int, int] | None = None) -> None:
        """Close; with ``checkpoint`` (partition: changelog offset its entries are a copy as
        of), keep the database for the next open on this disk, else delete it."""
        if not checkpoint:
            self.db.close()
            shutil.rmtree(self.path, ignore_errors=True)
            return
        self.db.flush(True)
        self.db.close()
        tmp = self.path / f"{CHECKPOINT}.tmp"
        with tmp.open("w") as f:
            json.dump({"written_at": time.time(),
                       "offsets": {str(p): o for p, o in sorted(checkpoint.items())}}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / CHECKPOINT)


class DiskTable:
    """A partition's entries in a :class:`DiskDatabase`, with the current batch's changes
    in memory until they are settled."""

    __slots__ = ("_db", "_dirty", "_prefix")

    def __init__(self, db: Rdict, partition: int) -> None:
        self._db = db
        self._prefix = struct.pack(">I", partition)
        self._dirty: dict[str, Any] = {}

    def _key(self, key: str) -> bytes:
        return self._prefix + key.encode()

    def get(self, key: str, default: Any = None) -> Any:
        value = self._dirty.get(key, _MISSING)
        if value is _MISSING:
            raw = self._db.get(self._key(key))
            return default if raw is None else _DECODE(raw)
        return default if value is _GONE else value

    def __contains__(self, key: str) -> bool:
        return self.get(key, _MISSING) is not _MISSING

    def __setitem__(self, key: str, value: Any) -> None:
        self._dirty[key] = value

    def pop(self, key: str, default: Any = None) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            return default
        self._dirty[key] = _GONE
        return value

    def __getitem__(self, key: str) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __len__(self) -> int:
        if not self._dirty:  # counted as it is read: the keys are never all in memory
            return sum(1 for _ in self._stored(b""))
        return len(self.keys_with(""))

    def items(self) -> Iterator[tuple[str, Any]]:
        return self.scan("")

    def scan(self, prefix: str) -> Iterator[tuple[str, Any]]:
        """(key, value) under ``prefix``, read from the database as it goes (so the keys are
        never all in memory), the batch's changes applied; safe to change the table
        meanwhile (changes go to the batch, not to the database being read)."""
        changed = {k: v for k, v in self._dirty.items() if k.startswith(prefix)}
        cut = len(self._prefix)
        start = self._prefix + prefix.encode()
        for raw_key, raw in self._db.items(from_key=start):
            assert isinstance(raw_key, bytes) and isinstance(raw, bytes)  # raw mode
            if not raw_key.startswith(start):
                break
            key = raw_key[cut:].decode()
            value = changed.pop(key, _MISSING)
            if value is _MISSING:
                yield key, _DECODE(raw)
            elif value is not _GONE:
                yield key, value
        for key, value in changed.items():  # new in this batch
            if value is not _GONE:
                yield key, value

    def _stored(self, prefix: bytes) -> Iterator[bytes]:
        start = self._prefix + prefix
        for raw in self._db.keys(from_key=start):
            assert isinstance(raw, bytes)  # raw mode
            if not raw.startswith(start):
                return
            yield raw

    def keys_with(self, prefix: str) -> list[str]:
        """Keys starting with ``prefix``, sorted (a copy: safe to change while iterating)."""
        cut = len(self._prefix)
        keys = {raw[cut:].decode() for raw in self._stored(prefix.encode())}
        for key, value in self._dirty.items():
            if key.startswith(prefix):
                if value is _GONE:
                    keys.discard(key)
                else:
                    keys.add(key)
        return sorted(keys)

    def load(self, key: str, raw: bytes | None) -> None:
        """A changelog record, as a restore reads it: written through."""
        if raw is None:
            self._db.delete(self._key(key))
        else:
            self._db.put(self._key(key), raw)

    def settle(self, encoded: dict[str, bytes | None]) -> None:
        """Write the batch's changes: ``encoded`` holds the changelog's encoding of those it
        has (None: deleted); any other change (one undone to its old value) is encoded here."""
        if not self._dirty:
            return
        batch = WriteBatch(raw_mode=True)
        for key, value in self._dirty.items():
            raw = encoded[key] if key in encoded else (None if value is _GONE
                                                       else encode(value))
            if raw is None:
                batch.delete(self._key(key))
            else:
                batch.put(self._key(key), raw)
        self._db.write(batch)
        self._dirty = {}

    def clear_all(self) -> None:
        """Forget the partition (revoked, or about to be restored)."""
        self._dirty = {}
        end = struct.pack(">I", struct.unpack(">I", self._prefix)[0] + 1)
        self._db.delete_range(self._prefix, end)
