"""Replay: re-run a chain of stages (scorer, filter, router) over history under new configs or
policies, without touching the live flow.

``flywheel replay --name strict --from scored --stages filter,router --policy filter=F
--policy router=G [--since T] [--until T]`` reads the live source topic (``<prefix>scored``)
over fixed offset bounds and runs the stages at the same time, each reading what the one
before writes: every stage after the first starts in processes of its own and follows its
input as it grows; once the stage before has finished, its input is complete, and it is
stopped and run to the ends of it, bounded (what it kept up with is done by then).
Everything is written under the replay's own prefix, ``<prefix>replay.<name>.``
(``...filtered``, ``...rejected``, ``...accepted.sft``, their state changelogs and
dead-letter topic), which it creates: the live router and trainer never see replayed
records, and no live consumer group moves. Each stage is a consumer group of its own
(``<prefix>replay.<name>.<service>``) with exactly-once delivery.

**Bounds.** At its first start a replay fixes, per partition of the source topic, the offsets
``[start, end)`` it covers: start at the first record at or after ``--since`` (else the
beginning), end at the first record at or after ``--until`` (else the end offset then). They
are recorded with the stages and the digests of their policies in the replay's manifest
(``<prefix>replay.<name>.manifest``, one compacted record). A later stage covers all its input
topic holds once the stage before it has finished.

**Resumable.** Run again with the same name, a replay continues where it stopped (Ctrl-C,
SIGKILL, a crash), over the bounds of its manifest, not today's end offsets; a finished replay
says so and does nothing. The same name with other stages, policies or times is refused.

A replayed filter starts with an empty duplicate memory and measures staleness against the
latest promoted version of today: a policy for old history usually sets ``max_staleness:
null``.

Over 300 lines: the manifest (bounds and policy digests) and the run that resumes from it
are one contract, read together; the workers, the report and publishing into live topics
are modules of their own (``workers``, ``report``, ``publish``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TypeVar, cast

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from pydantic import BaseModel, ConfigDict

from services.cluster import topics as topic_ops
from services.common.config import KafkaSettings, ServiceSettings
from services.common.errors import ConfigError
from services.common.service import INTERRUPTED
from services.envs.guard import Guard
from services.registry import REPLAYABLE, SERVICES
from services.replay.workers import (
    Bounds,
    Service,
    run_in_workers,
    start_workers,
    stop_workers,
    workers_for,
)

log = logging.getLogger(__name__)

CHAIN = cast(tuple[Service, ...], REPLAYABLE)  # the registry's names, checked by a test
INPUTS: dict[str, str] = {n: SERVICES[n].stream_input or "" for n in CHAIN}
OUTPUTS: dict[str, tuple[str, ...]] = {n: SERVICES[n].writes for n in CHAIN}
MANIFEST = "manifest"
"""The replay's manifest topic, under its prefix."""

S = TypeVar("S", bound=ServiceSettings)


class Manifest(BaseModel):
    """What a replay covers and runs, fixed at its first start."""

    model_config = ConfigDict(extra="forbid")

    name: str
    source: str
    stages: list[Service]
    policies: dict[str, str]
    """Stage -> sha256 of its policy or config file ("embedded" without one)."""
    since: datetime | None
    until: datetime | None
    bounds: Bounds
    """The source topic's ``[start, end)`` offsets per partition."""
    into_live: bool = False
    """Publish the routed samples into the live ``accepted.*`` topics at the end."""
    created_at: datetime
    finished_at: datetime | None = None

    def same_run(self, other: Manifest) -> bool:
        keys = ("source", "stages", "policies", "since", "until", "into_live")
        return all(getattr(self, k) == getattr(other, k) for k in keys)

    @property
    def records(self) -> int:
        """Offsets the bounds span (transaction markers included)."""
        return sum(end - start for parts in self.bounds.values()
                   for start, end in parts.values())


def stages_from(source: str, stages: Sequence[str]) -> list[Service]:
    """The stages, checked: a chain in flow order that starts at the stage reading
    ``source``."""
    first = {v: k for k, v in INPUTS.items()}.get(source)
    if first is None:
        raise ConfigError(f"--from must be one of {sorted(INPUTS.values())}, not {source!r}")
    i = CHAIN.index(first)
    if not stages or list(stages) != list(CHAIN[i:i + len(stages)]):
        raise ConfigError(f"from {source!r} the stages are a chain starting at {first!r}: "
                          f"{', '.join(CHAIN[i:])} (or a prefix of it), not {list(stages)}")
    return list(stages)  # type: ignore[arg-type]


def epoch_ms(at: datetime) -> int:
    """``at`` as a Kafka timestamp: the first whole millisecond at or after it. In integers:
    ``timestamp() * 1000`` can land a hair below a whole millisecond and truncate to the one
    before, which would take in records older than ``at``."""
    if at.tzinfo is None:
        at = at.astimezone()  # local time, as datetime.timestamp() reads it
    micros = (at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    return -(-micros // 1000)


def replay_settings(live: S, name: str, bounds: Bounds | None) -> S:
    """``live`` with outputs, group and transactional id under the replay's prefix, bounded
    (None: unbounded, a stage that follows the one before it)."""
    prefix = f"{live.kafka.topic_prefix}replay.{name}."
    return live.model_copy(update={
        "kafka": live.kafka.model_copy(update={"topic_prefix": prefix}),
        "runtime": live.runtime.model_copy(update={
            "bounds": bounds, "static_membership": False, "delivery": "exactly_once",
            "group_id": None}),
        "instance_id": f"replay-{name}",
    })


def create_topics(kafka: KafkaSettings, prefix: str, names: Sequence[str]) -> None:
    wanted = {f"{prefix}{n}" for n in names}
    specs = [s for s in topic_ops.load(prefix=prefix) if s.name in wanted]
    if MANIFEST in names:
        specs.append(topic_ops.TopicSpec(f"{prefix}{MANIFEST}", 1, None, {
            "cleanup.policy": "compact", "retention.ms": "-1"}))
    topic_ops.apply(topic_ops.admin_client(kafka), specs)


def offset_bounds(kafka: KafkaSettings, topic: str, since: datetime | None,
                  until: datetime | None) -> Bounds:
    """Per partition of ``topic``: the first offset at or after ``since`` (else the first
    one) and the first at or after ``until`` (else the end offset now)."""
    consumer = Consumer(kafka.client_config() | {"group.id": "flywheel-replay-bounds",
                                                 "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            raise ConfigError(f"source topic {topic!r} is not available")
        parts = sorted(meta.partitions)
        marks = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                 for p in parts}

        def at(when: datetime | None, default: Callable[[int], int]) -> dict[int, int]:
            if when is None:
                return {p: default(p) for p in parts}
            found = consumer.offsets_for_times(
                [TopicPartition(topic, p, epoch_ms(when)) for p in parts], timeout=10)
            return {tp.partition: tp.offset if tp.offset >= 0 else marks[tp.partition][1]
                    for tp in found}

        starts = at(since, lambda p: marks[p][0])
        ends = at(until, lambda p: marks[p][1])
    finally:
        consumer.close()
    return {topic: {p: (starts[p], max(starts[p], ends[p])) for p in parts}}


def read_manifest(kafka: KafkaSettings, topic: str, name: str) -> Manifest | None:
    """The replay's latest manifest record, or None before its first start."""
    consumer = Consumer(kafka.client_config() | {"group.id": "flywheel-replay-manifest",
                                                 "enable.auto.commit": False,
                                                 "isolation.level": "read_committed"})
    try:
        tp = TopicPartition(topic, 0)
        low, high = consumer.get_watermark_offsets(tp, timeout=10)
        if high <= low:
            return None
        consumer.assign([TopicPartition(topic, 0, low)])
        latest = None
        while True:
            msg = consumer.poll(5.0)
            if msg is None:
                raise KafkaException(f"{topic}: no record within 5 s before offset {high}")
            if msg.error() is None and msg.key() == name.encode() and msg.value():
                latest = Manifest.model_validate_json(msg.value())  # type: ignore[arg-type]
            if (msg.offset() or 0) >= high - 1:
                return latest
    finally:
        consumer.close()


def write_manifest(kafka: KafkaSettings, topic: str, manifest: Manifest) -> None:
    # Not idempotent: its producer id costs half a second to get, and a retried duplicate
    # of this one record is harmless (compacted; the latest record of a name counts).
    producer = Producer(kafka.client_config())
    producer.produce(topic, manifest.model_dump_json().encode(), manifest.name.encode())
    if producer.flush(30) != 0:
        raise KafkaException(f"the manifest of replay {manifest.name!r} was not written")


def _digest(path: Path | None) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None else "embedded"


def _live_settings(stage: Service, file: Path | None) -> ServiceSettings:
    service = SERVICES[stage]
    assert service.policy_field is not None
    settings: ServiceSettings = service.settings_class().with_overrides(
        **{service.policy_field: file})
    return settings


Progress = Callable[[str, int, int], None]
"""(stage, offsets done, offsets in all): called about once a second while a stage runs."""


class _Watch:
    """Reports a stage's progress from its group's committed offsets, from a thread."""

    def __init__(self, kafka: KafkaSettings, group: str, bounds: Bounds, stage: str,
                 progress: Progress) -> None:
        self.bounds, self.stage, self.progress = bounds, stage, progress
        self.consumer = Consumer(kafka.client_config() | {"group.id": group,
                                                          "enable.auto.commit": False})
        self.total = sum(end - start for parts in bounds.values()
                         for start, end in parts.values())
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="replay-progress")

    def done(self) -> int:
        tps = [TopicPartition(t, p) for t, parts in self.bounds.items() for p in parts]
        if not tps:
            return 0
        n = 0
        for tp in self.consumer.committed(tps, timeout=5):
            start, end = self.bounds[tp.topic][tp.partition]
            n += max(0, min(tp.offset, end) - start) if tp.offset >= 0 else 0
        return n

    def _run(self) -> None:
        while not self.stopping.wait(1.0):
            try:
                self.progress(self.stage, self.done(), self.total)
            except KafkaException as exc:  # a view only: the next second tries again
                log.debug("progress: %s", exc)

    def __enter__(self) -> _Watch:
        self.progress(self.stage, 0, self.total)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(10)
        try:
            self.progress(self.stage, self.done(), self.total)
        finally:
            self.consumer.close()


def _watched(progress: Progress | None, kafka: KafkaSettings, group: str, bounds: Bounds,
             label: str, run: Callable[[], int]) -> int:
    if progress is None:
        return run()
    with _Watch(kafka, group, bounds, label, progress):
        return run()


def _open_bounds(kafka: KafkaSettings, topic: str) -> Bounds:
    """Every partition of ``topic`` as busy: how many workers a following stage may use."""
    return {t: {p: (0, 1) for p in parts} for t, parts in
            offset_bounds(kafka, topic, None, None).items()}


def _finish(stage: Service, procs: list[BaseProcess], settings: ServiceSettings, topic: str,
            checkpoints: str, workers: int) -> int:
    """A following stage whose input is now complete (``settings`` bound it): its workers
    are stopped (each commits the batch in flight), and what they had not reached is
    processed to the ends, bounded as a stage of a sequential replay is (which knows where
    the transaction markers are). Whatever the following workers kept up with is done."""
    codes = stop_workers(procs)
    if any(code not in (0, INTERRUPTED) for code in codes):
        log.error("%s: a worker failed while following its input (exit codes %s)", stage,
                  codes)
        return 1
    return run_in_workers(stage, settings, topic, checkpoints,
                          workers_for(workers, settings.runtime.bounds or {}))


def _into_live(name: str, live: ServiceSettings, held_out: Guard, progress: Progress | None,
               say: Callable[[str], None]) -> int:
    """The routed samples into the live ``accepted.*``, once, the held-out tasks' left out
    (``services.replay.publish``)."""
    from services.common.service import serve
    from services.common.state import StateStore
    from services.replay.publish import STATE, PublishStage, publish_settings

    kafka = live.kafka
    prefix = f"{kafka.topic_prefix}replay.{name}."
    create_topics(kafka, kafka.topic_prefix, [STATE])
    published = skipped = held = 0
    for stage in ("sft", "cpt", "rl"):
        topic = f"{prefix}accepted.{stage}"
        bounds = offset_bounds(kafka, topic, None, None)
        settings = publish_settings(live, name, stage, bounds)
        publish = PublishStage(name, kafka.topic_prefix,
                               StateStore(f"{kafka.topic_prefix}{STATE}"), held_out)
        code = _watched(progress, kafka, settings.group_id, bounds, f"into live {stage}",
                        partial(serve, settings, publish, [topic]))
        if code != 0:
            if code == INTERRUPTED:
                say(f"replay {name!r} stopped publishing {stage}; run it again to resume")
            return code
        published, skipped = published + publish.published, skipped + publish.skipped
        held += publish.held_out
    say(f"into live: {published:,} samples published into {kafka.topic_prefix}accepted.*, "
        f"{skipped:,} published before (skipped), {held:,} of held-out tasks (left out)")
    return 0


def replay(name: str, source: str, stages: Sequence[str], files: dict[str, Path | None],
           since: datetime | None = None, until: datetime | None = None,
           say: Callable[[str], None] = print, progress: Progress | None = None,
           into_live: bool = False, workers: int | None = None,
           held_out: Guard | None = None) -> int:
    """Run (or resume) the replay ``name``; the exit code: 0 once finished, 130 when stopped
    before its end (run it again to resume), 1 on a failure. Each stage runs in ``workers``
    processes (:func:`workers_for`). ``into_live`` publishes all but what ``held_out`` holds
    (default: :func:`~services.feeder.settings.held_out_sets`' suite)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,100}", name):
        raise ConfigError(f"a replay's name is letters, digits, '_' and '-' (it names "
                          f"topics), not {name!r}")
    chain = stages_from(source, stages)
    unknown = sorted(set(files) - set(chain))
    if unknown:
        raise ConfigError(f"--policy for {unknown}, which this replay does not run")
    if into_live and chain[-1] != "router":
        raise ConfigError("--into-live publishes routed samples: the stages must end with "
                          "the router")
    live = {stage: _live_settings(stage, files.get(stage)) for stage in chain}
    kafka = live[chain[0]].kafka
    prefix = f"{kafka.topic_prefix}replay.{name}."
    create_topics(kafka, prefix, [MANIFEST])
    wanted = Manifest(name=name, source=source, stages=chain, since=since, until=until,
                      policies={s: _digest(files.get(s)) for s in chain}, bounds={},
                      into_live=into_live, created_at=datetime.now(UTC))
    manifest = read_manifest(kafka, f"{prefix}{MANIFEST}", name)
    if manifest is not None and not manifest.same_run(wanted):
        raise ConfigError(f"replay {name!r} was started {manifest.created_at:%Y-%m-%d %H:%M} "
                          f"from {manifest.source} with stages {manifest.stages}, policies "
                          f"{manifest.policies}, since {manifest.since}, until "
                          f"{manifest.until}: resume it with those, or choose another name")
    if manifest is not None and manifest.finished_at is not None:
        say(f"replay {name!r} finished at {manifest.finished_at:%Y-%m-%d %H:%M:%S} "
            f"({manifest.records:,} offsets of {source}); nothing to do")
        return 0
    if manifest is None:
        source_topic = f"{kafka.topic_prefix}{source}"
        manifest = wanted.model_copy(update={
            "bounds": offset_bounds(kafka, source_topic, since, until)})
        write_manifest(kafka, f"{prefix}{MANIFEST}", manifest)
        say(f"replay {name!r}: {manifest.records:,} offsets of {source}, stages "
            f"{', '.join(chain)}, into {prefix}*")
    else:
        say(f"replay {name!r}: resuming ({manifest.records:,} offsets of {source})")
    checkpoints = f"{kafka.topic_prefix}checkpoints"
    for stage in chain:
        create_topics(kafka, prefix, OUTPUTS[stage])
    following: dict[str, list[BaseProcess]] = {}
    try:
        # Every stage after the first starts now, unbounded, in processes of its own, and
        # follows what the one before writes: the stages run at the same time.
        for stage in chain[1:]:
            topic = f"{prefix}{INPUTS[stage]}"
            n = workers_for(workers, _open_bounds(kafka, topic))
            say(f"{stage}: {topic} -> {prefix}{OUTPUTS[stage][0]}... "
                f"({n} worker{'s' if n > 1 else ''}, following {INPUTS[stage]})")
            following[stage] = start_workers(
                stage, replay_settings(live[stage], name, None), topic, checkpoints, n)
        topic, bounds = f"{kafka.topic_prefix}{source}", manifest.bounds
        for i, stage in enumerate(chain):
            if i > 0:  # the stage before has finished: its output is complete, bound it
                topic = f"{prefix}{INPUTS[stage]}"
                bounds = offset_bounds(kafka, topic, None, None)
            settings = replay_settings(live[stage], name, bounds)
            if i == 0:
                n = workers_for(workers, bounds)
                say(f"{stage}: {topic} -> {prefix}{OUTPUTS[stage][0]}... "
                    f"({n} worker{'s' if n > 1 else ''})")
                run = partial(run_in_workers, stage, settings, topic, checkpoints, n)
            else:
                run = partial(_finish, stage, following.pop(stage), settings, topic,
                              checkpoints, workers or 1)
            code = _watched(progress, kafka, settings.group_id, bounds, stage, run)
            if code != 0:
                if code == INTERRUPTED:
                    say(f"replay {name!r} stopped in {stage}; run it again to resume")
                return code
    finally:
        for procs in following.values():  # stopped early: they commit what is in flight
            stop_workers(procs)
    if manifest.into_live:
        if held_out is None:
            from services.envs.heldout import guard
            from services.feeder.settings import held_out_sets

            held_out = guard(held_out_sets())
        code = _into_live(name, live["router"], held_out, progress, say)
        if code != 0:
            return code
    write_manifest(kafka, f"{prefix}{MANIFEST}", manifest.model_copy(update={
        "finished_at": datetime.now(UTC)}))
    say(f"replay {name!r} finished")
    return 0
