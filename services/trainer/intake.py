"""The trainer's intake: what the next round trains on.

Records of ``accepted.cpt``, ``accepted.sft`` and ``accepted.rl`` (one consumer group,
read_committed) become samples in per-stage buffers, with the offsets ``[committed, next)``
each partition's records span (the candidate's ``trained_on``). A stage whose buffer reached
its quota is paused, so rounds keep the configured mix; within a stage each partition takes
its fair share of the quota while another has records waiting (held partitions are paused
and sought back, so the next round reads them first). A round is due when every stage with a
quota has reached it, or ``max_wait_seconds`` after the first buffered sample with at least
``min_samples``. A record that is not a sample is dead-lettered with the round's commit.

The trainer's loop (:mod:`services.trainer.loop`) polls, hands each record to :meth:`Intake.
take`, calls :meth:`Intake.settle` after each poll and trains when :meth:`Intake.due`; after
the round's transaction, :meth:`Intake.committed_round` starts the next round.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from schemas import RoutedSample
from services.common.batches import dead_letter
from services.common.dlq import DeadLetter
from services.common.health import BrokerHealth
from services.common.membership import Membership
from services.common.stage import DecodeFailure, decode
from services.trainer.data import to_samples
from services.trainer.objectives import Sample
from services.trainer.settings import TrainerSettings

log = logging.getLogger(__name__)

STAGES = ("cpt", "sft", "rl")


@dataclass
class Round:
    """The samples of the next round and where they came from."""

    samples: dict[str, list[Sample]] = field(default_factory=lambda: {s: [] for s in STAGES})
    counts: dict[str, int] = field(default_factory=lambda: {s: 0 for s in STAGES})
    ranges: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    """(topic, partition) -> [start, end): start is where the group was, end the next."""
    first_at: float | None = None
    provenance: dict[str, dict[str, int]] = field(default_factory=dict)
    taken: dict[tuple[str, int], int] = field(default_factory=dict)
    """Samples taken from each input partition (its fair share of a stage's quota)."""
    shared: bool = True
    """Whether the shares apply; lifted when the round waited out max_wait_seconds short of
    min_samples with partitions held at their share."""
    dead: list[DeadLetter] = field(default_factory=list)
    """Records of the round that are not samples: dead-lettered in the round's transaction."""

    def count(self, routed: RoutedSample) -> None:
        """Where its samples came from: environments, policies, scorer versions."""
        found = {"router_policy": [routed.policy_hash],
                 "filter_policy": [routed.filter_policy_hash] if routed.filter_policy_hash
                 else [],
                 "env": [s.trajectory.task.env for s in routed.samples],
                 "replay": [routed.replay] if routed.replay else [],
                 "scorer": [f"{sc.scorer}@{sc.version}" for s in routed.samples[:1]
                            for sc in s.scores]}
        for kind, values in found.items():
            counts = self.provenance.setdefault(kind, {})
            for v in values:
                counts[v] = counts.get(v, 0) + 1

    def empty(self) -> bool:
        return not self.ranges


class Intake:
    """Per-stage buffers over the owned partitions of the ``accepted.*`` topics (``topics``:
    topic -> stage). ``consumer`` is set once subscribed, ``tokenizer`` once the model is
    loaded (samples are tokenized as they are read)."""

    def __init__(self, settings: TrainerSettings, topics: dict[str, str],
                 health: BrokerHealth) -> None:
        self.s = settings
        self.topics = topics
        self.health = health
        self.round = Round()
        self.committed: dict[tuple[str, int], int] = {}
        """Each owned partition's committed offset: where its next range starts."""
        self.members = Membership(assigned=self.on_assign, released=self.on_release)
        self.consumer: Consumer | None = None
        self.tokenizer: Any = None
        self._paused: set[str] = set()
        self._held: set[tuple[str, int]] = set()

    def subscribe(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.members.subscribe(consumer, list(self.topics))

    def settle(self) -> None:
        """After each poll: held partitions rejoin when no other has records waiting, and
        stages whose quota is full are paused."""
        self._release_held()
        self._pause_full()

    def keep_membership(self) -> None:
        """A poll that hands out no record, for the middle of a round: every owned partition
        paused for it, then resumed unless the intake itself holds it paused. It keeps this
        member in its group (librdkafka drops one that has not polled for
        ``max.poll.interval.ms``, and the round's commit would then be refused) and serves a
        rebalance, if one is under way, as a poll between rounds would."""
        consumer = self.consumer
        assert consumer is not None
        consumer.pause(self.members.partitions())
        msg = consumer.poll(0)
        if msg is not None and msg.error() is None:  # fetched before the pause: read it later
            consumer.seek(TopicPartition(cast(str, msg.topic()), cast(int, msg.partition()),
                                         cast(int, msg.offset())))
        full = {t for t, stage in self.topics.items() if stage in self._paused}
        consumer.resume([tp for tp in self.members.partitions() if tp.topic not in full
                         and (tp.topic, tp.partition) not in self._held])

    def committed_round(self) -> None:
        """The round's offsets are committed: its ranges' ends are the partitions' committed
        offsets, and a new round starts with every paused and held partition resumed."""
        for tp, (_, end) in self.round.ranges.items():
            self.committed[tp] = end
        self.round = Round()
        self._resume_paused()

    def take(self, msg: Any) -> None:
        """One record of an ``accepted.*`` topic: into the round, held back for the next one
        (its stage's quota or its partition's share is full), or dead-lettered with it."""
        r = self.round
        tp = (cast(str, msg.topic()), cast(int, msg.partition()))
        if tp not in self.members.owned:
            return  # revoked during this consume(): its next owner reads it
        offset = cast(int, msg.offset())
        stage = self.topics[tp[0]]
        quota = self.s.quotas.get(stage, 0)
        if tp in self._held or (quota > 0 and (r.counts[stage] >= quota or (
                r.shared and r.taken.get(tp, 0) >= self._share(tp, quota)
                and self._others_waiting(tp)))):
            self._hold(tp, offset)
            return
        span = r.ranges.setdefault(tp, [self.committed.get(tp, offset), offset + 1])
        span[1] = max(span[1], offset + 1)
        if r.first_at is None:
            r.first_at = time.monotonic()
        # A record that is not a sample is dead-lettered with the round: it stays in the
        # round's range (consumed, and visible in the lineage) and reaches `dlq` exactly once.
        try:
            routed = decode(RoutedSample, msg.value())
        except DecodeFailure as exc:
            self._reject(msg, exc.kind, type(exc.cause or exc).__name__, str(exc))
            return
        if routed.stage != stage:
            self._reject(msg, "schema", "WrongStage",
                         f"a {routed.stage!r} sample on the {stage!r} topic")
            return
        try:
            samples = to_samples([routed], self.tokenizer, self.s.optim.max_tokens)
        except (ValueError, TypeError, KeyError, IndexError) as exc:  # this record's content
            self._reject(msg, "stage", type(exc).__name__, str(exc))
            return
        r.samples[stage].extend(samples)
        r.counts[stage] += len(samples)
        r.taken[tp] = r.taken.get(tp, 0) + len(samples)
        r.count(routed)

    def _share(self, tp: tuple[str, int], quota: int) -> int:
        """A partition's share of its stage's quota in one round: the quota over the topic's
        owned partitions, rounded up. A partition past its share is held while another of
        the topic has records waiting (:meth:`_others_waiting`): without it the partition
        whose records the client happens to hand over first fills every round, and the
        others are never trained on (seen: five of six partitions of accepted.rl starved for
        a whole run). With no other waiting, it goes on filling the round."""
        owned = sum(1 for t, _ in self.members.owned if t == tp[0])
        return -(-quota // max(1, owned))

    def _others_waiting(self, tp: tuple[str, int]) -> bool:
        """Whether another owned, unheld partition of the topic has records not yet handed
        over (from the watermarks of the last fetch responses: no request)."""
        assert self.consumer is not None
        others = [TopicPartition(t, p) for t, p in sorted(self.members.owned)
                  if t == tp[0] and p != tp[1] and (t, p) not in self._held]
        if not others:
            return False
        for position in self.consumer.position(others):
            _, high = self.consumer.get_watermark_offsets(
                TopicPartition(position.topic, position.partition), cached=True)
            if high > 0 and (position.offset < 0 or position.offset < high):
                return True
        return False

    def _release_held(self) -> None:
        """A partition held past its share rejoins the round once no other partition of its
        topic has records waiting: shares spread a round over the partitions that have data,
        and never leave it short while data waits (held, the round ran only after
        ``max_wait_seconds``, with fewer samples than its quota)."""
        if not self._held or not self.round.shared:
            return
        self._resume_held([tp for tp in self._held
                           if self.round.counts[self.topics[tp[0]]]
                           < self.s.quotas.get(self.topics[tp[0]], 0)
                           and not self._others_waiting(tp)])

    def _reject(self, msg: Any, kind: str, error_class: str, message: str) -> None:
        letter = dead_letter(msg, kind, error_class, message)
        log.error("dead-lettering the record at %s[%d]@%d: %s: %s", letter.topic,
                  letter.partition, letter.offset, error_class, message[:300])
        self.round.dead.append(letter)

    def _hold(self, tp: tuple[str, int], offset: int) -> None:
        """A record beyond its stage's quota (one consume() can fetch hundreds): not part of
        this round. Its partition is paused and sought back to it, so the next round reads it
        first; the round's range for the partition ends before it."""
        if tp in self._held:
            return
        assert self.consumer is not None
        self._held.add(tp)
        self.consumer.pause([TopicPartition(*tp)])
        self.consumer.seek(TopicPartition(tp[0], tp[1], offset))

    def _pause_full(self) -> None:
        assert self.consumer is not None
        for topic, stage in self.topics.items():
            quota = self.s.quotas.get(stage, 0)
            full = quota > 0 and self.round.counts[stage] >= quota
            if full and stage not in self._paused:
                self.consumer.pause(self.members.partitions(topic))
                self._paused.add(stage)

    def due(self) -> bool:
        r = self.round
        if r.empty() or not any(r.counts.values()):
            return False
        quotas = {st: q for st, q in self.s.quotas.items() if q > 0}
        if quotas and all(r.counts[st] >= q for st, q in quotas.items()):
            return True
        waited = time.monotonic() - (r.first_at or time.monotonic())
        if waited < self.s.max_wait_seconds:
            return False
        if sum(r.counts.values()) >= self.s.min_samples:
            return True
        if r.shared and self._held:  # the data sits in few partitions: take more from them
            r.shared = False
            self._resume_held()
        return False


    def _resume_paused(self) -> None:
        assert self.consumer is not None
        for stage in self._paused:
            topic = next(t for t, st in self.topics.items() if st == stage)
            self.consumer.resume(self.members.partitions(topic))
        self._paused.clear()
        self._resume_held()

    def _resume_held(self, only: list[tuple[str, int]] | None = None) -> None:
        """Resume the held partitions (``only`` those) that are still owned."""
        assert self.consumer is not None
        chosen = set(self._held if only is None else only)
        held = [TopicPartition(*tp) for tp in sorted(chosen) if tp in self.members.owned]
        if held:
            self.consumer.resume(held)
        self._held -= chosen


    # -- rebalance hooks (inside consume(), on the loop's thread) ---------------------------

    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in consumer.committed(partitions, timeout=10):
            if tp.offset >= 0:
                self.committed[tp.topic, tp.partition] = tp.offset

    def on_release(self, consumer: Consumer, partitions: list[TopicPartition],
                    _lost: bool) -> None:
        # Buffered samples were not committed: the next owner (or this instance, after the
        # rebalance) reads them again from the committed offsets.
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self.health.forget(gone)
        staying = [TopicPartition(t, p) for t, p in sorted(self.members.owned - gone)]
        self._held -= gone
        for key in gone:
            self.committed.pop(key, None)
        if not self.round.empty():
            log.info("partitions revoked: dropping %d buffered samples (re-read from the "
                     "committed offsets)", sum(self.round.counts.values()))
            self.round = Round()
            for at in consumer.committed(staying, timeout=10) if staying else []:
                consumer.seek(TopicPartition(at.topic, at.partition, at.offset
                                             if at.offset >= 0 else OFFSET_BEGINNING))
        if staying:  # what stays assigned starts a new round: nothing held back
            consumer.resume(staying)
        self._paused.clear()
        self._held.clear()
