"""Tasks near the frontier of what the current policy solves.

A follower thread reads ``scored`` (the verifier's verdicts on what the generators actually
sampled) and keeps, per difficulty level, the last ``window`` verdicts. A level is mastered
when its recent pass rate reaches ``mastered``; the frontier is the easiest level not yet
mastered (or without ``min_observations`` yet). New tasks are drawn ``frontier_share`` at the
frontier and the rest from the mastered levels below it, which keeps them from being
forgotten. When every level is mastered the hardest one is the frontier.

A model that masters n digits can, with sampling and verification, find enough correct answers
at n+1 to learn them (Lee et al. 2025); the curriculum keeps the generators there. On start it
re-reads the last ``window`` records of every partition, so a restarted feeder resumes where
the flywheel is rather than from the easiest level.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from confluent_kafka import Message as KafkaMessage
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.common.config import KafkaSettings
from services.common.follower import TopicFollower
from services.feeder.metrics import FRONTIER, LEVEL_PASS_RATE

log = logging.getLogger(__name__)


class CurriculumSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    levels: list[float] = Field(default_factory=list, description="Difficulty levels, easiest "
                                "first; empty: the environment's digit range.")
    mastered: float = Field(default=0.8, gt=0, le=1)
    frontier_share: float = Field(default=0.7, ge=0, le=1)
    window: int = Field(default=256, ge=1, description="Recent verdicts kept per level.")
    min_observations: int = Field(default=32, ge=1)

    @model_validator(mode="after")
    def _observable(self) -> CurriculumSettings:
        if self.min_observations > self.window:
            raise ValueError("min_observations above window: no level could be mastered")
        return self


class Curriculum:
    def __init__(self, s: CurriculumSettings, levels: list[float]) -> None:
        if not levels:
            raise ValueError("a curriculum needs at least one difficulty level")
        self.s, self.levels = s, sorted(levels)
        self._recent = {level: deque[bool](maxlen=s.window) for level in self.levels}
        self._lock = threading.Lock()

    def observe(self, difficulty: float | None, passed: bool) -> None:
        if difficulty is None:
            return
        with self._lock:
            recent = self._recent.get(float(difficulty))
            if recent is not None:
                recent.append(passed)

    def pass_rate(self, level: float) -> float | None:
        with self._lock:
            recent = self._recent[level]
            if len(recent) < self.s.min_observations:
                return None
            return sum(recent) / len(recent)

    def frontier(self) -> float:
        for level in self.levels:
            rate = self.pass_rate(level)
            if rate is None or rate < self.s.mastered:
                return level
        return self.levels[-1]

    def draw(self, count: int, rng: random.Random) -> dict[float, int]:
        """How many of ``count`` new tasks to draw at each level."""
        frontier = self.frontier()
        below = [lv for lv in self.levels if lv < frontier]
        out: dict[float, int] = {}
        for _ in range(count):
            level = frontier if not below or rng.random() < self.s.frontier_share \
                else rng.choice(below)
            out[level] = out.get(level, 0) + 1
        FRONTIER.set(frontier)
        for level in self.levels:
            rate = self.pass_rate(level)
            if rate is not None:
                LEVEL_PASS_RATE.labels(f"{level:g}").set(rate)
        return out


def scored_follower(kafka: KafkaSettings, topic: str,
                    on_record: Callable[[dict[str, Any]], None], history: int) -> TopicFollower:
    """Hands every ``scored`` record (decoded JSON) to ``on_record``, starting ``history``
    records back in each partition."""

    def decoded(msg: KafkaMessage) -> None:
        try:
            record = json.loads(msg.value() or b"")
        except (ValueError, RecursionError):
            return  # not ours to judge: the filter dead-letters bad records
        if isinstance(record, dict):
            on_record(record)

    return TopicFollower(kafka, topic, decoded, history=history, name="curriculum")


def level_verdict(curriculum: Curriculum) -> Callable[[dict[str, Any]], None]:
    """``on_record`` for the difficulty-level curriculum."""

    def observe(record: dict[str, Any]) -> None:
        try:
            difficulty = record["trajectory"]["task"].get("difficulty")
            passed = record.get("verdict") == "correct"
        except (KeyError, TypeError, AttributeError):
            return
        curriculum.observe(difficulty, passed)

    return observe
