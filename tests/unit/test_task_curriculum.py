"""The per-task curriculum: states from a planted pattern of verdicts, and what it draws."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from pydantic import ValidationError

from services.feeder.task_curriculum import TaskCurriculum, TaskCurriculumSettings, verdict_of
from tests import factories

S = TaskCurriculumSettings(window=16, min_observations=8, hopeless_after=32, low=0.0,
                           high=0.9, frontier_share=0.6, retest=0.1, hopeless_rate=0.05)


def _planted() -> TaskCurriculum:
    c = TaskCurriculum(S, {"new", "frontier", "mastered", "unsolved", "hopeless", "recovered"})
    for i in range(16):
        c.observe("mastered", True)
        c.observe("frontier", i % 4 == 0)
    for _ in range(8):
        c.observe("unsolved", False)
    for _ in range(40):
        c.observe("hopeless", False)
        c.observe("recovered", False)
    c.observe("recovered", True)  # one pass after a long drought: back at the frontier
    c.observe("someone-else", True)  # not in the set: ignored
    return c


def test_states_from_a_planted_pattern() -> None:
    c = _planted()
    assert {t: c.state(t) for t in ("new", "frontier", "mastered", "unsolved", "hopeless",
                                    "recovered")} == {
        "new": "new", "frontier": "frontier", "mastered": "mastered", "unsolved": "unsolved",
        "hopeless": "hopeless", "recovered": "frontier"}
    assert c.counts() == {"new": 1, "frontier": 2, "mastered": 1, "unsolved": 1, "hopeless": 1}
    # a mastered task that starts failing leaves mastery as its window forgets
    for _ in range(4):
        c.observe("mastered", False)
    assert c.state("mastered") == "frontier"


def test_draws_favour_the_frontier_and_thin_out_mastered_and_hopeless() -> None:
    c, rng = _planted(), random.Random(0)
    picks = Counter(c.frontier_pick(rng) for _ in range(10_000))
    assert set(picks) == {None, "frontier", "recovered"}
    assert picks[None] == pytest.approx(4000, abs=200)  # frontier_share 0.6
    assert picks["frontier"] == pytest.approx(picks["recovered"], rel=0.1)
    taken = {t: sum(c.take_from_cycle(t, rng) for _ in range(10_000))
             for t in ("new", "unsolved", "frontier", "mastered", "hopeless")}
    assert taken["new"] == taken["unsolved"] == taken["frontier"] == 10_000
    assert taken["mastered"] == pytest.approx(1000, abs=150)
    assert taken["hopeless"] == pytest.approx(500, abs=100)
    empty = TaskCurriculum(S, {"a"})
    assert empty.frontier_pick(rng) is None


def test_groups_with_reward_variance_are_counted_when_complete() -> None:
    c = TaskCurriculum(S, {"a", "b"})
    for i in range(4):
        c.observe("a", i < 2, "g1", 4)  # mixed: signal
        c.observe("b", True, "g2", 4)  # all pass: none
    c.observe("a", False, "g3", 4)  # incomplete: not counted yet
    assert c.variance_share() == 0.5


def test_verdicts_are_read_from_scored_records() -> None:
    record = factories.scored(3).model_dump(mode="json")
    assert verdict_of(record) == ("arith-3", True, "g-3", 2)
    assert verdict_of({"trajectory": {}}) is None
    assert verdict_of({"verdict": "correct"}) is None


def test_settings_that_cannot_work_are_refused() -> None:
    with pytest.raises(ValidationError, match="low must be below high"):
        TaskCurriculumSettings(low=0.5, high=0.5)
    with pytest.raises(ValidationError, match="min_observations"):
        TaskCurriculumSettings(window=4, min_observations=8)
