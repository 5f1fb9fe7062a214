"""The router's stage: accepted decisions to ``accepted.sft``, ``accepted.cpt`` and
``accepted.rl`` by the routing policy.

SFT and CPT are per sample and routed at once. RL needs the whole group: the filter tells in
every decision how many samples of the group it accepted (``group_accepted``) and whether
they carry a signal, so the router knows at the first member whether a group can go to RL,
and waits in partition state until that many members arrived (or ``rl.timeout_seconds``).
Mix caps count routed samples per stage in partition state. A group routed to RL (or dropped
at its timeout) is remembered for ``rl.remember_seconds`` so that a straggler never opens it
again: one RL sample per group. Timeouts run in event time
(:class:`~services.common.state.EventClock`). Everything is exactly once with the runtime's
transactions; routed ids are deterministic (stage, decision or group, policy).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from schemas import TrainingStage
from schemas.fast import FilterDecision, RoutedSampleOut, timestamp, uuid5
from services.common.config import ServiceSettings
from services.common.event_time import EventClock
from services.common.groups import DECIDED, GROUP, MEMBER, Groups
from services.common.metrics import Tally
from services.common.stage import Output
from services.common.state import PartitionState, Renames, StateStore, disk_for
from services.router import metrics as m
from services.router.policy import RoutingPolicy, SampleRoute

NAMESPACE = uuid.UUID("a3d6f1c2-58b4-4e1f-8c7d-9e0b2a4f6d13")
REASONS = {"sft": "verified_correct", "cpt": "clean_not_verified_correct"}

# The groups' state (group/, member/, decided/) is laid out as services.common.groups says:
# RL groups of accepted decisions (size: the members the filter accepted); ``decided/<group
# id>`` holds the bare stream time the group was routed or timed out at.
MIX = "mix"
"""Samples routed per training stage so far, ``{cpt, sft, rl}``: what the mix caps read."""
UPGRADE = Renames({"r/": GROUP, "rm/": MEMBER, "rx/": DECIDED, "c": MIX},
                  {GROUP: {"t": "first_at", "n": "size", "have": "indexes"}})
"""Reads router state written before the keys had names (``r/ rm/ rx/ c``, fields
``t n have``)."""


def state_store(changelog_topic: str, settings: ServiceSettings | None = None) -> StateStore:
    """The router's state, reading older formats too; on disk when ``settings`` say so."""
    disk = disk_for(settings, changelog_topic) if settings is not None else None
    return StateStore(changelog_topic, upgrade=UPGRADE, disk=disk)


class RouterStage:
    input_type = FilterDecision
    tick_seconds = 1.0

    def __init__(self, policy: RoutingPolicy, policy_hash: str, *, topics: dict[str, str],
                 state: StateStore) -> None:
        self.policy, self.policy_hash = policy, policy_hash
        self.topics = topics
        self.state = state
        self.clock = EventClock()
        self.groups = Groups(FilterDecision, self.clock)
        self._pending: dict[int, int] = {}
        self._tally = Tally()

    def process_partition(self, state: PartitionState, batch: Sequence[FilterDecision]
                          ) -> list[Output]:
        with self._tally.batch():
            return self._process(state, batch)

    def _process(self, state: PartitionState, batch: Sequence[FilterDecision]
                 ) -> list[Output]:
        outputs: list[Output] = []
        now = self.clock.observe(state, [timestamp(d.created_at) for d in batch])  # once
        for decision in batch:
            if not decision.accepted:
                raise ValueError("the router reads accepted decisions only (the filtered "
                                 f"topic); decision {decision.event_id} is a rejection")
            for stage in ("sft", "cpt"):
                route: SampleRoute = getattr(self.policy, stage)
                if self._wants(route, decision) and self._room(state, stage, route.max_share, 1):
                    outputs.append(self._routed(stage, decision.record.trajectory.group_id,
                                                [decision], route.weight,
                                                REASONS[stage]))
            outputs.extend(self._collect_rl(state, decision, now))
        return outputs

    def tick(self, state: PartitionState, now: float) -> list[Output]:
        with self._tally.batch():
            return self._tick(state, now)

    def _tick(self, state: PartitionState, now: float) -> list[Output]:
        rl = self.policy.rl
        outputs: list[Output] = []
        for group_id, group in self.groups.due(state, rl.timeout_seconds, now):
            members = self.groups.take(state, group_id, group, self.clock.stream_time(state))
            if rl.on_timeout == "emit" and len(members) >= rl.min_group_size:
                outputs.extend(self._emit_rl(state, group_id, members, group,
                                             max(now, self.clock.stream_time(state))))
            else:
                self._tally.inc(m.RL_GROUPS, "timeout")
        self.groups.forget(state, rl.remember_seconds, now)  # old routed groups
        self._pending[state.partition] = self.groups.pending(state)
        m.PENDING_GROUPS.set(sum(self._pending.get(p, 0) for p in self.state.owned()))
        return outputs

    # -- RL ---------------------------------------------------------------------------------

    def _collect_rl(self, state: PartitionState, d: FilterDecision, now: float) -> list[Output]:
        rl = self.policy.rl
        expected = d.group_accepted
        if expected:
            self._tally.inc(m.GROUPS, str("no_rl_signal" not in d.flags).lower(),
                            amount=1 / expected)
        if not rl.enabled or expected is None:
            return []
        traj = d.record.trajectory
        groups = self.groups
        group = groups.assembling(state, traj.group_id)
        if group is None and groups.decided(state, traj.group_id) is not None:
            self._tally.inc(m.RL_SKIPPED, "group_closed")
            return []  # routed or timed out already
        if group is None:
            # Group-level facts are the same on every member: decide on the first one.
            if rl.require_signal and "no_rl_signal" in d.flags:
                self._tally.inc(m.RL_SKIPPED, "no_signal")
                return []
            if expected < rl.min_group_size:
                self._tally.inc(m.RL_SKIPPED, "too_small")
                return []
            group = groups.new(timestamp(d.created_at), expected)
        added = groups.add(state, traj.group_id, group, traj.sample_index, d)
        if added is None or not groups.complete(added):
            return []  # the same member again, or the group still waiting
        members = groups.take(state, traj.group_id, added, self.clock.stream_time(state))
        return self._emit_rl(state, traj.group_id, members, added, now)

    def _emit_rl(self, state: PartitionState, group_id: str, members: list[FilterDecision],
                 group: dict[str, Any], now: float) -> list[Output]:
        rl = self.policy.rl
        if not self._room(state, "rl", rl.max_share, len(members)):
            self._tally.inc(m.RL_GROUPS, "capped")
            return []
        self._tally.inc(m.RL_GROUPS, "routed")
        self._tally.observe(m.GROUP_ASSEMBLY_SECONDS, value=max(0.0, now - group["first_at"]))
        return [self._routed("rl", group_id, members, rl.weight, "group_with_reward_variance")]

    # -- shared -----------------------------------------------------------------------------

    @staticmethod
    def _wants(route: SampleRoute, d: FilterDecision) -> bool:
        s = d.record
        return (route.enabled and s.verdict in route.verdicts
                and (route.min_reward is None or s.reward >= route.min_reward)
                and not any(f in d.flags for f in route.skip_flags))

    def _room(self, state: PartitionState, stage: str, max_share: float | None, k: int) -> bool:
        """Apply the stage's mix cap, and count the ``k`` samples if they are let through."""
        counts = state.get(MIX, {"cpt": 0, "sft": 0, "rl": 0})
        total = sum(counts.values())
        if (max_share is not None and total >= self.policy.cap_warmup
                and counts[stage] + k > max_share * (total + k)):
            self._tally.inc(m.CAPPED, stage, amount=k)
            return False
        state.put(MIX, {**counts, stage: counts[stage] + k})
        return True

    def _routed(self, stage: TrainingStage, group_id: str, decisions: list[FilterDecision],
                weight: float, reason: str) -> Output:
        ident = group_id if stage == "rl" else str(decisions[0].event_id)
        sample = RoutedSampleOut(
            event_id=uuid5(NAMESPACE, f"{stage}:{ident}:{self.policy_hash}"),
            stage=stage, group_id=group_id, samples=[d.scored for d in decisions],
            decision_ids=[d.event_id for d in decisions], weight=weight, reason=reason,
            policy_name=self.policy.name, policy_hash=self.policy_hash,
            filter_policy_hash=decisions[0].policy_hash,
        )
        self._tally.inc(m.ROUTED_SAMPLES, stage, amount=len(decisions))
        return Output(self.topics[stage], sample, key=group_id)
