"""The flywheel benchmark's supervised bound trains on what the feeder would draw, and never
on a held-out task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.bound import training_tasks
from bench.flywheel import first_reaching, promotion_to_serving
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


def test_promotion_to_serving_reads_each_generators_reload_line(tmp_path: Path) -> None:
    """The bench's decision-to-reload lag, from lines written by the services' own formatter
    (so a change of the reload message or the format breaks this test, not the bench)."""
    import logging
    from datetime import datetime, timedelta

    from services.common.logs import FORMAT
    from tests.factories import checkpoint

    decided_at = datetime.now().astimezone().replace(microsecond=0)

    def write(name: str, lines: list[tuple[float, int]]) -> None:
        formatter = logging.Formatter(FORMAT)
        with open(tmp_path / f"{name}.log", "w") as f:
            for after, version in lines:
                record = logging.LogRecord("services.generator.reload", logging.INFO, __file__,
                                           1, "now serving %s v%d (reload %.1f ms)",
                                           ("policy", version, 3.0), None)
                record.created = (decided_at + timedelta(seconds=after)).timestamp()
                record.msecs = record.created % 1 * 1000
                f.write(formatter.format(record) + "\n")

    write("generator-0", [(2.0, 1), (5.0, 1), (12.0, 3)])
    write("generator-1", [(4.5, 1)])
    write("trainer", [(0.5, 1)])

    def event(version: int, status: str) -> Any:
        return checkpoint(version).model_copy(update={"status": status,
                                                      "created_at": decided_at})

    lags = promotion_to_serving([event(0, "promoted"), event(1, "promoted"),
                                 event(2, "rejected"), event(3, "promoted")], tmp_path)
    assert lags == [{"version": 1, "first_seconds": 2.0, "last_seconds": 4.5},
                    {"version": 3, "first_seconds": 12.0, "last_seconds": None}]
