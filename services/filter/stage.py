"""The filter's stage: per-sample rules, duplicate memory and group rules, with the policy
hash on every decision.

Samples are decided group by group. A group's members arrive in one partition (keyed by
task), usually together; they wait in partition state until all ``group_size`` are there, or
until ``groups.timeout_seconds`` after the first (then flagged ``incomplete_group``). Then:

1. per-sample rules: ``low_reward``, ``verdict``, ``too_short``, ``too_long``, ``truncated``,
   ``repetitive``, ``stale`` (all that apply are listed);
2. samples that passed them are looked up in the task's duplicate memory, which holds the
   samples accepted earlier: ``duplicate`` (same normalized completion) or
   ``near_duplicate`` (MinHash Jaccard >= threshold). Members of one group are independent
   draws and are not rejected as duplicates of each other (GRPO needs the whole group); a
   repeat inside the group is flagged ``duplicate_in_group`` for the router instead;
3. the accepted samples enter the memory, and the group is flagged ``no_rl_signal`` when
   fewer than two were accepted or their rewards are all equal (DAPO's dynamic sampling).

A sample index seen twice while its group is assembling is rejected as ``duplicate`` at
once. A decided group is remembered (``groups.remember_seconds``): a member arriving after the
decision is decided alone, flagged ``late_member`` and without ``group_accepted`` (so never part
of an RL group); if it was seen before, it is a duplicate of itself in the memory (if it was
accepted) or meets the same rules again: nothing is accepted twice. Timeouts run in event time
(:class:`~services.common.state.EventClock`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

from msgspec import Raw

from schemas.fast import FilterDecisionOut, ScoredTrajectory, count, timestamp, uuid5
from services.common.config import ServiceSettings
from services.common.event_time import EventClock
from services.common.groups import DECIDED, GROUP, MEMBER, Groups
from services.common.metrics import Tally
from services.common.stage import Output
from services.common.state import PartitionState, Renames, StateStore, disk_for
from services.common.text import REPETITION_MEASURE, repetition_ratio
from services.filter import metrics as m
from services.filter.dedup import (
    MINHASH,
    Fingerprint,
    Memories,
    Memory,
    fingerprints,
    upgrade_memory,
)
from services.filter.policy import FilterPolicy

NAMESPACE = uuid.UUID("0b5b8f2e-3c1d-4a8e-9f7a-5d6c2e1b9a40")
"""uuid5 namespace of decision ids: one per (scored trajectory, policy)."""

# The groups' state (group/, member/, decided/) is laid out as services.common.groups says;
# the filter keeps in ``decided/<group id>`` ``{at, indexes}``: the stream time it was
# decided at, and the sample indexes decided since (a repeat of one is a duplicate by
# identity). Written before that as a bare stream time, still read (no indexes known).
SEEN = "seen/"
"""``seen/<task id>``: the task's duplicate memory, ``{entries, minhash}``: the accepted
fingerprints, each with its event time (entries written before times were kept have none),
and the MinHash their signatures were computed with (none: datasketch's, upgraded at
restore)."""
UPGRADE = Renames({"g/": GROUP, "m/": MEMBER, "x/": DECIDED, "d/": SEEN},
                  {GROUP: {"t": "first_at", "n": "size", "have": "indexes"},
                   SEEN: {"e": "entries"}})
"""Reads filter state written before the keys had names (``g/ m/ x/ d/``, fields
``t n have e``)."""


def upgrade(key: str, value: Any) -> tuple[str, Any] | None:
    """Older formats of the filter's state: renamed keys and fields (:data:`UPGRADE`), and a
    task's memory written with another MinHash (:func:`~services.filter.dedup.upgrade_memory`)."""
    renamed = UPGRADE(key, value)
    if renamed is not None:
        key, value = renamed
    if key.startswith(SEEN):
        current = upgrade_memory(value)
        if current is not None:
            return key, current
    return renamed


def state_store(changelog_topic: str, settings: ServiceSettings | None = None) -> StateStore:
    """The filter's state, reading older formats too; on disk when ``settings`` say so."""
    disk = disk_for(settings, changelog_topic) if settings is not None else None
    return StateStore(changelog_topic, upgrade=upgrade, disk=disk)


class FilterStage:
    input_type = ScoredTrajectory
    tick_seconds = 1.0

    def __init__(self, policy: FilterPolicy, policy_hash: str, *, accepted_topic: str,
                 rejected_topic: str, state: StateStore,
                 latest_version: Callable[[str], int | None] = lambda _model: None) -> None:
        self.policy, self.policy_hash = policy, policy_hash
        self.accepted_topic, self.rejected_topic = accepted_topic, rejected_topic
        self.state = state
        self.latest_version = latest_version
        self.clock = EventClock()
        self.groups = Groups(ScoredTrajectory, self.clock)
        self._pending_groups: dict[int, int] = {}
        self._memories = Memories()
        self._tally = Tally()

    # -- the stage protocol -----------------------------------------------------------------

    def process_partition(self, state: PartitionState, batch: Sequence[ScoredTrajectory]
                          ) -> list[Output]:
        with self._tally.batch():
            return self._process(state, batch)

    def _process(self, state: PartitionState, batch: Sequence[ScoredTrajectory]
                 ) -> list[Output]:
        outputs: list[Output] = []
        ats = [timestamp(scored.created_at) for scored in batch]
        now = self.clock.observe(state, ats)  # the batch's stream time, once
        groups = self.groups
        for scored, at in zip(batch, ats, strict=True):
            traj = scored.trajectory
            gid = traj.group_id
            group = groups.assembling(state, gid)
            if group is None:
                decided = groups.decided(state, gid)
                if decided is not None:
                    outputs.extend(self._late(state, scored, decided))
                    continue
                group = groups.new(at, traj.group_size)
            added = groups.add(state, gid, group, traj.sample_index, scored)
            if added is None:
                outputs.append(self._decision(scored, ["duplicate"], [], None))
                self._tally.inc(m.DUPLICATE_HITS, "trajectory_id")
            elif groups.complete(added):
                outputs.extend(self._decide(state, gid, added, now, complete=True))
        return outputs

    def _late(self, state: PartitionState, scored: ScoredTrajectory, decided: Any
              ) -> list[Output]:
        """A member of a group decided already."""
        traj = scored.trajectory
        known = decided.get("indexes") if isinstance(decided, dict) else None
        if known is not None and traj.sample_index in known:
            # The same trajectory again (a generator's at-least-once repeat): however long
            # ago, and whether or not its content is still in the memory.
            self._tally.inc(m.DUPLICATE_HITS, "trajectory_id")
            return [self._decision(scored, ["duplicate"], ["late_member"], None)]
        if known is not None:
            self.groups.mark_decided(state, traj.group_id,
                                     {**decided, "indexes": [*known, traj.sample_index]})
        return self._decide_late(state, scored)

    def tick(self, state: PartitionState, now: float) -> list[Output]:
        with self._tally.batch():
            return self._tick(state, now)

    def _tick(self, state: PartitionState, now: float) -> list[Output]:
        outputs: list[Output] = []
        rule = self.policy.groups
        for group_id, group in self.groups.due(state, rule.timeout_seconds, now):
            outputs.extend(self._decide(state, group_id, group,
                                        max(now, self.clock.stream_time(state)),
                                        complete=False))
        self.groups.forget(state, rule.remember_seconds, now)
        self._pending_groups[state.partition] = self.groups.pending(state)
        m.PENDING_GROUPS.set(sum(self._pending_groups.get(p, 0) for p in self.state.owned()))
        return outputs

    # -- deciding a group -------------------------------------------------------------------

    def _decide(self, state: PartitionState, group_id: str, group: dict[str, Any], now: float,
                *, complete: bool) -> list[Output]:
        members = self.groups.take(state, group_id, group, {
            "at": self.clock.stream_time(state), "indexes": sorted(group["indexes"])})
        p = self.policy
        reasons = [self._rules(s) for s in members]
        fps: list[Fingerprint | None] = [None] * len(members)
        flags: list[list[str]] = [[] for _ in members]
        task_id = members[0].trajectory.task.task_id
        mkey = f"{SEEN}{task_id}"
        memory = self._memories.get(task_id, state.get(mkey))
        looked = [i for i, r in enumerate(reasons) if not r]
        candidates = [members[i] for i in looked]
        found = self._lookup(memory, candidates, self._fingerprints(candidates))
        seen: set[str] = set()
        for i, (fp, hit) in zip(looked, found, strict=True):
            if hit is not None:
                reasons[i].append(hit)
                continue
            if fp is None:
                continue
            fps[i] = fp
            if fp.exact in seen:
                flags[i].append("duplicate_in_group")
            seen.add(fp.exact)
        accepted = [i for i, r in enumerate(reasons) if not r]
        remembered = [(fp, timestamp(members[i].created_at)) for i in accepted
                      if (fp := fps[i]) is not None]
        if remembered:
            memory.add_many([fp for fp, _ in remembered], group_id,
                            [at for _, at in remembered], p.dedup.memory_per_task)
            self._remember(state, task_id, memory)
        rewards = [members[i].reward for i in accepted]
        group_flags = []
        if len(rewards) < 2 or max(rewards) - min(rewards) <= p.groups.min_reward_spread:
            group_flags.append("no_rl_signal")
        if not complete:
            group_flags.append("incomplete_group")
        self._tally.observe(m.GROUP_ASSEMBLY_SECONDS, value=max(0.0, now - group["first_at"]))
        if members:
            m.ACCEPT_RATIO.set(len(accepted) / len(members))
        return [
            self._decision(s, reasons[i], [*flags[i], *group_flags] if not reasons[i] else
                           group_flags, len(accepted))
            for i, s in enumerate(members)
        ]

    def _decide_late(self, state: PartitionState, s: ScoredTrajectory) -> list[Output]:
        """A member of a group decided already: alone, against the rules and the memory."""
        reasons = self._rules(s)
        if not reasons:
            task_id = s.trajectory.task.task_id
            memory = self._memories.get(task_id, state.get(f"{SEEN}{task_id}"))
            [(fp, hit)] = self._lookup(memory, [s], self._fingerprints([s]))
            if hit is not None:
                reasons.append(hit)
            elif fp is not None:
                memory.add(fp, s.trajectory.group_id, timestamp(s.created_at),
                           self.policy.dedup.memory_per_task)
                self._remember(state, task_id, memory)
        return [self._decision(s, reasons, ["late_member"], None)]

    def _remember(self, state: PartitionState, task_id: str, memory: Memory) -> None:
        value = {"entries": memory.entries, "minhash": MINHASH}
        state.put(f"{SEEN}{task_id}", value)
        self._memories.put(task_id, value, memory)

    def _fingerprints(self, samples: list[ScoredTrajectory]) -> list[Fingerprint] | None:
        """The samples' fingerprints, computed together; None with dedup off."""
        d = self.policy.dedup
        if not (d.exact or d.near):
            return None
        return fingerprints([s.trajectory.completion for s in samples], num_perm=d.num_perm,
                            shingle=d.shingle)

    def _lookup(self, memory: Memory, samples: list[ScoredTrajectory],
                fps: list[Fingerprint] | None
                ) -> list[tuple[Fingerprint | None, str | None]]:
        """Each sample's fingerprint (None with dedup off) and duplicate reason, if any."""
        if fps is None:
            return [(None, None)] * len(samples)
        d = self.policy.dedup
        hits = memory.match_many(fps, exact=d.exact, near=d.near, threshold=d.threshold,
                                 ats=[timestamp(s.created_at) for s in samples],
                                 horizon=d.horizon_seconds)
        for hit in hits:
            if hit is not None:
                self._tally.inc(m.DUPLICATE_HITS, hit[0])
        return [(fp, hit[0] if hit is not None else None)
                for fp, hit in zip(fps, hits, strict=True)]

    @staticmethod
    def _repetition(s: ScoredTrajectory, ngram: int) -> float:
        """The repetition ratio of the completion: the scorer's, when it measured the same."""
        for score in s.scores:
            details = score.details
            if details.get("measure") == REPETITION_MEASURE and details.get("ngram") == ngram:
                return score.value
        return repetition_ratio(s.trajectory.completion, ngram)

    def _rules(self, s: ScoredTrajectory) -> list[str]:
        p, t = self.policy, s.trajectory
        reasons = []
        if p.min_reward is not None and s.reward < p.min_reward:
            reasons.append("low_reward")
        if s.verdict not in p.verdicts:
            reasons.append("verdict")
        n = count(t.completion_token_ids) if p.length.unit == "tokens" else None
        if n is None:
            n = len(t.completion)
        if n < p.length.min:
            reasons.append("too_short")
        if p.length.max is not None and n > p.length.max:
            reasons.append("too_long")
        if p.reject_truncated and t.finish_reason == "length":
            reasons.append("truncated")
        if p.repetition is not None and \
                self._repetition(s, p.repetition.ngram) > p.repetition.max_ratio:
            reasons.append("repetitive")
        if p.max_staleness is not None:
            latest = self.latest_version(t.model)
            if latest is not None and latest - t.policy_version > p.max_staleness:
                reasons.append("stale")
        return reasons

    def _decision(self, s: ScoredTrajectory, reasons: list[str], flags: list[str],
                  group_accepted: int | None) -> Output:
        outcome = "+".join(reasons) or "accepted"
        decision = FilterDecisionOut(
            # One id per (sample, policy, outcome): a repeat rejected as a duplicate of its
            # earlier acceptance does not share that acceptance's id.
            event_id=uuid5(NAMESPACE, f"{s.event_id}:{self.policy_hash}:{outcome}"),
            scored=Raw(s.raw), accepted=not reasons, reasons=reasons, flags=flags,
            policy_name=self.policy.name, policy_hash=self.policy_hash,
            group_accepted=group_accepted,
            latest_version=self.latest_version(s.trajectory.model),
        )
        tally = self._tally
        tally.inc(m.DECISIONS, "accepted" if not reasons else "rejected")
        for r in reasons:
            tally.inc(m.REJECTIONS, r)
        for f in flags:
            tally.inc(m.FLAGS, f)
        return Output(self.accepted_topic if not reasons else self.rejected_topic, decision,
                      key=s.trajectory.task.task_id)
