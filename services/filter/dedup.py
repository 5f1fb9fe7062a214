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


@dataclass(slots=True)
class Memory:
    """The entries of one task: [exact, signature (base64), group id, event time (s)], oldest
    first. Entries written before times were kept have three fields: their time is unknown,
    so every horizon holds them."""

    entries: list[list[Any]]

    def match(self, fp: Fingerprint, *, exact: bool, near: bool, threshold: float, at: float,
              horizon: float | None) -> tuple[str, float] | None:
        """('duplicate', 1.0) or ('near_duplicate', similarity) or None, against the entries
        of less than ``horizon`` seconds before ``at`` (all with no horizon; entries after
        ``at`` always hold, so a late sample never repeats a newer one)."""
        entries = self.entries if horizon is None else [
            e for e in self.entries if len(e) < 4 or at - float(e[3]) < horizon]
        if exact and any(e[0] == fp.exact for e in entries):
            return "duplicate", 1.0
        if near:
            best = 0.0
            for e in entries:
                best = max(best, jaccard(fp.signature, decode_signature(e[1])))
            if best >= threshold:
                return "near_duplicate", best
        return None

    def add(self, fp: Fingerprint, group_id: str, at: float, cap: int) -> None:
        self.entries.append([fp.exact, fp.encoded(), group_id, at])
        if len(self.entries) > cap:
            del self.entries[: len(self.entries) - cap]
