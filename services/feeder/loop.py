"""The feeder's long-running loop: every ``interval_seconds``, measure the backlog and publish
what brings it back to the target (see :mod:`services.feeder.main`)."""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

from schemas import ProducerInfo
from services import envs
from services.common.errors import BrokerUnreachable, ConfigError, FatalRuntimeError
from services.common.follower import TopicFollower
from services.envs.heldout import guard as held_out_guard
from services.feeder.level_curriculum import Curriculum, level_verdict, scored_follower
from services.feeder.metrics import BACKLOG, TASKS_PUBLISHED
from services.feeder.publish import Backlog, TaskPublisher
from services.feeder.settings import FeederSettings
from services.feeder.sources import EnvSource, Source, TaskSetSource, resume_cursors
from services.feeder.task_curriculum import verdict_of

log = logging.getLogger(__name__)


class Feeder:
    def __init__(self, settings: FeederSettings) -> None:
        self.settings = settings
        self.rng = random.Random(settings.seed)
        topic = settings.topic("tasks")
        group = settings.generator_group or f"{settings.kafka.topic_prefix}generator"
        identity = ProducerInfo(service=settings.service, instance=settings.instance_id)
        guard = held_out_guard(settings.held_out)
        self.follower: TopicFollower | None = None
        self.source: Source
        if settings.tasksets:
            cursors = resume_cursors(settings.kafka, topic, {s.name for s in settings.tasksets})
            source = TaskSetSource(
                settings.tasksets, seed=settings.seed or 0, cursors=cursors,
                guard=guard, curriculum=settings.task_curriculum)
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
                                    guard=guard)
        self.publisher = TaskPublisher(settings.kafka, topic, identity)
        self.backlog = Backlog(settings.kafka, topic, group)
        self.stopping = threading.Event()
        self.alive = False
        self.connected = False
        """Whether the last backlog measurement reached the broker (/readyz)."""

    @property
    def ready(self) -> bool:
        return self.alive and self.connected

    def stop(self) -> None:
        self.stopping.set()

    def tick(self) -> int:
        """Top up once; returns how many tasks were published."""
        waiting = self.backlog.size(timeout=5.0)
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
            down_since: float | None = None
            limit = self.settings.runtime.broker_down_seconds
            while not self.stopping.is_set():
                try:
                    published = self.tick()
                except BrokerUnreachable as exc:
                    # Not ready while the broker is away; it comes back to the same loop.
                    self.connected = False
                    down_since = down_since or time.monotonic()
                    if time.monotonic() - down_since > limit:
                        raise FatalRuntimeError(f"no broker reachable for {limit:.0f} s: "
                                                f"{exc}") from exc
                    log.warning("broker unreachable: %s", exc)
                    continue
                self.connected, down_since = True, None
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
