"""``bench replay``: records per second of a filter,router replay over history, against a bare
read of the same history in the same run.

N scored arithmetic trajectories (``bench.quality``'s raw groups of 4, scored by the real
scorer stage with its default config) are written to ``<prefix>scored`` in transactions, as
the scorer writes them; version 0 is promoted. Then, per round:

- ``bare``: a plain confluent-kafka consumer (read_committed, the runtime's tuning) reads the
  N records and does nothing else: the floor of any replay;
- ``parse`` and ``decode``: the same read, each value then parsed by the standard ``json``
  module, or decoded and validated as a ``ScoredTrajectory`` (what every stage does to each
  input record before it can decide anything). Not replays: the floors any replay that looks
  into its records stands on, so the ratio's distance from the target can be read against
  them;
- ``replay``: ``flywheel replay --from scored --stages filter,router`` as the command runs it
  (``services.replay.run.replay``, default policies): manifest and bounds, both stages one after
  the other, exactly once, into topics of its own. Its clock covers the whole command;
- ``replay_workers``: the same with ``--workers`` = the machine's CPU count (``BENCH_REPLAY_
  WORKERS``), each stage in that many processes.

Reported: records per second of each, the ratio of the faster replay to the bare read
(target: at least 0.5x), and the ratios of the two floors to the bare read. The broker is
``FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS`` if set, else a local one, on this machine: the workers
share its cores with the broker.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, Producer

from bench.quality import _trajectories
from bench.runtime import broker
from schemas import CheckpointEvent, ScoredTrajectory
from services.cluster import topics as topic_ops
from services.common.clients import CONSUMER_TUNING
from services.common.config import KafkaSettings
from services.common.produce import produce_when_room
from services.common.service import tune_gc
from services.replay.run import replay
from services.scorer.stage import ScorerStage, ScoringConfig

log = logging.getLogger(__name__)

RECORDS = int(os.environ.get("BENCH_REPLAY_RECORDS", "50000"))
ROUNDS = int(os.environ.get("BENCH_REPLAY_ROUNDS", "2"))
WORKERS = int(os.environ.get("BENCH_REPLAY_WORKERS", str(os.cpu_count() or 2)))
TARGET = 0.5


def _scored(n: int) -> list[ScoredTrajectory]:
    stage = ScorerStage(ScoringConfig(), "scored")
    raw = _trajectories(n)
    out: list[ScoredTrajectory] = []
    for i in range(0, len(raw), 1000):
        out += [o.value for o in stage.process(raw[i:i + 1000])]  # type: ignore[misc]
    return out


def _seed(bootstrap: str, prefix: str, records: list[ScoredTrajectory]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20,
                         "transactional.id": f"bench-replay-{uuid.uuid4().hex[:8]}"})
    producer.init_transactions(30)
    for i in range(0, len(records), 5000):
        producer.begin_transaction()
        for r in records[i:i + 5000]:
            produce_when_room(producer, f"{prefix}scored", r.to_bytes(), r.partition_key())
        producer.commit_transaction(60)
    promoted = CheckpointEvent(model="tiny", version=0, uri="/nowhere", manifest=[],
                               status="promoted")
    producer.begin_transaction()
    producer.produce(f"{prefix}checkpoints", promoted.to_bytes(), b"tiny")
    producer.commit_transaction(30)


def _bare_read(bootstrap: str, topic: str, records: int,
               look: Callable[[bytes], object] | None = None) -> float:
    """Seconds to read ``records`` committed records of ``topic``, each value handed to
    ``look`` when given."""
    consumer = Consumer(CONSUMER_TUNING | {
        "bootstrap.servers": bootstrap, "group.id": f"bench-read-{uuid.uuid4().hex}",
        "auto.offset.reset": "earliest", "isolation.level": "read_committed",
        "enable.auto.commit": False})
    consumer.subscribe([topic])
    seen, started = 0, time.perf_counter()
    try:
        while seen < records:
            for msg in consumer.consume(1000, 0.5):
                if msg.error() is None:
                    seen += 1
                    if look is not None:
                        look(msg.value())  # type: ignore[arg-type]
    finally:
        consumer.close()
    return time.perf_counter() - started


def run() -> dict[str, Any]:
    records = _scored(RECORDS)
    n = len(records)
    with broker() as bootstrap:
        prefix = f"br{uuid.uuid4().hex[:8]}."
        kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=prefix)
        topic_ops.apply(topic_ops.admin_client(kafka), topic_ops.load(prefix=prefix))
        _seed(bootstrap, prefix, records)
        os.environ |= {"FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
                       "FLYWHEEL_KAFKA__TOPIC_PREFIX": prefix,
                       "FLYWHEEL_METRICS__ENABLED": "false"}
        tune_gc()
        runs: list[dict[str, float]] = []
        for r in range(-1, ROUNDS):  # round -1 warms the broker's JVM up, untimed
            source = f"{prefix}scored"
            seconds = {"bare": _bare_read(bootstrap, source, n),
                       "parse": _bare_read(bootstrap, source, n, json.loads),
                       "decode": _bare_read(bootstrap, source, n, ScoredTrajectory.from_bytes)}
            for label, workers in (("replay", 1), ("replay_workers", WORKERS)):
                started = time.perf_counter()
                code = replay(f"bench{r + 1}-{workers}", "scored", ["filter", "router"], {},
                              say=log.info, workers=workers)
                seconds[label] = time.perf_counter() - started
                if code != 0:
                    raise RuntimeError(f"the replay exited with {code}")
            log.info("%s: %s", "warm-up" if r < 0 else f"round {r}",
                     {k: f"{n / v:,.0f}/s" for k, v in seconds.items()})
            if r >= 0:
                runs.append(seconds)
    rates = {k: [n / s[k] for s in runs] for k in runs[0]}
    median = {k: statistics.median(v) for k, v in rates.items()}
    best = max(median["replay"], median["replay_workers"])
    ratio = best / median["bare"]
    return {
        "records": n,
        "rounds": ROUNDS,
        "workers": WORKERS,
        "records_per_second": {k: [round(x) for x in v] for k, v in rates.items()},
        "median_records_per_second": {k: round(v) for k, v in median.items()},
        "ratio_to_bare_read": round(ratio, 4),
        "floors_to_bare_read": {k: round(median[k] / median["bare"], 4)
                                for k in ("parse", "decode")},
        "target": TARGET,
        "summary": {"replay_rps": round(median["replay"]),
                    "replay_workers_rps": round(median["replay_workers"]), "bare_read_rps":
                    round(median["bare"]), "ratio": round(ratio, 4), "target": TARGET,
                    "decode_floor_ratio": round(median["decode"] / median["bare"], 4),
                    "met": ratio >= TARGET},
    }
