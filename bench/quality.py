"""``bench quality``: trajectories per second through the scorer, the filter and the router,
against a bare Kafka pass-through of the same records in the same run.

N raw trajectories shaped like the real profile's (:mod:`bench.records`: groups of 8, each
task drawn many times, 64-token completions with token ids and log-probs, keyed by task as
generators write them) are seeded once. Then, per round, on fresh topics:

- ``bare``: a plain consume -> produce copy of the raw records (``bench.runtime``'s loop);
- ``scorer``: the scorer service's runtime and stage (default config: the arithmetic
  verifier, length and repetition heuristics) over the raw records, exactly once;
- ``filter``: the filter over what the scorer wrote (default policy: rules, dedup memory,
  group assembly, state changelog), exactly once;
- ``router``: the router over what the filter accepted (default policy), exactly once.

- ``scorer_hostile``: the scorer over the same records with one hostile record after every
  ``HOSTILE_EVERY``: invalid ones (not JSON, cut short, nested 5,000 deep, a future schema
  version), each dead-lettered by the runtime, and valid ones with a 300 KB completion, which
  are scored; timed until N decoded records were handed to the scorer, so its rate against
  ``scorer``'s is what hostile input costs.

Each stage runs alone over the full backlog; the clock starts at its first batch and stops
when the batch holding its last input record is committed. Rates are of the records each was
handed; ``share_of_time_in_the_stage`` is the part of that time spent in the stage's own code
(the rest is the runtime: consuming, decoding, producing, committing). Running the three
stages as separate processes, as deployed, the pipeline goes as fast as its slowest stage
(``pipeline_rps``, reported), as long as there are cores for all three.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
import uuid
from collections.abc import Sequence
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from bench.records import GROUP as RECORDS_GROUP
from bench.records import trajectories as realistic
from bench.runtime import bare_pass_through, broker
from schemas import Message, Task, Trajectory, Turn
from services.cluster import topics as topic_ops
from services.common.config import KafkaSettings, ServiceSettings
from services.common.produce import produce_when_room
from services.common.runtime import StreamRuntime
from services.common.service import tune_gc
from services.common.stage import Output
from services.common.state import PartitionState, StateStore
from services.filter.main import FilterSettings
from services.filter.main import build_stage as build_filter
from services.router.main import RouterSettings
from services.router.main import build_stage as build_router
from services.scorer.stage import ScorerStage, ScoringConfig

log = logging.getLogger(__name__)

RECORDS = int(os.environ.get("BENCH_QUALITY_RECORDS", "20000"))
ROUNDS = int(os.environ.get("BENCH_QUALITY_ROUNDS", "3"))
HOSTILE_EVERY = 20
GROUP = 4


def group_of(task: Task, g: int) -> list[Trajectory]:
    """The GROUP trajectories of group ``g`` on ``task``: half right, half wrong."""
    right = task.verifier.answer if task.verifier else "0"
    out = []
    for i in range(GROUP):
        answer = right if i % 2 == 0 else str(int(right or 0) + 1 + i)
        text = f"{answer}"
        out.append(Trajectory(
            task=task, group_id=f"bench-{g}", sample_index=i, group_size=GROUP,
            turns=[Turn(role="user", content=task.prompt),
                   Turn(role="assistant", content=text,
                        token_ids=list(range(len(text))), logprobs=[-0.1] * len(text))],
            completion=text, completion_token_ids=list(range(len(text))),
            completion_logprobs=[-0.1] * len(text), finish_reason="stop",
            policy_version=0, model="tiny"))
    return out


def _hostile(i: int, good: bytes) -> bytes:
    """The i-th hostile record, one of five kinds, made from a valid one: four invalid, and
    one valid but huge (kind 3)."""
    kind = i % 5
    if kind == 0:
        return b"\xff\xfe not json"
    if kind == 1:
        return good[: len(good) // 2]
    if kind == 2:
        return b"[" * 5000 + b"]" * 5000
    if kind == 3:
        return good.replace(b'"completion":"', b'"completion":"' + b"x" * 300_000, 1)
    return good.replace(b'"schema_version":1', b'"schema_version":99', 1)


def _seed(bootstrap: str, topic: str, records: Sequence[Message],
          hostile_every: int = 0) -> int:
    """Produce ``records`` (with a hostile one after every ``hostile_every``); returns how
    many hostile ones."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20,
                         "message.max.bytes": 2**21})
    bad = 0
    for i, r in enumerate(records):
        value = r.to_bytes()
        produce_when_room(producer, topic, value, r.partition_key())
        if hostile_every and i % hostile_every == hostile_every - 1:
            produce_when_room(producer, topic, _hostile(bad, value), r.partition_key())
            bad += 1
    if producer.flush(120):
        raise RuntimeError("seeding did not finish")
    return bad


class _Clock:
    """Wraps a stage (plain or stateful): starts a clock at its first batch and stops the
    runtime once it has been handed ``expected`` input records."""

    def __init__(self, inner: Any, expected: int) -> None:
        self.inner, self.expected = inner, expected
        self.input_type = inner.input_type
        self.seen, self.started = 0, 0.0
        self.accepted = 0  # outputs to an accepted topic (``filtered``): the router's input
        self.inside = 0.0  # seconds inside the stage's own code
        self.seconds = 0.0  # from the first batch to the commit of the last
        self.runtime: StreamRuntime | None = None
        if hasattr(inner, "state"):
            self.state: StateStore = inner.state
            self.tick_seconds: float = inner.tick_seconds
            self.process_partition = self._partition
            self.tick = inner.tick
        else:
            self.process = self._plain

    def _count(self, n: int) -> None:
        if not self.seen:
            self.started = time.perf_counter()
        self.seen += n
        if self.seen >= self.expected and self.runtime is not None:
            self.runtime.stop()

    def _plain(self, batch: Sequence[Message]) -> list[Output]:
        self._count(len(batch))
        began = time.perf_counter()
        result: list[Output] = self.inner.process(batch)
        self.inside += time.perf_counter() - began
        return result

    def _partition(self, state: PartitionState, batch: Sequence[Message]) -> list[Output]:
        self._count(len(batch))
        began = time.perf_counter()
        result: list[Output] = self.inner.process_partition(state, batch)
        self.inside += time.perf_counter() - began
        self.accepted += sum(1 for o in result if o.topic.endswith("filtered"))
        return result


def _timed(settings: ServiceSettings, stage: Any, source: str, expected: int) -> _Clock:
    """The stage run until it was handed ``expected`` records; its clock (``seconds``: from
    its first batch to the commit of the last)."""
    clock = _Clock(stage, expected)
    runtime = StreamRuntime(settings, clock, [source])
    clock.runtime = runtime
    runtime.run()
    if clock.seen < expected:
        raise RuntimeError(f"{settings.service}: saw {clock.seen} of {expected}")
    clock.seconds = time.perf_counter() - clock.started
    return clock


def _settings(cls: type, bootstrap: str, prefix: str, **extra: Any) -> Any:
    return cls(instance_id="bench", kafka={"bootstrap_servers": bootstrap,
                                            "topic_prefix": prefix},
               metrics={"enabled": False}, runtime={"static_membership": False}, **extra)


def _round(bootstrap: str, src: str, records: int, hostile_src: str
           ) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
    """Seconds of each, the share of each stage's time spent in the stage's own code, and
    how many records each was handed."""
    prefix = f"bq{uuid.uuid4().hex[:8]}."
    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=prefix)
    topic_ops.apply(topic_ops.admin_client(kafka), topic_ops.load(prefix=prefix))
    admin = AdminClient({"bootstrap.servers": bootstrap})
    copy = f"{prefix}bare"
    for fut in admin.create_topics([NewTopic(copy, 6, 1),
                                    NewTopic(f"{prefix}scored.hostile", 6, 1)]).values():
        fut.result()
    seconds = {"bare": bare_pass_through(bootstrap, src, copy, records)}
    ss = _settings(ServiceSettings, bootstrap, prefix, service="scorer")
    clocks = {"scorer": _timed(ss, ScorerStage(ScoringConfig(), ss.topic("scored")), src,
                               records)}
    fs = _settings(FilterSettings, bootstrap, prefix)
    clocks["filter"] = _timed(fs, build_filter(fs), fs.topic("scored"), records)
    rs = _settings(RouterSettings, bootstrap, prefix)
    clocks["router"] = _timed(rs, build_router(rs), rs.topic("filtered"),
                              clocks["filter"].accepted)
    hs = _settings(ServiceSettings, bootstrap, prefix, service="scorer-hostile")
    clocks["scorer_hostile"] = _timed(
        hs, ScorerStage(ScoringConfig(), f"{prefix}scored.hostile"), hostile_src, records)
    seconds |= {k: c.seconds for k, c in clocks.items()}
    share = {k: c.inside / c.seconds for k, c in clocks.items()}
    handed = {"bare": records, **{k: c.seen for k, c in clocks.items()}}
    for fut in admin.delete_topics([copy, f"{prefix}scored.hostile",
                                    *(s.name for s in topic_ops.load(prefix=prefix))]
                                   ).values():
        fut.result()
    return seconds, share, handed


def run() -> dict[str, Any]:
    trajectories = realistic(RECORDS)
    n = len(trajectories)
    with broker() as bootstrap:
        admin = AdminClient({"bootstrap.servers": bootstrap})
        src = f"bench-quality-raw-{uuid.uuid4().hex[:8]}"
        for fut in admin.create_topics([NewTopic(src, 6, 1)]).values():
            fut.result()
        _seed(bootstrap, src, trajectories)
        hostile_src = f"{src}-hostile"
        for fut in admin.create_topics([NewTopic(hostile_src, 6, 1, config={
                "max.message.bytes": str(2**21)})]).values():
            fut.result()
        hostile = _seed(bootstrap, hostile_src, trajectories, HOSTILE_EVERY)
        tune_gc()
        # The router reads what the filter accepted (tasks repeat: a few are duplicates).
        runs = []
        for r in range(-1, ROUNDS):  # round -1 warms the broker's JVM up, untimed
            seconds, share, handed = _round(bootstrap, src, n, hostile_src)
            rate = {k: handed[k] / v for k, v in seconds.items()}
            log.info("%s: %s; share of the time in the stage: %s",
                     "warm-up" if r < 0 else f"round {r}",
                     {k: f"{v:.0f}/s" for k, v in rate.items()},
                     {k: f"{v:.0%}" for k, v in share.items()})
            if r >= 0:
                runs.append((rate, share))
        for fut in admin.delete_topics([src, hostile_src]).values():
            fut.result()
    rates = {k: [r[k] for r, _ in runs] for k in runs[0][0]}
    median = {k: statistics.median(v) for k, v in rates.items()}
    shares = {k: round(statistics.median(s[k] for _, s in runs), 3) for k in runs[0][1]}
    pipeline = min(median[k] for k in ("scorer", "filter", "router"))
    return {
        "records": n,
        "group_size": RECORDS_GROUP,
        "rounds": ROUNDS,
        "records_per_second": {k: [round(x) for x in v] for k, v in rates.items()},
        "median_records_per_second": {k: round(v) for k, v in median.items()},
        "share_of_time_in_the_stage": shares,
        "ratio_to_bare": {k: round(median[k] / median["bare"], 3)
                          for k in ("scorer", "filter", "router")},
        "summary": {
            "bare_rps": round(median["bare"]),
            "scorer_rps": round(median["scorer"]),
            "filter_rps": round(median["filter"]),
            "router_rps": round(median["router"]),
            "pipeline_rps": round(pipeline),
            "pipeline_ratio_to_bare": round(pipeline / median["bare"], 3),
            "hostile_records": hostile,
            "scorer_hostile_rps": round(median["scorer_hostile"]),
            "hostile_ratio": round(median["scorer_hostile"] / median["scorer"], 3),
        },
    }
