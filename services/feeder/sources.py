"""Where the feeder's tasks come from: a generated environment or the user's task sets.

Both keep the held-out set off ``tasks``: an environment's draws that hit a held-out task id
are drawn again; a task set's tasks with a held-out id or prompt are dropped when it is loaded.

Task sets are cycled (``services.envs.tasksets.Cycle``). Every task the feeder publishes from a
set carries ``metadata.source = {taskset, draw, epoch, position}``, ``epoch``/``position``
being the set's cycle cursor after the draw; on start the feeder reads the newest cursor of each
set back from the ``tasks`` topic (:func:`resume_cursors`) and goes on from there, so a restart
neither starts the set over nor skips part of it.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol

from confluent_kafka import Consumer, TopicPartition

from schemas import Task
from services import envs
from services.common.config import KafkaSettings
from services.common.errors import ConfigError, FatalRuntimeError
from services.common.offsets import watermarks
from services.envs.guard import Guard
from services.envs.tasksets import SOURCE, Cycle, TaskSetSpec, load
from services.feeder.level_curriculum import Curriculum
from services.feeder.metrics import CYCLE_SKIPPED, HELD_OUT_EXCLUDED
from services.feeder.task_curriculum import TaskCurriculum, TaskCurriculumSettings

log = logging.getLogger(__name__)


class Source(Protocol):
    name: str

    def draw(self, count: int, rng: random.Random) -> list[Task]: ...


class EnvSource:
    """New tasks from a generated environment, at the curriculum's levels or a fixed
    difficulty, never one the ``guard`` holds out (by id or by prompt)."""

    def __init__(self, env: envs.Environment, *, difficulty: float | None,
                 curriculum: Curriculum | None, guard: Guard) -> None:
        self.env, self.name = env, env.name
        self.difficulty, self.curriculum, self.guard = difficulty, curriculum, guard

    def draw(self, count: int, rng: random.Random) -> list[Task]:
        wanted: dict[float | None, int] = {self.difficulty: count}
        if self.curriculum is not None:
            wanted = {level: n for level, n in self.curriculum.draw(count, rng).items()}
        out: list[Task] = []
        for level, n in sorted(wanted.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
            out += self._draw_level(n, level, rng)
        return out

    def _draw_level(self, n: int, level: float | None, rng: random.Random) -> list[Task]:
        out: list[Task] = []
        for _ in range(100):
            fresh = self.env.tasks(n - len(out), rng=rng, difficulty=level)
            kept, held = self.guard.kept(fresh)
            if held:
                HELD_OUT_EXCLUDED.labels(self.name).inc(held)
            out += kept
            if len(out) == n:
                return out
        raise ConfigError(f"environment {self.name} at difficulty {level}: almost every task "
                          "drawn is held out; hold out fewer tasks or draw other levels")


class TaskSetSource:
    """Tasks from task sets: each draw is a frontier task of any set (with the per-task
    curriculum's ``frontier_share``), or else the next task of a set's cycle, the set picked
    by weight."""

    name = "tasksets"

    def __init__(self, specs: Sequence[TaskSetSpec], *, seed: int,
                 cursors: dict[str, tuple[int, int]], guard: Guard,
                 curriculum: TaskCurriculumSettings) -> None:
        self.specs = list(specs)
        self.cycles: dict[str, Cycle] = {}
        self.by_id: dict[str, Task] = {}
        for spec in self.specs:
            tasks = load(spec)
            kept, held = guard.kept(tasks)
            if held:
                HELD_OUT_EXCLUDED.labels(spec.name).inc(held)
                log.info("task set %s: %d of %d tasks are held out and never published",
                         spec.name, len(tasks) - len(kept), len(tasks))
            if not kept:
                raise ConfigError(f"task set {spec.name}: every task is held out")
            epoch, position = cursors.get(spec.name, (0, 0))
            self.cycles[spec.name] = Cycle(spec.name, kept, seed, epoch, position)
            self.by_id |= {t.task_id: t for t in kept}
            if (epoch, position) != (0, 0):
                log.info("task set %s: resuming at epoch %d, position %d", spec.name, epoch,
                         position)
        self.curriculum = (TaskCurriculum(curriculum, set(self.by_id))
                           if curriculum.enabled else None)
        self._weights = [s.weight for s in self.specs]

    def draw(self, count: int, rng: random.Random) -> list[Task]:
        out = []
        for _ in range(count):
            c = self.curriculum
            picked = c.frontier_pick(rng) if c is not None else None
            if picked is not None:  # ids are "<set>:<id>", and set names have no colon
                cycle = self.cycles[picked.split(":", 1)[0]]
                out.append(self._stamp(self.by_id[picked], cycle, "frontier"))
            else:
                cycle = self.cycles[rng.choices(self.specs, self._weights)[0].name]
                out.append(self._from_cycle(cycle, rng))
        if self.curriculum is not None:
            self.curriculum.counts()
        return out

    def _from_cycle(self, cycle: Cycle, rng: random.Random) -> Task:
        c = self.curriculum
        for _ in range(len(cycle.tasks)):
            task, _ = cycle.next()
            if c is None or c.take_from_cycle(task.task_id, rng):
                return self._stamp(task, cycle, "cycle")
            CYCLE_SKIPPED.labels(cycle.name).inc()
        # A whole epoch passed over (everything mastered or hopeless): take the next anyway.
        task, _ = cycle.next()
        return self._stamp(task, cycle, "cycle")

    @staticmethod
    def _stamp(task: Task, cycle: Cycle, draw: str) -> Task:
        """A new record of ``task``: its own event id and time (trajectory and group ids
        derive from the event id, so a task drawn again must not repeat it), and where in
        the cycle it was drawn."""
        source = {"taskset": cycle.name, "draw": draw, "epoch": cycle.epoch,
                  "position": cycle.position}
        return task.model_copy(update={"metadata": {**task.metadata, SOURCE: source},
                                       "event_id": uuid.uuid4(),
                                       "created_at": datetime.now(UTC)})


def resume_cursors(kafka: KafkaSettings, topic: str, names: set[str],
                   chunk: int = 2000) -> dict[str, tuple[int, int]]:
    """The newest cycle cursor of each task set in ``names`` found on ``topic``: each
    partition is read backwards in chunks until every set has been seen in it or its start
    is reached. Sets never published are absent (they start at epoch 0)."""
    consumer = Consumer(kafka.client_config() | {
        "group.id": "feeder-resume", "enable.auto.commit": False,
        "isolation.level": "read_committed",
    })
    best: dict[str, tuple[int, int]] = {}
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            raise FatalRuntimeError(f"topic {topic!r} is not available; `flywheel topics apply`")
        for p in sorted(meta.partitions):
            low, high = watermarks(consumer, topic, p)
            missing, end = set(names), high
            while missing and end > low:
                start = max(low, end - chunk)
                for name, cursor in _cursors(consumer, TopicPartition(topic, p, start), end):
                    missing.discard(name)
                    if name in names and cursor > best.get(name, (0, 0)):
                        best[name] = cursor
                end = start
    finally:
        consumer.close()
    return best


def _cursors(consumer: Consumer, tp: TopicPartition, end: int
             ) -> list[tuple[str, tuple[int, int]]]:
    """Set names and cursors of the records in ``[tp.offset, end)``."""
    consumer.assign([tp])
    out: list[tuple[str, tuple[int, int]]] = []
    position, deadline = tp.offset, time.monotonic() + 60
    try:
        while position < end:
            batch = consumer.consume(500, 1.0)
            if not batch:
                # Offsets taken by transaction markers are never delivered: follow the position.
                at = consumer.position([TopicPartition(tp.topic, tp.partition)])[0].offset
                position = max(position, at)
                if position < end and time.monotonic() > deadline:
                    raise FatalRuntimeError(f"reading {tp.topic} [{tp.partition}] back stalled "
                                            f"at offset {position} of {end}")
                continue
            for msg in batch:
                offset = msg.offset()
                if msg.error() is not None or offset is None:
                    raise FatalRuntimeError(f"reading {tp.topic} back: {msg.error()}")
                position = offset + 1
                if offset >= end:
                    break
                try:
                    source = json.loads(msg.value() or b"")["metadata"][SOURCE]
                    out.append((str(source["taskset"]),
                                (int(source["epoch"]), int(source["position"]))))
                except (ValueError, KeyError, TypeError):
                    continue  # tasks from elsewhere: an environment, `flywheel tasks seed`
    finally:
        consumer.unassign()
    return out
