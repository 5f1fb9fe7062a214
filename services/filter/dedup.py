"""Duplicate memory of one task: fingerprints and MinHash signatures of accepted samples.

Stored in the filter's partition state as plain JSON (see :mod:`services.common.state`), so it
is restored with the partition. The scope is the task: every sample of a task is in one
partition (records are keyed by ``task_id``), so the memory is complete whichever instance
owns the partition. Within a task the memory is bounded (``memory_per_task``), small enough
to compare against every entry: a MinHash LSH index would save nothing at that size and its
buckets would have to be kept in step with undo and restore.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from datasketch import MinHash

from services.common.text import normalize


@dataclass(frozen=True, slots=True)
class Fingerprint:
    exact: str
    """16 hex digits of sha256 over the normalized text."""
    signature: np.ndarray
    """MinHash hash values (uint32)."""

    def encoded(self) -> str:
        return base64.b64encode(self.signature.astype("<u4").tobytes()).decode()


@lru_cache(maxsize=8)
def _hasher(num_perm: int) -> MinHash:
    """One MinHash per ``num_perm``, cleared and reused for every text: building one costs
    more than hashing a short completion. crc32 as the base hash: ~10x cheaper per shingle
    than datasketch's default sha1, and the MinHash permutations on top of it supply the
    independence."""
    return MinHash(num_perm=num_perm, seed=1, hashfunc=zlib.crc32)


def fingerprint(text: str, *, num_perm: int, shingle: int) -> Fingerprint:
    norm = normalize(text)
    exact = hashlib.sha256(norm.encode()).hexdigest()[:16]
    grams = {norm[i:i + shingle] for i in range(max(1, len(norm) - shingle + 1))}
    mh = _hasher(num_perm)
    mh.clear()
    mh.update_batch([g.encode() for g in grams])
    return Fingerprint(exact, mh.hashvalues.astype(np.uint32))


def decode_signature(data: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype="<u4")


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """MinHash estimate of the Jaccard similarity of the two shingle sets."""
    if a.shape != b.shape:
        return 0.0  # signatures of another num_perm: not comparable
    return float(np.count_nonzero(a == b)) / len(a)


class Memory:
    """The entries of one task: [exact, signature (base64), group id, event time (s)], oldest
    first. Entries written before times were kept have three fields: their time is unknown,
    so every horizon holds them.

    The signatures are decoded once into one matrix (a row per entry), and a look-up compares
    a signature with every row in one numpy operation. Nothing is changed in place: ``entries``
    (what the state holds) and the arrays are new objects after each :meth:`add`, so a copy
    (:meth:`copy`) shares them safely."""

    __slots__ = ("_exact", "_held", "_matrix", "_times", "_width", "entries")

    def __init__(self, entries: list[list[Any]]) -> None:
        self.entries = entries
        self._exact = {e[0] for e in entries}
        self._width = -1
        self._matrix = np.zeros((0, 0), dtype=np.uint32)
        self._times = np.zeros(0)
        self._held = np.zeros(0, dtype=bool)

    def copy(self) -> Memory:
        other = Memory.__new__(Memory)
        for name in Memory.__slots__:
            setattr(other, name, getattr(self, name))
        return other

    def _decoded(self, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The signatures of ``width`` values as rows; each row's time (NaN: unknown); which
        rows have that width (signatures of another num_perm are never similar)."""
        if self._width != width:
            n = len(self.entries)
            matrix = np.zeros((n, width), dtype=np.uint32)
            times = np.full(n, np.nan)
            held = np.zeros(n, dtype=bool)
            for i, e in enumerate(self.entries):
                row = decode_signature(e[1])
                if len(row) == width:
                    matrix[i], held[i] = row, True
                if len(e) >= 4:
                    times[i] = float(e[3])
            self._width, self._matrix, self._times, self._held = width, matrix, times, held
        return self._matrix, self._times, self._held

    def match(self, fp: Fingerprint, *, exact: bool, near: bool, threshold: float, at: float,
              horizon: float | None) -> tuple[str, float] | None:
        """('duplicate', 1.0) or ('near_duplicate', similarity) or None, against the entries
        of less than ``horizon`` seconds before ``at`` (all with no horizon; entries after
        ``at`` always hold, so a late sample never repeats a newer one)."""
        if not self.entries or not (near or (exact and fp.exact in self._exact)):
            return None
        width = len(fp.signature)
        matrix, times, same_width = self._decoded(width)
        recent = np.ones(len(times), dtype=bool) if horizon is None else \
            np.isnan(times) | (at - times < horizon)
        if exact and fp.exact in self._exact and any(
                e[0] == fp.exact for e, r in zip(self.entries, recent, strict=True) if r):
            return "duplicate", 1.0
        rows = recent & same_width
        if near and rows.any():
            best = float(np.count_nonzero(matrix[rows] == fp.signature, axis=1).max()) / width
            if best >= threshold:
                return "near_duplicate", best
        return None

    def add(self, fp: Fingerprint, group_id: str, at: float, cap: int) -> None:
        width = len(fp.signature)
        matrix, times, held = self._decoded(width)
        drop = max(0, len(self.entries) + 1 - cap)
        self.entries = [*self.entries, [fp.exact, fp.encoded(), group_id, at]][drop:]
        self._exact = {e[0] for e in self.entries}
        self._matrix = np.concatenate([matrix, fp.signature.reshape(1, width)])[drop:]
        self._times = np.append(times, at)[drop:]
        self._held = np.append(held, True)[drop:]


class Memories:
    """The decoded memory of recently seen tasks, kept between groups so that a task's
    signatures are decoded once, not at every group. An entry is used only while the state
    still holds the very value it was decoded from (a restore or an undo replaces it)."""

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._cache: OrderedDict[str, tuple[Any, Memory]] = OrderedDict()

    def get(self, task_id: str, value: Any) -> Memory:
        found = self._cache.get(task_id)
        if found is not None and found[0] is value:
            self._cache.move_to_end(task_id)
            return found[1].copy()
        return Memory([list(e) for e in value["entries"]] if value is not None else [])

    def put(self, task_id: str, value: Any, memory: Memory) -> None:
        self._cache[task_id] = (value, memory)
        self._cache.move_to_end(task_id)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
