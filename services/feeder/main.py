"""``flywheel run feeder``: keeps ``target_backlog`` tasks waiting for the generators.

Every ``interval_seconds`` it measures the backlog (tasks published but not yet committed by
the generators' consumer group) and publishes new tasks from the environment to bring it back
to the target. Generators never starve, and tasks never pile up. The difficulty is fixed, the
environment's mix, or chosen by the curriculum (``services.feeder.curriculum``): tasks near the
frontier of what the current policy solves.
"""

from __future__ import annotations

import json
import logging
import random
import threading

from prometheus_client import Counter, Gauge
from pydantic import Field

from schemas import Producer as ProducerInfo
from services import envs
from services.common.config import ServiceSettings
from services.common.errors import ConfigError, FlywheelError
from services.common.logs import setup_logging
from services.common.service import serve_loop
from services.feeder.curriculum import Curriculum, CurriculumSettings, ScoredFollower
from services.feeder.publish import Backlog, TaskPublisher

log = logging.getLogger(__name__)

TASKS_PUBLISHED = Counter("flywheel_feeder_tasks_published_total", "Tasks published.", ["env"])
BACKLOG = Gauge("flywheel_feeder_backlog_tasks", "Tasks waiting for a generator.")


class FeederSettings(ServiceSettings):
    service: str = "feeder"
    env: str = Field(default="arithmetic", description="Environment the tasks come from.")
    difficulty: float | None = Field(default=None, description="None: the environment's mix.")
    target_backlog: int = Field(default=512, ge=1, description="Tasks kept waiting.")
    interval_seconds: float = Field(default=1.0, gt=0, le=300)
    generator_group: str | None = Field(
        default=None, description="Consumer group whose progress defines the backlog; "
        "defaults to the generators' group '<prefix>generator'.",
    )
    seed: int | None = Field(default=None, description="Task RNG seed, for reproducible runs.")
    curriculum: CurriculumSettings = Field(default_factory=CurriculumSettings)


class Feeder:
    def __init__(self, settings: FeederSettings) -> None:
        self.settings = settings
        self.env = envs.get(settings.env)
        self.rng = random.Random(settings.seed)
        topic = settings.topic("tasks")
        group = settings.generator_group or f"{settings.kafka.topic_prefix}generator"
        identity = ProducerInfo(service=settings.service, instance=settings.instance_id)
        self.publisher = TaskPublisher(settings.kafka, topic, identity)
        self.backlog = Backlog(settings.kafka, topic, group)
        self.curriculum: Curriculum | None = None
        self.follower: ScoredFollower | None = None
        if settings.curriculum.enabled:
            levels = settings.curriculum.levels or _digit_levels(self.env)
            self.curriculum = Curriculum(settings.curriculum, levels)
            self.follower = ScoredFollower(settings.kafka, settings.topic("scored"),
                                           self.curriculum)
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
        if self.curriculum is not None:
            tasks = [t for level, n in sorted(self.curriculum.draw(missing, self.rng).items())
                     for t in self.env.tasks(n, rng=self.rng, difficulty=level)]
        else:
            tasks = self.env.tasks(missing, rng=self.rng, difficulty=self.settings.difficulty)
        n = self.publisher.publish(tasks)
        TASKS_PUBLISHED.labels(self.env.name).inc(n)
        BACKLOG.set(waiting + n)
        return n

    def run(self) -> None:
        self.alive = True
        if self.follower is not None:
            self.follower.start()
        try:
            while not self.stopping.is_set():
                published = self.tick()
                if published:
                    log.info("published %d %s tasks", published, self.env.name)
                self.stopping.wait(self.settings.interval_seconds)
        finally:
            self.alive = False
            self.backlog.close()
            if self.follower is not None:
                self.follower.stop()


def _digit_levels(env: envs.Environment) -> list[float]:
    low, high = getattr(env, "min_digits", None), getattr(env, "max_digits", None)
    if low is None or high is None:
        raise ConfigError(f"environment {env.name!r} has no digit range: set "
                          "curriculum.levels")
    return [float(d) for d in range(low, high + 1)]


def run(settings: FeederSettings) -> int:
    setup_logging(settings.log_level)
    log.info("config: %s", json.dumps(settings.redacted(), sort_keys=True))
    try:
        feeder = Feeder(settings)
    except FlywheelError as exc:
        log.error("feeder cannot start: %s", exc)
        return 1
    return serve_loop(settings, feeder)
