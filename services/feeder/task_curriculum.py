"""The per-task curriculum of task sets: draw mostly what the policy is learning right now.

GRPO learns only from groups whose rewards differ; a task the policy always solves, or never
does, gives a group with no signal. So for each task the curriculum keeps its last ``window``
verdicts from ``scored`` (what the generators actually sampled) and puts it in a state:

- ``new``: never tried;
- ``frontier``: recent pass rate strictly between ``low`` and ``high``: groups carry signal;
- ``mastered``: pass rate at or above ``high`` (with ``min_observations``);
- ``unsolved``: nothing passed yet, but fewer than ``hopeless_after`` tries;
- ``hopeless``: still at or below ``low`` after ``hopeless_after`` tries.

Draws: ``frontier_share`` from the frontier tasks (uniformly), the rest from the task set's
cycle, which visits every task once per epoch. In the cycle new and unsolved tasks are always
taken; mastered tasks are re-tested with probability ``retest``, hopeless ones with
``hopeless_rate``, so nothing is dropped for good and the cycle still moves on. The state is
rebuilt on start from the last ``history`` records of each partition of ``scored``, so a
restarted feeder keeps what it knew.
"""

from __future__ import annotations

import random
import threading
from collections import OrderedDict, deque
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.feeder.metrics import GROUPS_WITH_VARIANCE, TASKS_BY_STATE

State = Literal["new", "frontier", "mastered", "unsolved", "hopeless"]
STATES: tuple[State, ...] = ("new", "frontier", "mastered", "unsolved", "hopeless")


class TaskCurriculumSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="Off: task sets are only cycled.")
    low: float = Field(default=0.0, ge=0, lt=1, description="Frontier: pass rate above this.")
    high: float = Field(default=0.9, gt=0, le=1, description="... and below this; at or above "
                        "it a task is mastered.")
    window: int = Field(default=16, ge=1, description="Recent verdicts kept per task.")
    min_observations: int = Field(default=8, ge=1, description="Verdicts before a task can "
                                  "be mastered.")
    hopeless_after: int = Field(default=32, ge=1, description="Tries at or below `low` before "
                                "a task is hopeless.")
    frontier_share: float = Field(default=0.6, ge=0, le=1)
    retest: float = Field(default=0.1, ge=0, le=1, description="Chance a mastered task met "
                          "in the cycle is drawn again.")
    hopeless_rate: float = Field(default=0.05, ge=0, le=1, description="Same, for hopeless.")
    history: int = Field(default=20_000, ge=0, description="Records of each `scored` "
                         "partition re-read on start.")
    groups: int = Field(default=256, ge=1, description="Recent groups the variance share is "
                        "measured over.")

    @model_validator(mode="after")
    def _bounds(self) -> TaskCurriculumSettings:
        if self.low >= self.high:
            raise ValueError("task curriculum: low must be below high")
        if self.min_observations > self.window:
            raise ValueError("task curriculum: min_observations above window")
        return self


class _Task:
    __slots__ = ("recent", "tries")

    def __init__(self, window: int) -> None:
        self.recent: deque[bool] = deque(maxlen=window)
        self.tries = 0


class TaskCurriculum:
    """Per-task states from verdicts; thread-safe (a follower thread observes)."""

    def __init__(self, s: TaskCurriculumSettings, task_ids: set[str]) -> None:
        self.s = s
        self._tasks = {tid: _Task(s.window) for tid in task_ids}
        self._frontier: list[str] = []  # a list and its index: O(1) add, remove and draw
        self._where: dict[str, int] = {}
        self._open: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._variance: deque[bool] = deque(maxlen=s.groups)
        self._lock = threading.Lock()

    def observe(self, task_id: str, passed: bool, group_id: str | None = None,
                group_size: int = 1) -> None:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                return  # not one of ours (another set, an environment, the held-out)
            task.recent.append(passed)
            task.tries += 1
            if self._state(task) == "frontier":
                if task_id not in self._where:
                    self._where[task_id] = len(self._frontier)
                    self._frontier.append(task_id)
            elif task_id in self._where:
                i, last = self._where.pop(task_id), self._frontier.pop()
                if last != task_id:
                    self._frontier[i], self._where[last] = last, i
            if group_id is not None and group_size > 1:
                self._group(group_id, group_size, passed)

    def _group(self, group_id: str, size: int, passed: bool) -> None:
        seen, passes = self._open.pop(group_id, (0, 0))
        seen, passes = seen + 1, passes + int(passed)
        if seen >= size:
            self._variance.append(0 < passes < seen)
            GROUPS_WITH_VARIANCE.set(sum(self._variance) / len(self._variance))
            return
        self._open[group_id] = (seen, passes)
        while len(self._open) > 4 * self.s.groups:  # groups never completed (a lost sample)
            self._open.popitem(last=False)

    def _state(self, task: _Task) -> State:
        s = self.s
        if not task.recent:
            return "new"
        rate = sum(task.recent) / len(task.recent)
        if rate >= s.high and len(task.recent) >= s.min_observations:
            return "mastered"
        if rate > s.low:  # at or above high on too few tries: more tries tell
            return "frontier"
        return "hopeless" if task.tries >= s.hopeless_after else "unsolved"

    def state(self, task_id: str) -> State:
        with self._lock:
            return self._state(self._tasks[task_id])

    def counts(self) -> dict[State, int]:
        with self._lock:
            out = dict.fromkeys(STATES, 0)
            for task in self._tasks.values():
                out[self._state(task)] += 1
        for state, n in out.items():
            TASKS_BY_STATE.labels(state).set(n)
        return out

    def frontier_pick(self, rng: random.Random) -> str | None:
        """A frontier task drawn uniformly, with probability ``frontier_share``; else None."""
        with self._lock:
            if not self._frontier or rng.random() >= self.s.frontier_share:
                return None
            return rng.choice(self._frontier)

    def take_from_cycle(self, task_id: str, rng: random.Random) -> bool:
        """Whether the cycle's next task is drawn now or passed over until its next epoch."""
        state = self.state(task_id)
        if state == "mastered":
            return rng.random() < self.s.retest
        if state == "hopeless":
            return rng.random() < self.s.hopeless_rate
        return True

    def variance_share(self) -> float | None:
        with self._lock:
            return sum(self._variance) / len(self._variance) if self._variance else None


def verdict_of(record: dict[str, Any]) -> tuple[str, bool, str | None, int] | None:
    """``(task_id, passed, group_id, group_size)`` of a ``scored`` record, or None."""
    try:
        trajectory = record["trajectory"]
        return (str(trajectory["task"]["task_id"]), record.get("verdict") == "correct",
                trajectory.get("group_id"), int(trajectory.get("group_size") or 1))
    except (KeyError, TypeError, ValueError):
        return None
