"""The curriculum draws at the easiest level not yet mastered, and replays the levels below."""

from __future__ import annotations

import random

from services.feeder.level_curriculum import Curriculum, CurriculumSettings


def _observe(c: Curriculum, level: float, passed: int, failed: int) -> None:
    for _ in range(passed):
        c.observe(level, True)
    for _ in range(failed):
        c.observe(level, False)


def test_the_frontier_moves_up_as_levels_are_mastered() -> None:
    c = Curriculum(CurriculumSettings(enabled=True, min_observations=10, window=50), [1, 2, 3])
    assert c.frontier() == 1  # nothing observed yet: start easy
    _observe(c, 1, 10, 0)
    assert c.frontier() == 2
    _observe(c, 2, 7, 3)  # 0.7 < 0.8: still the frontier
    assert c.frontier() == 2 and c.pass_rate(2) == 0.7
    _observe(c, 2, 40, 0)  # the window keeps the last 50: 47 of 50
    assert c.frontier() == 3
    _observe(c, 3, 50, 0)
    assert c.frontier() == 3  # all mastered: the hardest level
    _observe(c, 1, 0, 50)  # forgetting shows: level 1 is the frontier again
    assert c.frontier() == 1


def test_draws_favour_the_frontier_and_replay_the_levels_below() -> None:
    c = Curriculum(CurriculumSettings(enabled=True, min_observations=1, frontier_share=0.7),
                   [1, 2, 3, 4])
    _observe(c, 1, 5, 0)
    _observe(c, 2, 5, 0)
    counts = c.draw(10_000, random.Random(0))
    assert set(counts) == {1, 2, 3} and sum(counts.values()) == 10_000
    assert 0.67 < counts[3] / 10_000 < 0.73
    assert abs(counts[1] - counts[2]) < 400  # the rest spread evenly below
    c.observe(None, True)  # tasks without a difficulty are ignored
    c.observe(9, True)  # and levels outside the curriculum
    assert c.frontier() == 3
