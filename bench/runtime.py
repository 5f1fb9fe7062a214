"""``bench runtime``: records per second through the streaming runtime, against bare Kafka.

Three contenders copy the same N records of about 1 KB (valid ``Task`` messages) from one
input topic to a fresh output topic, interleaved over several rounds, each with a new consumer
group reading from the beginning:

- ``bare``: a plain confluent-kafka loop, ``consume`` -> ``produce`` the same bytes, auto-commit.
  Its clients get the runtime's tuning (fetch back-off, prefetch size, idempotence, linger), so
  the comparison isolates the runtime's own cost rather than librdkafka settings.
- ``at_least_once`` and ``exactly_once``: :class:`StreamRuntime` running the relay stage, which
  validates every record against the schema, forwards its bytes, and commits as its mode
  says. The bench process tunes the garbage collector as the services do at start.

One untimed warm-up round of each comes first (the broker's JVM starts cold). The clock starts
at the first record consumed (group join excluded) and stops when the last
output is acknowledged (bare), or when the runtime returns after committing the batch holding
the N-th record. Targets: at-least-once >= 0.8x bare, exactly-once >= 0.5x bare.

The broker is ``FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS`` if set, else a local one started for the
run from the installed jars and stopped after.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from schemas import Task
from services.cluster import local_broker as local_kafka
from services.common.clients import CONSUMER_TUNING, PRODUCER_TUNING
from services.common.config import ServiceSettings
from services.common.runtime import StreamRuntime
from services.common.service import tune_gc
from services.common.stage import Output
from services.relay.stage import RelayStage

log = logging.getLogger(__name__)

RECORDS = int(os.environ.get("BENCH_RUNTIME_RECORDS", "100000"))
ROUNDS = int(os.environ.get("BENCH_RUNTIME_ROUNDS", "5"))
WARMUP_ROUNDS = 1  # untimed: the broker's JVM starts cold in every run
PARTITIONS = 3
RECORD_BYTES = 1024
TARGETS = {"at_least_once": 0.8, "exactly_once": 0.5}


@contextlib.contextmanager
def broker() -> Iterator[str]:
    existing = os.environ.get("FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS")
    if existing:
        yield existing
        return
    with local_kafka.temporary() as broker:
        yield broker.bootstrap


def _record(i: int) -> bytes:
    """A valid Task padded to RECORD_BYTES of JSON."""
    task = Task(task_id=f"bench-{i}", env="arithmetic", prompt="", difficulty=1)
    task.prompt = "x" * (RECORD_BYTES - len(task.to_bytes()))
    data = task.to_bytes()
    assert len(data) == RECORD_BYTES, len(data)
    return data


def _seed(bootstrap: str, topic: str) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for i in range(RECORDS):
        while True:
            try:
                producer.produce(topic, _record(i), f"bench-{i}".encode())
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120):
        raise RuntimeError("seeding the input topic did not finish")


def bare_pass_through(bootstrap: str, src: str, out: str, records: int = RECORDS) -> float:
    """Seconds for a plain consume -> produce loop to copy ``records`` records, from the first
    consumed to the last acknowledged."""
    consumer = Consumer(CONSUMER_TUNING | {
        "bootstrap.servers": bootstrap, "group.id": f"bench-bare-{uuid.uuid4().hex}",
        "auto.offset.reset": "earliest", "isolation.level": "read_committed",
    })
    producer = Producer(PRODUCER_TUNING | {
        "bootstrap.servers": bootstrap, "enable.idempotence": True,
    })
    consumer.subscribe([src])
    seen, started = 0, 0.0
    try:
        while seen < records:
            for msg in consumer.consume(1000, 0.2):
                if msg.error():
                    continue
                if not seen:
                    started = time.perf_counter()
                while True:
                    try:
                        producer.produce(out, msg.value(), msg.key())
                        break
                    except BufferError:
                        producer.poll(0.05)
                seen += 1
            producer.poll(0)
        if producer.flush(60):
            raise RuntimeError("bare loop: outputs left unacknowledged")
        return time.perf_counter() - started
    finally:
        consumer.close()


class _Timed:
    """The relay stage, plus a clock and a stop once N records went through."""

    def __init__(self, output: str) -> None:
        self.inner = RelayStage(Task, output)
        self.input_type = Task
        self.seen = 0
        self.started = 0.0
        self.runtime: StreamRuntime | None = None

    def process(self, batch: Sequence[Task]) -> list[Output]:
        if not self.seen:
            self.started = time.perf_counter()
        self.seen += len(batch)
        if self.seen >= RECORDS and self.runtime is not None:
            self.runtime.stop()  # the loop commits this batch, then returns
        return self.inner.process(batch)


def _runtime(bootstrap: str, src: str, out: str, dlq: str, delivery: str) -> float:
    settings = ServiceSettings(
        service=f"bench-{delivery}-{uuid.uuid4().hex[:8]}", instance_id="0",
        kafka={"bootstrap_servers": bootstrap}, metrics={"enabled": False},
        runtime={"delivery": delivery, "static_membership": False},
    )
    stage = _Timed(out)
    runtime = StreamRuntime(settings, stage, [src], dlq_topic=dlq)
    stage.runtime = runtime
    runtime.run()
    if stage.seen != RECORDS:
        raise RuntimeError(f"{delivery}: processed {stage.seen} of {RECORDS}")
    return time.perf_counter() - stage.started


def run() -> dict[str, Any]:
    with broker() as bootstrap:
        admin = AdminClient({"bootstrap.servers": bootstrap})
        tag = uuid.uuid4().hex[:8]
        src, dlq = f"bench-runtime-in-{tag}", f"bench-runtime-dlq-{tag}"
        rounds = range(-WARMUP_ROUNDS, ROUNDS)
        outputs = {f"{mode}-{r}": f"bench-runtime-out-{tag}-{mode}-{r}"
                   for r in rounds for mode in ("bare", "at_least_once", "exactly_once")}
        futures = admin.create_topics(
            [NewTopic(t, PARTITIONS, 1) for t in (src, dlq, *outputs.values())]
        )
        for fut in futures.values():
            fut.result()
        _seed(bootstrap, src)
        tune_gc()  # as every service does at start (services.common.service.serve)
        seconds: dict[str, list[float]] = {"bare": [], "at_least_once": [], "exactly_once": []}
        for r in rounds:
            for mode in seconds:
                out = outputs[f"{mode}-{r}"]
                took = (bare_pass_through(bootstrap, src, out) if mode == "bare"
                        else _runtime(bootstrap, src, out, dlq, mode))
                log.info("%s %s: %.0f records/s", "warm-up" if r < 0 else f"round {r}", mode,
                         RECORDS / took)
                if r >= 0:
                    seconds[mode].append(took)
        for fut in admin.delete_topics([src, dlq, *outputs.values()]).values():
            fut.result()

    rates = {mode: [RECORDS / s for s in runs] for mode, runs in seconds.items()}
    median = {mode: statistics.median(r) for mode, r in rates.items()}
    ratios = {mode: median[mode] / median["bare"] for mode in TARGETS}
    return {
        "records": RECORDS,
        "record_bytes": RECORD_BYTES,
        "partitions": PARTITIONS,
        "rounds": ROUNDS,
        "warmup_rounds": WARMUP_ROUNDS,
        "records_per_second": {m: [round(x) for x in r] for m, r in rates.items()},
        "median_records_per_second": {m: round(x) for m, x in median.items()},
        "ratio_to_bare": {m: round(x, 3) for m, x in ratios.items()},
        "targets": TARGETS,
        "meets_targets": {m: ratios[m] >= t for m, t in TARGETS.items()},
        "summary": {
            "bare_rps": round(median["bare"]),
            **{f"{m}_rps": round(median[m]) for m in TARGETS},
            **{f"{m}_ratio": round(ratios[m], 3) for m in TARGETS},
        },
    }
