"""The flywheel benchmark's supervised bound trains on what the feeder would draw, and never
on a held-out task."""

from __future__ import annotations

from pathlib import Path

from bench.bound import training_tasks
from bench.flywheel import first_reaching
from services.envs.heldout import suite, suite_tasks
from services.up.profile import Profile, load_profile

PROFILES = Path(__file__).parents[2] / "deploy" / "profiles"
REAL, FOUR_LEVELS = PROFILES / "real.yaml", PROFILES / "four-levels.yaml"


def test_training_tasks_follow_the_feeder_and_exclude_the_held_out() -> None:
    for profile in (Profile(), load_profile(REAL), load_profile(FOUR_LEVELS)):
        held = {t.task_id for t in suite_tasks(suite(profile.gate["held_out"]))}
        tasks = training_tasks(profile, 3000, seed=1)
        assert len(tasks) == 3000 and not held & {t.task_id for t in tasks}
        levels = {t.difficulty for t in tasks}
        assert levels == set(profile.feeder["curriculum"]["levels"])
        assert {t.env for t in tasks} == {profile.feeder["env"]}


def test_first_reaching_reads_promoted_versions_only() -> None:
    curve = [{"version": 0, "status": "promoted", "pass_rate": 0.9, "samples": 0},
             {"version": 1, "status": "rejected", "pass_rate": 0.85, "samples": 10},
             {"version": 2, "status": "promoted", "pass_rate": 0.81, "samples": 20}]
    assert first_reaching(curve, "samples", 0.8) == 20
    assert first_reaching(curve, "samples", 0.95) is None
    assert first_reaching([{"samples": 5, "pass_rate": 0.8}], "samples", 0.8) == 5


def test_a_run_that_never_reached_the_target_counts_as_infinite_in_the_median() -> None:
    from bench.flywheel import _median

    assert _median([242.4, 360.4, None]) == 360.4
    assert _median([100.0, None, None]) is None
    assert _median([]) is None


def test_rollback_summary_counts_rounds_from_the_first_healthy_round_after_the_poison() -> None:
    from bench.rollback import HEALTHY, POISON, summarize

    def case(after: list[tuple[str, float]], recovered: int | None, parent: int
             ) -> dict[str, object]:
        rounds = ([{"status": "promoted", "pass_rate": 0.9}] * HEALTHY
                  + [{"status": "rejected", "pass_rate": 0.95}] * POISON  # above the best
                  + [{"status": s, "pass_rate": p} for s, p in after])
        return {"pre_poison_best": 0.9, "rounds": rounds,
                "recovered": recovered and {"healthy_rounds": recovered, "seconds": 1.0},
                "first_healthy_after_poison": {"parent_promoted": parent == 7}}

    runs = [case([("rejected", 0.5), ("rejected", 0.9), ("promoted", 0.95)], 3, 7),
            case([("rejected", 0.1), ("rejected", 0.2)], None, 11),
            case([("promoted", 0.91)], 1, 7)]
    summary = summarize({"default": runs})["default"]
    assert summary["healthy_rounds_to_recover"] == [3, None, 1]
    assert summary["median_healthy_rounds"] == 3
    assert summary["healthy_rounds_back_at_best"] == [2, None, 1]
    assert summary["median_rounds_back_at_best"] == 2
    assert summary["first_healthy_parent_promoted"] == [True, False, True]
