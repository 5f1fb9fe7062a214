"""Replay pieces without a broker: chains in flow order, the manifest's identity, and the
publish stage's memory (one publication per trajectory, training stage and router policy)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.common.errors import ConfigError
from services.common.state import StateStore
from services.replay import Manifest, stages_from
from services.replay_publish import PublishStage
from tests import factories


def test_a_chain_starts_at_the_sources_stage_and_follows_the_flow() -> None:
    assert stages_from("raw", ["scorer", "filter", "router"]) == ["scorer", "filter", "router"]
    assert stages_from("scored", ["filter"]) == ["filter"]
    assert stages_from("filtered", ["router"]) == ["router"]
    for source, stages in (("scored", ["router"]), ("scored", ["router", "filter"]),
                           ("raw", ["scorer", "router"]), ("scored", [])):
        with pytest.raises(ConfigError, match="chain"):
            stages_from(source, stages)
    with pytest.raises(ConfigError, match="--from"):
        stages_from("accepted.sft", ["router"])


def test_a_replay_is_the_same_run_only_with_the_same_stages_policies_and_times() -> None:
    now = datetime.now(UTC)
    first = Manifest(name="n", source="scored", stages=["filter"], policies={"filter": "a"},
                     since=None, until=now, bounds={"t": {0: (0, 10)}}, created_at=now)
    later = first.model_copy(update={"bounds": {}, "created_at": datetime.now(UTC)})
    assert first.same_run(later)
    assert not first.same_run(first.model_copy(update={"policies": {"filter": "b"}}))
    assert not first.same_run(first.model_copy(update={"until": None}))
    assert not first.same_run(first.model_copy(update={"into_live": True}))
    assert Manifest.model_validate_json(first.model_dump_json()) == first
    assert first.records == 10


def test_publishing_skips_what_was_published_under_the_same_stage_and_policy() -> None:
    store = StateStore("published.state")
    store.adopt(0)
    state = store.partition(0)
    first = PublishStage("one", "live.", store)
    samples = [factories.routed(i) for i in range(3)]
    out = first.process_partition(state, samples)
    assert [o.topic for o in out] == ["live.accepted.sft"] * 3
    assert {o.value.replay for o in out} == {"one"}  # type: ignore[attr-defined]
    assert {o.value.event_id for o in out}.isdisjoint({s.event_id for s in samples})  # type: ignore[attr-defined]
    again = PublishStage("two", "live.", store)
    assert again.process_partition(state, samples) == [] and again.skipped == 3
    other_policy = [s.model_copy(update={"policy_hash": "ef" * 32}) for s in samples[:1]]
    assert len(again.process_partition(state, other_policy)) == 1
