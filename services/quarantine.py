"""Quarantine: the data behind every candidate the gate rejected as regressed, exactly.

``flywheel quarantine`` reads ``checkpoints`` and, for each regressed (or invalid) candidate,
lists the lineage the trainer left behind: the candidate and its unpromoted ancestors back to
the last promoted version, with the offset ranges each was trained on (``trained_on``) and
where those samples came from (``provenance``: router and filter policy hashes, scorer
versions, environments). ``--records FILE`` also reads those ranges of the ``accepted.*``
topics and writes one JSON line per record, so an operator can look at the data, or replay
the ranges under a stricter policy (``flywheel replay``), instead of guessing.

The trainer never trains on those offsets again: its consumer group moved past them when the
rejected candidate was committed, and a rollback continues from the promoted version's
weights with the offsets that follow (the lineage stays exact).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition
from rich.table import Table

from schemas import CheckpointEvent, OffsetRange, RoutedSample
from services.common.checkpoints import CheckpointFollower
from services.common.config import KafkaSettings
from services.common.signing import Verifier


@dataclass
class Quarantined:
    """One rejected candidate and the lineage behind it since the last promoted version."""

    model: str
    version: int
    rejection: str
    reason: str
    since: int | None
    """The promoted ancestor the lineage starts from (None: unknown)."""
    lineage: list[int]
    """The candidate and its unpromoted ancestors, newest first."""
    trained_on: list[OffsetRange]
    provenance: dict[str, Counter[str]] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(r.end - r.start for r in self.trained_on)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "rejection": self.rejection,
                "reason": self.reason, "since": self.since, "lineage": self.lineage,
                "samples": self.samples,
                "trained_on": [r.model_dump() for r in self.trained_on],
                "provenance": {k: dict(v) for k, v in self.provenance.items()}}

    def top(self, kind: str, width: int = 12) -> str:
        """The three commonest sources of one ``kind``, one per line."""
        return "\n".join(f"{k[:width]} x{n}" for k, n in
                         self.provenance.get(kind, Counter()).most_common(3)) or "-"


def table(entries: list[Quarantined]) -> Table:
    """``flywheel quarantine``'s view: one row per rejected candidate."""
    out = Table("model", "version", "kind", "lineage", "records", "router policy",
                "filter policy", "scorers", "ranges", title="quarantined data")
    for q in entries:
        since = f"v{q.since}" if q.since is not None else "?"
        out.add_row(q.model, str(q.version), q.rejection,
                    f"{since} -> v" + ", v".join(map(str, reversed(q.lineage))),
                    str(q.samples), q.top("router_policy"), q.top("filter_policy"),
                    q.top("scorer", 24),
                    "\n".join(f"{r.topic}[{r.partition}] {r.start}..{r.end}"
                              for r in q.trained_on[:6])
                    + ("\n..." if len(q.trained_on) > 6 else ""))
    return out


class _All:
    def __init__(self) -> None:
        self.events: list[CheckpointEvent] = []

    def offer(self, event: CheckpointEvent) -> None:
        self.events.append(event)


def quarantined(kafka: KafkaSettings, topic: str, verifier: Verifier, *,
                model: str | None = None,
                kinds: tuple[str, ...] = ("regressed", "invalid")) -> list[Quarantined]:
    """Every rejected candidate of ``kinds`` (of ``model``, or all), oldest first."""
    everything = _All()
    follower = CheckpointFollower(kafka, topic, everything, verifier=verifier)
    try:
        follower.catch_up(timeout=120)
    finally:
        follower.stop()
    candidates: dict[tuple[str, int], CheckpointEvent] = {}
    promoted: set[tuple[str, int]] = set()
    rejected: list[CheckpointEvent] = []
    for e in everything.events:
        key = (e.model, e.version)
        if e.status == "candidate":
            candidates[key] = e
        elif e.status == "promoted":
            promoted.add(key)
        elif (e.rejection or "regressed") in kinds and (model is None or e.model == model):
            rejected.append(e)
    out = []
    for e in sorted(rejected, key=lambda e: (e.model, e.version)):
        lineage: list[int] = []
        ranges: list[OffsetRange] = []
        provenance: dict[str, Counter[str]] = {}
        v: int | None = e.version
        while v is not None and (e.model, v) not in promoted and (e.model, v) in candidates:
            cand = candidates[e.model, v]
            lineage.append(v)
            ranges.extend(cand.trained_on)
            for kind, counts in cand.provenance.items():
                provenance.setdefault(kind, Counter()).update(counts)
            v = cand.parent_version
        out.append(Quarantined(e.model, e.version, e.rejection or "regressed", e.reason or "",
                               v if v is not None and (e.model, v) in promoted else None,
                               lineage, _merge(ranges), provenance))
    return out


def _merge(ranges: list[OffsetRange]) -> list[OffsetRange]:
    """Adjacent ranges of one partition joined (a lineage's rounds tile the input)."""
    out: list[OffsetRange] = []
    for r in sorted(ranges, key=lambda r: (r.topic, r.partition, r.start)):
        last = out[-1] if out else None
        if last is not None and (last.topic, last.partition) == (r.topic, r.partition) \
                and last.end >= r.start:
            out[-1] = last.model_copy(update={"end": max(last.end, r.end)})
        elif r.end > r.start:
            out.append(r)
    return out


def read_records(kafka: KafkaSettings, ranges: list[OffsetRange], timeout: float = 60.0
                 ) -> list[tuple[OffsetRange, int, RoutedSample | None, bytes]]:
    """The committed records of ``ranges``: (range, offset, parsed or None, raw value)."""
    consumer = Consumer(kafka.client_config() | {
        "group.id": "flywheel-quarantine-reader", "enable.auto.commit": False,
        "isolation.level": "read_committed", "enable.partition.eof": True})
    out: list[tuple[OffsetRange, int, RoutedSample | None, bytes]] = []
    try:
        for r in ranges:
            consumer.assign([TopicPartition(r.topic, r.partition, r.start)])
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                msg = consumer.poll(1.0)
                if msg is None:
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        break
                    raise RuntimeError(f"reading {r.topic}[{r.partition}]: {err}")
                offset = msg.offset() or 0
                if offset >= r.end:
                    break
                value = msg.value() or b""
                try:
                    parsed: RoutedSample | None = RoutedSample.from_bytes(value)
                except ValueError:
                    parsed = None
                out.append((r, offset, parsed, value))
            else:
                raise TimeoutError(f"could not read {r.topic}[{r.partition}] "
                                   f"{r.start}..{r.end} in {timeout:.0f} s")
    finally:
        consumer.close()
    return out


def write_records(kafka: KafkaSettings, entries: list[Quarantined], path: Path) -> int:
    """One JSON line per record behind ``entries``; returns how many."""
    n = 0
    with path.open("w", encoding="utf-8") as out:
        for q in entries:
            for r, offset, sample, raw in read_records(kafka, q.trained_on):
                line: dict[str, Any] = {"model": q.model, "rejected_version": q.version,
                                        "topic": r.topic, "partition": r.partition,
                                        "offset": offset}
                if sample is None:
                    line["invalid"] = raw.decode("utf-8", "replace")
                else:
                    first = sample.samples[0]
                    line |= {"stage": sample.stage, "router_policy": sample.policy_name,
                             "router_policy_hash": sample.policy_hash,
                             "filter_policy_hash": sample.filter_policy_hash,
                             "scorers": [f"{s.scorer}@{s.version}" for s in first.scores],
                             "task_id": first.trajectory.task.task_id,
                             "env": first.trajectory.task.env,
                             "verdicts": [s.verdict for s in sample.samples],
                             "rewards": [s.reward for s in sample.samples],
                             "completions": [s.trajectory.completion for s in sample.samples]}
                out.write(json.dumps(line) + "\n")
                n += 1
    return n
