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
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
from rensa import RMinHash

from services.common.text import normalize


@dataclass(frozen=True, slots=True)
class Fingerprint:
    exact: str
    """16 hex digits of sha256 over the normalized text."""
    signature: np.ndarray
    """MinHash hash values (uint32)."""

    def encoded(self) -> str:
        return base64.b64encode(self.signature.astype("<u4").tobytes()).decode()


MINHASH = "poly-fmix64/rensa-r2"
"""The MinHash this filter computes: character shingles hashed by a polynomial over their code
points and MurmurHash3's 64-bit finalizer, then rensa's R-MinHash (algorithm version 2) with
seed 1. Signatures of another MinHash are not comparable: a changed one changes the filter
policy's hash (:data:`services.filter.policy.FilterPolicy.IMPLEMENTATION`) and the state's
format (:func:`upgrade_memory`)."""
SEED = 1
_BASE = 1_000_003
_M1, _M2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)


def _shingle_hashes(norms: list[str], shingle: int) -> tuple[np.ndarray, np.ndarray]:
    """The 64-bit hash of every character shingle of every text, one flat array, and each
    text's row offsets into it. A text shorter than a shingle is one shingle, padded."""
    lengths = np.fromiter((max(len(t), shingle) for t in norms), dtype=np.int64,
                          count=len(norms))
    joined = "".join(t.ljust(shingle, "\0") for t in norms)
    points = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    n = len(points) - shingle + 1
    weights = [np.uint64(pow(_BASE, shingle - 1 - k, 2**64)) for k in range(shingle)]
    h = points[:n] * weights[0]
    for k in range(1, shingle):
        h += points[k:k + n] * weights[k]
    h ^= h >> _S33  # MurmurHash3's fmix64: every input bit moves every output bit
    h *= _M1
    h ^= h >> _S33
    h *= _M2
    h ^= h >> _S33
    counts = lengths - shingle + 1
    offsets = np.zeros(len(norms) + 1, dtype=np.uint64)
    np.cumsum(counts, out=offsets[1:])
    starts = np.cumsum(lengths) - lengths  # where each text starts in ``points``
    first = starts - offsets[:-1].astype(np.int64)
    index = np.repeat(first, counts) + np.arange(int(counts.sum()))
    return h[index], offsets


def fingerprints(texts: list[str], *, num_perm: int, shingle: int) -> list[Fingerprint]:
    """The fingerprints of many texts at once: the shingles of all of them hashed in a few
    numpy operations, the MinHash of all of them in one call into rensa."""
    if not texts:
        return []
    norms = [normalize(t) for t in texts]
    flat, offsets = _shingle_hashes(norms, shingle)
    rows = RMinHash.digest_matrix_from_flat_token_hashes(flat, offsets, num_perm, SEED)
    signatures = np.frombuffer(array("I", chain.from_iterable(rows.to_rows())),
                               dtype=np.uint32).reshape(len(texts), num_perm)
    return [Fingerprint(hashlib.sha256(n.encode()).hexdigest()[:16], signatures[i])
            for i, n in enumerate(norms)]


def fingerprint(text: str, *, num_perm: int, shingle: int) -> Fingerprint:
    return fingerprints([text], num_perm=num_perm, shingle=shingle)[0]


def upgrade_memory(value: Any) -> Any | None:
    """A task's memory written with another MinHash (untagged: datasketch's), in this one's
    format: its entries keep their exact fingerprints, still duplicates of a repeat, and lose
    their signatures, which no signature of this MinHash could be compared with. None when
    it is current."""
    if not isinstance(value, dict) or value.get("minhash") == MINHASH:
        return None
    entries = [[e[0], "", *e[2:]] for e in value.get("entries", [])]
    return {**value, "entries": entries, "minhash": MINHASH}


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
        return self.match_many([fp], exact=exact, near=near, threshold=threshold, ats=[at],
                               horizon=horizon)[0]

    def match_many(self, fps: list[Fingerprint], *, exact: bool, near: bool, threshold: float,
                   ats: list[float], horizon: float | None
                   ) -> list[tuple[str, float] | None]:
        """:meth:`match` for each fingerprint (at its own time), against the memory as it is:
        all of them compared with every entry in one numpy operation."""
        found: list[tuple[str, float] | None] = [None] * len(fps)
        if not self.entries or not fps:
            return found
        width = len(fps[0].signature)
        if any(len(fp.signature) != width for fp in fps):
            raise ValueError("fingerprints of one look-up have one num_perm")
        matrix, times, same_width = self._decoded(width)
        if horizon is None:
            recent = np.ones((len(fps), len(times)), dtype=bool)
        else:
            recent = np.isnan(times)[None, :] | \
                (np.asarray(ats)[:, None] - times[None, :] < horizon)
        if exact:
            for i, fp in enumerate(fps):
                if fp.exact in self._exact and any(
                        e[0] == fp.exact and r for e, r in zip(self.entries, recent[i],
                                                               strict=True)):
                    found[i] = ("duplicate", 1.0)
        if near:
            rows = recent & same_width[None, :]
            signatures = np.stack([fp.signature for fp in fps])
            same = np.count_nonzero(matrix[None, :, :] == signatures[:, None, :], axis=2)
            best = np.where(rows, same, -1).max(axis=1) / width
            for i, similarity in enumerate(best.tolist()):
                if found[i] is None and similarity >= threshold:
                    found[i] = ("near_duplicate", similarity)
        return found

    def add(self, fp: Fingerprint, group_id: str, at: float, cap: int) -> None:
        self.add_many([fp], group_id, [at], cap)

    def add_many(self, fps: list[Fingerprint], group_id: str, ats: list[float], cap: int
                 ) -> None:
        """Remember ``fps`` (in order, at their times), keeping the newest ``cap`` entries."""
        if not fps:
            return
        width = len(fps[0].signature)
        matrix, times, held = self._decoded(width)
        drop = max(0, len(self.entries) + len(fps) - cap)
        self.entries = [*self.entries, *([fp.exact, fp.encoded(), group_id, at]
                                         for fp, at in zip(fps, ats, strict=True))][drop:]
        self._exact = {e[0] for e in self.entries}
        rows = np.stack([fp.signature for fp in fps])
        if rows.shape[1] != width:
            raise ValueError("fingerprints of one addition have one num_perm")
        self._matrix = np.concatenate([matrix, rows])[drop:]
        self._times = np.concatenate([times, np.asarray(ats, dtype=float)])[drop:]
        self._held = np.concatenate([held, np.ones(len(fps), dtype=bool)])[drop:]


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
