"""An independent accounting of a flywheel's topics after faults: its own consumers, each record
decoded here (tests/faults, tests/containers).

- every ``raw`` record before the scorer's committed offset is scored exactly once, or
  dead-lettered (by source offset);
- every ``scored`` record before the filter's committed offset ends in exactly one of
  ``filtered``, ``rejected`` or ``dlq``, or waits in the filter's state (an open group); a
  trajectory is accepted at most once, and the ``repeats`` named are decided (rejected as
  duplicates if they are decided twice);
- no trajectory twice in one ``accepted.*`` stage;
- the trainer's candidate versions are 1..N, and their ``trained_on`` ranges tile each input
  partition from 0 to the trainer's committed offset: no gap, no overlap.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Collection
from typing import Any

from schemas import CheckpointEvent, FilterDecision, RoutedSample, ScoredTrajectory, Trajectory
from tests.kafka import Broker


def header(msg: Any, name: str) -> str:
    return next((v.decode() for k, v in msg.headers() or [] if k == name), "")


class Accounting:
    def __init__(self, kafka: Broker, prefix: str) -> None:
        self.kafka, self.prefix = kafka, prefix
        self.checked = 0
        self.dead: dict[tuple[str, int, int], list[Any]] = defaultdict(list)
        for m in kafka.read_all(prefix + "dlq"):
            where = (header(m, "flywheel-source-topic"),
                     int(header(m, "flywheel-source-partition")),
                     int(header(m, "flywheel-source-offset")))
            self.dead[where].append(m)

    def read(self, topic: str) -> list[Any]:
        records = self.kafka.read_all(self.prefix + topic)
        self.checked += len(records)
        return records

    def alive(self, topic: str) -> list[Any]:
        """The records of ``topic`` that were not dead-lettered."""
        return [m for m in self.read(topic)
                if (m.topic(), m.partition(), m.offset()) not in self.dead]

    def before_committed(self, topic: str, group: str) -> list[Any]:
        """The records of ``topic`` the group has committed past, dead letters left out."""
        committed = self.kafka.committed(self.prefix + group, self.prefix + topic)
        return [m for m in self.alive(topic) if m.offset() < committed[m.partition()]]

    def pending_in_filter(self) -> Counter[str]:
        """Trajectories waiting in the filter's open groups (the changelog's latest values)."""
        latest: dict[bytes, bytes | None] = {}
        for m in self.kafka.read_all(self.prefix + "filter.state"):
            latest[m.key()] = m.value()
        return Counter(json.loads(v)["trajectory"]["event_id"] for k, v in latest.items()
                       if v is not None and k.startswith(b"member/"))


def account(books: Accounting, repeats: Collection[str] = ()) -> dict[str, int]:
    """Every check of the module's docstring, over the topics as they are now (the services
    stopped, or at least quiet); the counts checked, by what they count."""
    kafka, prefix = books.kafka, books.prefix

    # raw -> scored: each raw record the scorer committed past is scored exactly once.
    raw = Counter(str(Trajectory.from_bytes(m.value()).event_id)
                  for m in books.before_committed("raw", "scorer"))
    scored = Counter(str(ScoredTrajectory.from_bytes(m.value()).trajectory.event_id)
                     for m in books.alive("scored"))
    assert raw == scored, (f"raw {sum(raw.values())} vs scored {sum(scored.values())}; "
                           f"differ on {len(set(raw) ^ set(scored))} ids")

    # scored -> exactly one of filtered, rejected, dlq (or still in an open group).
    expected = Counter(str(ScoredTrajectory.from_bytes(m.value()).trajectory.event_id)
                       for m in books.before_committed("scored", "filter"))
    decisions = [FilterDecision.from_bytes(m.value())
                 for topic in ("filtered", "rejected") for m in books.alive(topic)]
    decided = Counter(str(d.scored.trajectory.event_id) for d in decisions)
    pending = books.pending_in_filter()
    assert decided + pending == expected, (
        f"decided {sum(decided.values())} + pending {sum(pending.values())} vs "
        f"{sum(expected.values())} scored")
    accepted = Counter(str(d.scored.trajectory.event_id) for d in decisions if d.accepted)
    assert not accepted or max(accepted.values()) == 1
    for ident in repeats:
        mine = [d for d in decisions if str(d.scored.trajectory.event_id) == ident]
        if len(mine) > 1:  # the repeat decided too: rejected as a duplicate
            assert sum(d.accepted for d in mine) <= 1
            assert any("duplicate" in d.reasons for d in mine), [d.reasons for d in mine]
    repeated_decided = sum(1 for i in repeats if decided[i] + pending[i] > 1)
    assert repeated_decided == len(repeats), (repeated_decided, len(repeats))

    # No trajectory twice in one accepted stage.
    routed: dict[str, int] = {}
    for stage in ("cpt", "sft", "rl"):
        ids = Counter(str(s.trajectory.event_id)
                      for m in books.alive(f"accepted.{stage}")
                      for s in RoutedSample.from_bytes(m.value()).samples)
        routed[stage] = sum(ids.values())
        assert not ids or max(ids.values()) == 1, (stage, ids.most_common(3))

    # Candidates 1..N; trained_on tiles each partition from 0 to the committed offset.
    events = [CheckpointEvent.from_bytes(m.value()) for m in books.alive("checkpoints")]
    candidates = [e for e in events if e.status == "candidate"
                  and e.producer is not None and e.producer.service == "trainer"]
    assert [e.version for e in candidates] == list(range(1, len(candidates) + 1))
    tiles: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)
    for e in candidates:
        for r in e.trained_on:
            tiles[r.topic, r.partition].append((r.start, r.end))
    for stage in ("cpt", "sft", "rl"):
        topic = f"{prefix}accepted.{stage}"
        committed = kafka.committed(f"{prefix}trainer", topic)
        first = {}  # the first committed record of each partition (aborted ones come before)
        for m in kafka.read_all(topic):
            first.setdefault(m.partition(), m.offset())
        for partition, end in committed.items():
            spans = tiles.get((topic, partition), [])
            if not spans:
                assert end == 0 or end <= first.get(partition, end), (topic, partition, end)
                continue
            assert spans[0][0] <= first.get(partition, spans[0][0]), (topic, partition, spans)
            position = spans[0][0]
            for start, stop in spans:
                assert start == position, (topic, partition, spans)  # no gap, no overlap
                position = stop
            assert position == end, (topic, partition, position, end)
    return {"records read": books.checked, "raw scored": sum(raw.values()),
            "decided": sum(decided.values()), "pending in the filter": sum(pending.values()),
            "accepted": sum(accepted.values()),
            **{f"routed {stage}": n for stage, n in routed.items()},
            "candidates": len(candidates), "repeats decided": repeated_decided,
            "dead letters": sum(map(len, books.dead.values()))}
