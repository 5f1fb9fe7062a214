"""A replay stage in worker processes (``flywheel replay --workers K``).

Each worker is a member of the stage's replay consumer group with ``runtime.shared_bounds``;
see ``docs/architecture.md`` (Replay) for how they stop, how what they leave is found and
finished, and how signals and a killed replay reach them.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Literal

from confluent_kafka import Consumer, TopicPartition

from services.common.config import ServiceSettings
from services.common.logs import setup_logging, to_file
from services.common.service import INTERRUPTED
from services.registry import SERVICES

log = logging.getLogger(__name__)

Service = Literal["scorer", "filter", "router"]
Bounds = dict[str, dict[int, tuple[int, int]]]


def workers_for(requested: int | None, bounds: Bounds) -> int:
    """Worker processes for a stage: as requested (default 1), at most one per partition
    with something to do."""
    busy = sum(1 for parts in bounds.values() for start, end in parts.values() if end > start)
    return max(1, min(requested or 1, busy))


def run_in_workers(stage: Service, settings: ServiceSettings, input_topic: str,
                   checkpoints: str, workers: int) -> int:
    """Run the stage over its bounds in ``workers`` processes, members of one consumer group
    (each stops when the partitions it owns are at their end; ``shared_bounds``), then check
    that the group's offsets reached every end; what is left, if anything (a worker stopped
    early while the group rebalanced, or a member of a killed run held partitions until its
    session timed out), is finished here in one process."""
    if workers > 1:
        code = _spawn_workers(stage, settings, input_topic, checkpoints, workers)
        if code != 0 or not work_left(settings, input_topic):
            return code
        log.info("%s: the workers left records before the ends; finishing them here", stage)
    return run_stage(stage, settings, input_topic, checkpoints)


def start_workers(stage: Service, settings: ServiceSettings, input_topic: str,
                  checkpoints: str, workers: int, *, start: bool = True
                  ) -> list[BaseProcess]:
    """``workers`` processes of the stage, members of one consumer group (started unless
    ``start`` is false). Bounded settings: each stops when its partitions are at their ends
    (``shared_bounds``). Unbounded ones (a stage of a pipelined replay that follows the one
    before it): they run until :func:`stop_workers`."""
    ctx = multiprocessing.get_context("spawn")  # never fork a process with Kafka threads
    log_file = next((h.baseFilename for h in logging.getLogger().handlers
                     if isinstance(h, logging.FileHandler)), None)
    procs: list[BaseProcess] = []
    for i in range(workers):
        mine = settings.model_copy(update={
            "instance_id": f"{settings.instance_id}-w{i}",
            "runtime": settings.runtime.model_copy(update={"shared_bounds": True})})
        procs.append(ctx.Process(target=_worker, name=f"replay-{stage}-{i}", args=(
            stage, mine, input_topic, checkpoints, log_file, logging.getLogger().level)))
    if start:
        for proc in procs:
            proc.start()
    return procs


def stop_workers(procs: list[BaseProcess]) -> list[int | None]:
    """SIGTERM to each worker still running (each commits the batch in flight and stops);
    their exit codes once all have exited."""
    for proc in procs:
        if proc.pid is not None and proc.exitcode is None:
            os.kill(proc.pid, signal.SIGTERM)
    for proc in procs:
        proc.join()
    return [proc.exitcode for proc in procs]


def _spawn_workers(stage: Service, settings: ServiceSettings, input_topic: str,
                   checkpoints: str, workers: int) -> int:
    """The workers' exit code: 0 when all finished, 130 when stopped, 1 when one failed (the
    others are then stopped). SIGINT and SIGTERM here are passed on as SIGTERM: each worker
    commits the batch in flight and stops."""
    procs = start_workers(stage, settings, input_topic, checkpoints, workers, start=False)

    stopping = threading.Event()

    def stop_all(*_: object) -> None:
        stopping.set()
        for proc in procs:
            if proc.pid is not None and proc.exitcode is None:
                os.kill(proc.pid, signal.SIGTERM)

    restore = {}
    if threading.current_thread() is threading.main_thread():
        restore = {sig: signal.signal(sig, stop_all) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for proc in procs:
            proc.start()
        if stopping.is_set():  # asked while starting them: tell those started after
            stop_all()
        failed = False
        while any(proc.exitcode is None for proc in procs):
            multiprocessing.connection.wait([p.sentinel for p in procs if p.exitcode is None], 1.0)
            if not failed and any(p.exitcode not in (None, 0, INTERRUPTED) for p in procs):
                failed = True
                log.error("%s: a worker failed (exit codes %s); stopping the others", stage,
                          [p.exitcode for p in procs])
                stop_all()
    finally:
        for sig, handler in restore.items():
            signal.signal(sig, handler)
    codes = [p.exitcode for p in procs]
    if any(c not in (0, INTERRUPTED) for c in codes):
        return 1
    return INTERRUPTED if INTERRUPTED in codes else 0


def _worker(stage: Service, settings: ServiceSettings, input_topic: str, checkpoints: str,
            log_file: str | None, level: int) -> None:
    """A replay worker's process: dies with the process that started it (Linux), so a replay
    killed outright leaves no worker behind, as a crash would."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before that
            os._exit(1)
    if log_file is not None:
        to_file(Path(log_file), logging.getLevelName(level))
    else:
        setup_logging(logging.getLevelName(level))
    sys.exit(run_stage(stage, settings, input_topic, checkpoints))


def work_left(settings: ServiceSettings, input_topic: str) -> bool:
    """Whether a partition of the bounds holds a record at or past the group's committed
    offset and before its end. Between the two there may be only transaction markers, which
    a consumer steps over: read to see."""
    bounds = settings.runtime.bounds or {}
    consumer = Consumer(settings.kafka.client_config() | {
        "group.id": settings.group_id, "enable.auto.commit": False,
        "isolation.level": "read_committed"})
    try:
        tps = [TopicPartition(input_topic, p) for p, (start, end)
               in bounds.get(input_topic, {}).items() if end > start]
        ends = {tp.partition: bounds[input_topic][tp.partition][1] for tp in tps}
        left = []
        for tp in consumer.committed(tps, timeout=10) if tps else []:
            at = tp.offset if tp.offset >= 0 else bounds[input_topic][tp.partition][0]
            if at < ends[tp.partition]:
                left.append(TopicPartition(input_topic, tp.partition, at))
        if not left:
            return False
        consumer.assign(left)
        waiting = {tp.partition for tp in left}
        deadline = time.monotonic() + 30
        while waiting and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None and msg.partition() in waiting \
                    and (msg.offset() or 0) < ends[msg.partition() or 0]:
                return True
            for tp in consumer.position([TopicPartition(input_topic, p) for p in waiting]):
                if tp.offset >= ends[tp.partition]:
                    waiting.discard(tp.partition)
        return bool(waiting)  # not seen through in time: let one process make sure
    finally:
        consumer.close()


def run_stage(stage: Service, settings: Any, input_topic: str, checkpoints: str) -> int:
    """The stage's service over ``input_topic`` (a filter follows the live ``checkpoints``)."""
    service = SERVICES[stage]
    extra = {"checkpoints_topic": checkpoints} if service.follows_checkpoints else {}
    return service.run(settings, input_topic=input_topic, **extra)
