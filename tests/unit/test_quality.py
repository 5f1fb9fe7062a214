"""Filter and router logic on their partition state, without a broker (the broker tests in
tests/integration/test_quality.py run the same planted mix through the real services)."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from schemas import FilterDecision, RoutedSample, ScoredTrajectory, fast
from services.common.errors import ConfigError
from services.common.policy import load_policy
from services.common.stage import Output
from services.common.state import StateStore
from services.filter.dedup import fingerprint
from services.filter.policy import DedupRule, FilterPolicy, GroupRule
from services.filter.stage import FilterStage
from services.router.policy import RoutingPolicy, SampleRoute
from services.router.stage import RouterStage
from tests import planted


def make_filter(policy: FilterPolicy | None = None, digest: str = "f" * 64) -> FilterStage:
    store = StateStore("filter.state")
    store.adopt(0)
    return FilterStage(policy or planted.filter_policy(), digest, accepted_topic="filtered",
                       rejected_topic="rejected", state=store,
                       latest_version=lambda _m: planted.LATEST_VERSION)


def make_router(policy: RoutingPolicy | None = None) -> RouterStage:
    store = StateStore("router.state")
    store.adopt(0)
    topics = {s: f"accepted.{s}" for s in ("cpt", "sft", "rl")}
    return RouterStage(policy or planted.routing_policy(), "r" * 64, topics=topics, state=store)


def run(stage: FilterStage | RouterStage, batch: Sequence[Any]) -> list[Output]:
    """The stage over ``batch`` (pydantic messages or outputs of a stage), decoded as the
    runtime decodes them; its outputs read back as the pydantic messages consumers see."""
    stage.state.begin()
    decode = fast.decoder(stage.input_type)
    outputs = stage.process_partition(stage.state.partition(0),
                                      [decode(r.to_bytes()) for r in batch])
    return [wire(o) for o in outputs]


def wire(output: Output) -> Output:
    model = {fast.FilterDecisionOut: FilterDecision, fast.RoutedSampleOut: RoutedSample}[
        type(output.value)]
    return Output(output.topic, model.from_bytes(output.value.to_bytes()), output.key)


def values(outputs: list[Output], topic: str) -> list[Any]:
    return [o.value for o in outputs if o.topic == topic]


def test_the_planted_mix_meets_exactly_the_expected_counts() -> None:
    records, expected = planted.planted_mix(90)
    decisions = run(make_filter(), records)
    accepted = values(decisions, "filtered")
    rejected = values(decisions, "rejected")
    assert len(accepted) == expected.accepted
    assert Counter(r for d in rejected for r in d.reasons) == expected.rejected
    assert all(len(d.reasons) == 1 for d in rejected)
    routed = run(make_router(), accepted)
    assert len(values(routed, "accepted.sft")) == expected.sft
    assert len(values(routed, "accepted.cpt")) == expected.cpt
    rl: list[RoutedSample] = values(routed, "accepted.rl")
    assert len(rl) == expected.rl_groups
    assert sum(len(r.samples) for r in rl) == expected.rl_samples
    for group in rl:  # a whole group, in sample order, with reward variance
        assert [s.trajectory.sample_index for s in group.samples] == sorted(
            s.trajectory.sample_index for s in group.samples)
        assert len({s.reward for s in group.samples}) > 1


def test_every_decision_records_the_policy_hash_and_a_new_policy_file_changes_it(
        tmp_path: Path) -> None:
    file = tmp_path / "filter.yaml"
    file.write_text(planted.FILTER_POLICY_YAML)
    policy, first = load_policy(FilterPolicy, file)
    file.write_text(planted.FILTER_POLICY_YAML + "reject_truncated: true\n")
    _, second = load_policy(FilterPolicy, file)
    assert first != second and len(first) == 64
    records, _ = planted.planted_mix(3)
    for digest in (first, second):
        decisions = [o.value for o in run(make_filter(policy, digest), records)]
        assert {d.policy_hash for d in decisions} == {digest}
        assert {d.policy_name for d in decisions} == {"planted"}


def test_a_bad_policy_file_is_a_clear_error(tmp_path: Path) -> None:
    file = tmp_path / "filter.yaml"
    file.write_text("min_reward: high\n")
    with pytest.raises(ConfigError, match="invalid"):
        load_policy(FilterPolicy, file)
    file.write_text("unknown_rule: 1\n")
    with pytest.raises(ConfigError, match="unknown_rule"):
        load_policy(FilterPolicy, file)


def test_an_incomplete_group_waits_then_is_decided_at_its_timeout() -> None:
    stage = make_filter(planted.filter_policy().model_copy(
        update={"groups": GroupRule(timeout_seconds=30)}))
    records, _ = planted.planted_mix(1)  # one varied group of 4
    assert run(stage, records[:3]) == []
    state = stage.state.partition(0)
    t0 = state.get(f"group/{records[0].trajectory.group_id}")["first_at"]
    assert stage.tick(state, t0 + 29) == []
    decided = [o.value for o in stage.tick(state, t0 + 31)]
    assert len(decided) == 3 and all(d.accepted for d in decided)
    assert all("incomplete_group" in d.flags for d in decided)
    assert {d.group_accepted for d in decided} == {3}
    assert state.keys("group/") == [] and state.keys("member/") == []


def test_a_redelivered_sample_is_never_accepted_twice() -> None:
    stage = make_filter()
    records, _ = planted.planted_mix(1)
    first = run(stage, records[:2])
    assert first == []
    again = [o.value for o in run(stage, [records[1]])]  # while the group assembles
    assert [d.reasons for d in again] == [["duplicate"]]
    done = [o.value for o in run(stage, records[2:])]
    assert len(done) == 4 and all(d.accepted for d in done)
    later = [o.value for o in run(stage, records)]  # the whole group again, after
    assert [d.reasons for d in later] == [["duplicate"]] * 4
    late = [o.value for o in run(stage, records[:1])]  # a straggler: decided alone, at once
    assert [(d.reasons, d.flags, d.group_accepted) for d in late] == [
        (["duplicate"], ["late_member"], None)]
    assert len({d.event_id for d in [*done, *later]}) == 8  # a repeat has an id of its own


def test_a_repeat_of_a_decided_member_is_a_duplicate_by_identity_not_by_content() -> None:
    # Dedup off: only the decided group's indexes can tell a repeat. Seen in the fault suite:
    # a generator's repeat, once its content had left the bounded memory, was accepted again.
    stage = make_filter(planted.filter_policy().model_copy(
        update={"dedup": DedupRule(exact=False, near=False)}))
    records, _ = planted.planted_mix(1)
    done = [o.value for o in run(stage, records)]
    assert len(done) == 4 and all(d.accepted for d in done)
    again = [o.value for o in run(stage, [records[0], records[0]])]
    assert [(d.accepted, d.reasons) for d in again] == [(False, ["duplicate"])] * 2


def test_a_late_member_is_decided_alone_and_never_joins_an_rl_group() -> None:
    records, _ = planted.planted_mix(1)
    stage = make_filter(planted.filter_policy().model_copy(
        update={"groups": GroupRule(timeout_seconds=30)}))
    run(stage, records[:3])
    state = stage.state.partition(0)
    first = [o.value for o in stage.tick(state, 1e12)]  # the group times out with 3
    [late] = [o.value for o in run(stage, records[3:])]
    assert late.accepted and late.flags == ["late_member"] and late.group_accepted is None
    router = make_router()
    routed = run(router, [*[d for d in first if d.accepted], late])
    [group] = values(routed, "accepted.rl")
    assert len(group.samples) == 3  # the late one went to SFT/CPT only
    per_sample = values(routed, "accepted.sft") + values(routed, "accepted.cpt")
    assert any(late.event_id in r.decision_ids for r in per_sample)


def test_timeouts_follow_event_time_not_a_restart() -> None:
    """A restored group whose first member is old in wall time is not timed out before the
    stream moves on or the partition stays quiet for the timeout after being taken."""
    stage = make_filter(planted.filter_policy().model_copy(
        update={"groups": GroupRule(timeout_seconds=30)}))
    records, _ = planted.planted_mix(1)
    old = [r.model_copy(update={"created_at": r.created_at.replace(year=2020)})
           for r in records]
    run(stage, old[:2])
    state = stage.state.partition(0)
    now = state.assigned_at + 1
    assert stage.tick(state, now) == []  # the backlog may still hold the rest
    assert stage.tick(state, now + 31) != []  # quiet for the timeout: the wall clock decides


def test_the_router_sends_a_group_to_rl_once() -> None:
    records, _ = planted.planted_mix(1)
    decisions = _accepted(records)
    router = make_router()
    assert len(values(run(router, decisions), "accepted.rl")) == 1
    assert values(run(router, decisions[:2]), "accepted.rl") == []  # replayed stragglers
    assert router.state.partition(0).keys("group/") == []


def test_the_duplicate_memory_per_task_is_bounded() -> None:
    policy = planted.filter_policy().model_copy(update={"dedup": DedupRule(memory_per_task=3)})
    stage = make_filter(policy)
    records, _ = planted.planted_mix(1)
    accepted = values(run(stage, records), "filtered")
    assert len(accepted) == 4, "one more accepted than the memory holds"
    memory = stage.state.partition(0).get(f"seen/{records[0].trajectory.task.task_id}")["entries"]
    d = policy.dedup
    newest = [fingerprint(a.scored.trajectory.completion, num_perm=d.num_perm,
                          shingle=d.shingle).exact for a in accepted][-3:]
    assert [e[0] for e in memory] == newest  # the oldest one went


def _resampled(records: list[ScoredTrajectory], later: float, group: str
               ) -> list[ScoredTrajectory]:
    """The same completions of the same task, sampled again as a new group ``later`` s on."""
    out = []
    for r in records:
        t = r.trajectory.model_copy(update={"group_id": group, "event_id": uuid.uuid5(
            uuid.NAMESPACE_OID, f"{group}-{r.trajectory.sample_index}")})
        ident = uuid.uuid5(uuid.NAMESPACE_OID, f"s-{t.event_id}")
        out.append(r.model_copy(update={"trajectory": t, "event_id": ident,
                                        "created_at": r.created_at + timedelta(seconds=later)}))
    return out


@pytest.mark.parametrize("horizon", [None, 30.0])
def test_a_dedup_horizon_lets_a_task_be_learned_from_again_after_it(horizon: float | None
                                                                     ) -> None:
    stage = make_filter(planted.filter_policy().model_copy(
        update={"dedup": DedupRule(horizon_seconds=horizon)}))
    records, _ = planted.planted_mix(1)
    assert len(values(run(stage, records), "filtered")) == 4
    soon = [o.value for o in run(stage, _resampled(records, 29, "soon"))]
    assert [d.reasons for d in soon] == [["duplicate"]] * 4  # inside the horizon
    after = [o.value for o in run(stage, _resampled(records, 31, "after"))]
    assert [d.accepted for d in after] == [horizon is not None] * 4
    late = [o.value for o in run(stage, _resampled(records, -5, "late"))]
    assert [d.reasons for d in late] == [["duplicate"]] * 4  # older than what it repeats


def test_memory_entries_without_a_time_hold_for_every_horizon() -> None:
    """Entries written before times were remembered (three fields) are still duplicates."""
    stage = make_filter(planted.filter_policy().model_copy(
        update={"dedup": DedupRule(horizon_seconds=30)}))
    records, _ = planted.planted_mix(1)
    run(stage, records)
    state = stage.state.partition(0)
    key = f"seen/{records[0].trajectory.task.task_id}"
    state.put(key, {"entries": [e[:3] for e in state.get(key)["entries"]]})
    again = _resampled(records, 3600, "again")
    assert [o.value.reasons for o in run(stage, again)] == [["duplicate"]] * 4


def _accepted(records: list[ScoredTrajectory]) -> list[FilterDecision]:
    return values(run(make_filter(), records), "filtered")


def test_rl_groups_wait_for_every_accepted_member_across_batches() -> None:
    records, _ = planted.planted_mix(1)
    decisions = _accepted(records)
    router = make_router()
    first = run(router, decisions[:3])
    assert values(first, "accepted.rl") == []
    rest = run(router, decisions[3:])
    [group] = values(rest, "accepted.rl")
    assert [s.trajectory.sample_index for s in group.samples] == [0, 1, 2, 3]
    assert group.decision_ids == [d.event_id for d in decisions]
    assert router.state.partition(0).keys("group/") == []
    assert router.state.partition(0).keys("member/") == []


def test_an_rl_group_missing_members_is_dropped_at_its_timeout() -> None:
    records, _ = planted.planted_mix(1)
    decisions = _accepted(records)
    router = make_router()
    run(router, decisions[:2])
    state = router.state.partition(0)
    assert router.tick(state, 1e12) == []
    assert state.keys("group/") == [] and state.keys("member/") == []
    emit = make_router(RoutingPolicy(rl={"on_timeout": "emit"}))  # type: ignore[arg-type]
    run(emit, decisions[:2])
    [group] = values(emit.tick(emit.state.partition(0), 1e12), "accepted.rl")
    assert len(group.samples) == 2


def test_a_mix_cap_bounds_a_stages_share() -> None:
    records, _ = planted.planted_mix(45)
    decisions = _accepted(records)
    policy = RoutingPolicy(cpt=SampleRoute(verdicts=["incorrect", "unverified"], max_share=0.1),
                           cap_warmup=10)
    routed = run(make_router(policy), decisions)
    counts = Counter(o.topic for o in routed for _ in o.value.samples)
    assert counts["accepted.cpt"] <= 0.1 * sum(counts.values()) + 1
    assert counts["accepted.cpt"] > 0


def test_the_router_refuses_rejections() -> None:
    records, _ = planted.planted_mix(5)
    rejected = values(run(make_filter(), records), "rejected")
    with pytest.raises(ValueError, match="accepted decisions only"):
        run(make_router(), rejected[:1])


def test_the_example_policy_files_are_the_embedded_defaults() -> None:
    from services.common.config import DEPLOY_DIR
    from services.scorer.stage import ScoringConfig

    folder = DEPLOY_DIR / "policies"
    assert load_policy(FilterPolicy, folder / "filter.yaml")[0] == FilterPolicy()
    assert load_policy(RoutingPolicy, folder / "router.yaml")[0] == RoutingPolicy()
    assert ScoringConfig.load(folder / "scorer.yaml") == ScoringConfig()


def test_decisions_and_routes_are_counted_in_metrics() -> None:
    from services.filter import metrics as fm
    from services.router import metrics as rm

    def value(metric: Any, *labels: str) -> float:
        return float(metric.labels(*labels)._value.get())

    records, expected = planted.planted_mix(45)
    before = {
        "accepted": value(fm.DECISIONS, "accepted"),
        "near": value(fm.REJECTIONS, "near_duplicate"),
        "hits": value(fm.DUPLICATE_HITS, "near_duplicate"),
        "sft": value(rm.ROUTED_SAMPLES, "sft"),
        "rl": value(rm.RL_GROUPS, "routed"),
    }
    accepted = values(run(make_filter(), records), "filtered")
    run(make_router(), accepted)
    assert value(fm.DECISIONS, "accepted") - before["accepted"] == expected.accepted
    assert value(fm.REJECTIONS, "near_duplicate") - before["near"] == \
        expected.rejected["near_duplicate"]
    assert value(fm.DUPLICATE_HITS, "near_duplicate") - before["hits"] == \
        expected.rejected["near_duplicate"]
    assert value(rm.ROUTED_SAMPLES, "sft") - before["sft"] == expected.sft
    assert value(rm.RL_GROUPS, "routed") - before["rl"] == expected.rl_groups


def test_a_batch_that_fails_counts_nothing_and_its_retry_counts_once() -> None:
    """Metrics are added up per batch: a batch whose transaction is aborted (here the router
    refuses a rejection in its input) is not counted, and processing it again is counted
    once."""
    from services.router import metrics as rm

    def sft() -> float:
        return float(rm.ROUTED_SAMPLES.labels("sft")._value.get())

    def rl_groups_timed() -> float:  # a histogram: observations count as increments do
        return float(REGISTRY.get_sample_value("flywheel_router_group_assembly_seconds_count")
                     or 0.0)

    records, _ = planted.planted_mix(9)
    decisions = run(make_filter(), records)
    accepted, rejected = values(decisions, "filtered"), values(decisions, "rejected")
    before, timed = sft(), rl_groups_timed()
    router = make_router()
    with pytest.raises(ValueError, match="accepted decisions only"):
        run(router, [*accepted, rejected[0]])
    assert (sft(), rl_groups_timed()) == (before, timed)
    outputs = run(make_router(), accepted)
    routed = values(outputs, "accepted.sft")
    assert routed and sft() - before == len(routed)
    assert rl_groups_timed() - timed == len(values(outputs, "accepted.rl")) > 0


def test_the_repetition_rule_reuses_the_scorers_ratio_of_the_same_measure() -> None:
    from schemas import Score
    from services.common.text import REPETITION_MEASURE

    records, _ = planted.planted_mix(1)
    ngram = planted.filter_policy().repetition.ngram  # type: ignore[union-attr]

    def with_score(record: ScoredTrajectory, value: float, n: int) -> ScoredTrajectory:
        score = Score(scorer="repetition", version="t", value=value,
                      details={"measure": REPETITION_MEASURE, "ngram": n})
        return record.model_copy(update={"scores": [*record.scores, score]})

    # The scorer measured the same: its ratio decides (here, a loop it saw).
    said = [with_score(r, 0.99, ngram) for r in records]
    assert all("repetitive" in d.reasons for d in (o.value for o in run(make_filter(), said)))
    # Another n-gram size: measured again, and the planted completions do not repeat.
    other = [with_score(r, 0.99, ngram + 1) for r in records]
    assert not any("repetitive" in o.value.reasons for o in run(make_filter(), other))
