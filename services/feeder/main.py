"""``flywheel run feeder``: keeps ``target_backlog`` tasks waiting for the generators.

Every ``interval_seconds`` it measures the backlog (tasks published but not yet committed by
the generators' consumer group) and publishes new tasks to bring it back to the target.
Generators never starve, and tasks never pile up. Tasks come from the user's task sets
(``tasksets``: cycled in shuffled epochs, drawn by the per-task curriculum,
``services.feeder.frontier``) or else from a generated environment (``env``: a fixed
difficulty, the environment's mix, or the difficulty-level curriculum,
``services.feeder.curriculum``). Either way the gate's held-out tasks (``held_out``) never
reach ``tasks``.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from typing import Any

from prometheus_client import Counter, Gauge
from pydantic import Field, model_validator

from schemas import ProducerInfo
from services import envs
from services.common.config import ServiceSettings
from services.common.errors import ConfigError, FlywheelError
from services.common.follower import TopicFollower
from services.common.logs import setup_logging
from services.common.service import serve_loop
from services.envs.heldout import Suite, suite_tasks
from services.envs.tasksets import TaskSetSpec
from services.feeder.curriculum import (
    Curriculum,
    CurriculumSettings,
    level_verdict,
    scored_follower,
)
from services.feeder.frontier import TaskCurriculumSettings, verdict_of
from services.feeder.publish import Backlog, TaskPublisher
from services.feeder.sources import EnvSource, Source, TaskSetSource, resume_cursors

log = logging.getLogger(__name__)

TASKS_PUBLISHED = Counter("flywheel_feeder_tasks_published_total", "Tasks published.",
                          ["source"])
BACKLOG = Gauge("flywheel_feeder_backlog_tasks", "Tasks waiting for a generator.")


class FeederSettings(ServiceSettings):
    service: str = "feeder"
    env: str = Field(default="arithmetic", description="Environment the tasks come from, "
                     "when there are no task sets.")
    tasksets: list[TaskSetSpec] = Field(default_factory=list, description="The user's task "
                                        "files; when set, tasks come from them, not env.")
    held_out: Suite | None = Field(default=None, description="The gate's held-out suite "
                                   "(the same settings): none of its tasks is published.")
    difficulty: float | None = Field(default=None, description="None: the environment's mix.")
    target_backlog: int = Field(default=512, ge=1, description="Tasks kept waiting.")
    interval_seconds: float = Field(default=1.0, gt=0, le=300)
    generator_group: str | None = Field(
        default=None, description="Consumer group whose progress defines the backlog; "
        "defaults to the generators' group '<prefix>generator'.",
    )
    seed: int | None = Field(default=None, description="Task RNG seed, for reproducible runs.")
    curriculum: CurriculumSettings = Field(default_factory=CurriculumSettings,
                                           description="Difficulty levels (environments).")
    task_curriculum: TaskCurriculumSettings = Field(
        default_factory=TaskCurriculumSettings, description="Per task (task sets).")

    @model_validator(mode="after")
    def _distinct_sets(self) -> FeederSettings:
        names = [s.name for s in self.tasksets]
        if len(set(names)) != len(names):
            raise ValueError("tasksets: names must be distinct")
        return self


class Feeder:
    def __init__(self, settings: FeederSettings) -> None:
        self.settings = settings
        self.rng = random.Random(settings.seed)
        topic = settings.topic("tasks")
        group = settings.generator_group or f"{settings.kafka.topic_prefix}generator"
        identity = ProducerInfo(service=settings.service, instance=settings.instance_id)
        held = suite_tasks(settings.held_out) if settings.held_out is not None else []
        excluded = {t.task_id for t in held}
        self.follower: TopicFollower | None = None
        self.source: Source
        if settings.tasksets:
            cursors = resume_cursors(settings.kafka, topic, {s.name for s in settings.tasksets})
            source = TaskSetSource(
                settings.tasksets, seed=settings.seed or 0, cursors=cursors,
                excluded_ids=excluded, excluded_prompts={t.prompt.strip() for t in held},
                curriculum=settings.task_curriculum)
            if source.curriculum is not None:
                curriculum = source.curriculum

                def observe(record: dict[str, Any]) -> None:
                    if (verdict := verdict_of(record)) is not None:
                        curriculum.observe(*verdict)

                self.follower = scored_follower(settings.kafka, settings.topic("scored"),
                                               observe, settings.task_curriculum.history)
            self.source = source
        else:
            env = envs.get(settings.env)
            levels: Curriculum | None = None
            if settings.curriculum.enabled:
                levels = Curriculum(settings.curriculum,
                                    settings.curriculum.levels or _levels(env))
                self.follower = scored_follower(settings.kafka, settings.topic("scored"),
                                               level_verdict(levels),
                                               settings.curriculum.window)
            self.source = EnvSource(env, difficulty=settings.difficulty, curriculum=levels,
                                    excluded=excluded)
        self.publisher = TaskPublisher(settings.kafka, topic, identity)
        self.backlog = Backlog(settings.kafka, topic, group)
        self.stopping = threading.Event()
        self.alive = False

    @property
    def ready(self) -> bool:
        return self.alive

    def stop(self) -> None:
        self.stopping.set()

    def tick(self) -> int:
        """Top up once; returns how many tasks were published."""
        waiting = self.backlog.size()
        BACKLOG.set(waiting)
        missing = self.settings.target_backlog - waiting
        if missing <= 0:
            return 0
        n = self.publisher.publish(self.source.draw(missing, self.rng))
        TASKS_PUBLISHED.labels(self.source.name).inc(n)
        BACKLOG.set(waiting + n)
        return n

    def run(self) -> None:
        self.alive = True
        if self.follower is not None:
            self.follower.start()
            # Draw from what the curriculum knew before the restart, not from a blank slate.
            while not self.follower.caught_up.wait(0.5):
                if self.stopping.is_set():
                    break
        try:
            while not self.stopping.is_set():
                published = self.tick()
                if published:
                    log.info("published %d %s tasks", published, self.source.name)
                self.stopping.wait(self.settings.interval_seconds)
        finally:
            self.alive = False
            self.backlog.close()
            if self.follower is not None:
                self.follower.stop()


def _levels(env: envs.Environment) -> list[float]:
    if not env.levels:
        raise ConfigError(f"environment {env.name!r} has no difficulty levels: set "
                          "curriculum.levels")
    return env.levels


def run(settings: FeederSettings) -> int:
    setup_logging(settings.log_level)
    log.info("config: %s", json.dumps(settings.redacted(), sort_keys=True))
    try:
        feeder = Feeder(settings)
    except FlywheelError as exc:
        log.error("feeder cannot start: %s", exc)
        return 1
    return serve_loop(settings, feeder)
