"""Replay pieces without a broker: chains in flow order, the manifest's identity, and the
publish stage's memory (one publication per trajectory, training stage and router policy)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.common.errors import ConfigError
from services.common.state import StateStore
from services.envs.guard import Guard
from services.replay.publish import PublishStage
from services.replay.run import Manifest, stages_from
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
    first = PublishStage("one", "live.", store, Guard([]))
    samples = [factories.routed(i) for i in range(3)]
    out = first.process_partition(state, samples)
    assert [o.topic for o in out] == ["live.accepted.sft"] * 3
    assert {o.value.replay for o in out} == {"one"}  # type: ignore[attr-defined]
    assert {o.value.event_id for o in out}.isdisjoint({s.event_id for s in samples})  # type: ignore[attr-defined]
    again = PublishStage("two", "live.", store, Guard([]))
    assert again.process_partition(state, samples) == [] and again.skipped == 3
    other_policy = [s.model_copy(update={"policy_hash": "ef" * 32}) for s in samples[:1]]
    assert len(again.process_partition(state, other_policy)) == 1


def test_publishing_leaves_out_every_sample_of_a_held_out_task() -> None:
    """By id or by prompt, whichever of a group's trajectories holds it."""
    store = StateStore("published.state")
    store.adopt(0)
    samples = [factories.routed(i) for i in range(4)]
    tasks = [s.samples[0].trajectory.task for s in samples]
    other = tasks[2].model_copy(update={"task_id": "file:other", "prompt": tasks[2].prompt.upper()})
    stage = PublishStage("one", "live.", store, Guard([tasks[0], other]))
    group = samples[3].model_copy(update={"samples": [samples[3].samples[0],
                                                      samples[0].samples[0]]})
    out = stage.process_partition(store.partition(0), [samples[0], samples[1], samples[2], group])
    assert [o.value.samples[0].trajectory.task.task_id for o in out] == [tasks[1].task_id]  # type: ignore[attr-defined]
    assert stage.held_out == 3 and stage.published == 1


def test_the_report_renders_and_writes_json_and_png(tmp_path: Path) -> None:
    from rich.console import Console

    from services.replay.report import (
        FilterDiff,
        Report,
        RouterDiff,
        ScorerDiff,
        render,
        write_json,
        write_png,
    )

    report = Report(
        name="r", trajectories=4,
        scorer=ScorerDiff(verdicts_old={"correct": 2, "incorrect": 2},
                          verdicts_new={"correct": 3, "incorrect": 1},
                          verdict_changes={"incorrect -> correct": 1}, mean_reward_old=0.5,
                          mean_reward_new=0.75, rewards_changed=1),
        filter=FilterDiff(old={"accepted": 4}, new={"accepted": 3, "rejected": 1},
                          reasons_new={"low_reward": 1}, newly_rejected={"low_reward": 1}),
        router=RouterDiff(old={"sft": 4}, new={"sft": 3}, moved={"sft -> none": 1}),
        rewards_old=[0, 0, 1, 1], rewards_new=[0, 1, 1, 1])
    console = Console(record=True, width=120)
    console.print(render(report))
    text = console.export_text()
    assert "newly rejected" in text and "sft -> none" in text and "0.750" in text
    write_json(report, tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["filter"]["newly_rejected"] == {"low_reward": 1}
    assert "rewards_old" not in data
    write_png(report, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_name_that_would_make_odd_topic_names_is_refused_before_anything_starts() -> None:
    from services.replay.run import replay

    for name in ("with space", "a.b", "", "x" * 101):
        with pytest.raises(ConfigError, match="letters, digits"):
            replay(name, "scored", ["filter"], {})
