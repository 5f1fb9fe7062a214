"""The streaming runtime against a real broker: dead letters, metrics, readiness, delivery modes."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import pytest

from schemas import Task
from services.common.errors import DependencyError, FatalRuntimeError
from services.common.metrics import HealthServer
from services.common.runtime import StreamRuntime
from services.common.stage import Output
from services.relay.stage import RelayStage
from tests import factories
from tests.integration.runners import InThread, settings
from tests.kafka import Broker, wait_until

pytestmark = pytest.mark.integration


class BoomStage:
    """Relays tasks, but raises on any batch holding a prompt with 'boom' in it."""

    input_type = Task

    def __init__(self, output: str) -> None:
        self.output = output

    def process(self, batch: Sequence[Task]) -> list[Output]:
        for t in batch:
            if "boom" in t.prompt:
                raise RuntimeError(f"cannot handle {t.task_id}")
        return [Output(self.output, t) for t in batch]


def _scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def _sample(body: str, name: str, **labels: str) -> float | None:
    for line in body.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_poison_records_go_to_the_dlq_and_the_rest_comes_out(kafka: Broker, uid: str) -> None:
    src, out, dlq = f"in-{uid}", f"out-{uid}", f"dlq-{uid}"
    kafka.create_topics([src, out, dlq], partitions=3)
    boom = factories.task(99)
    boom.prompt = "boom"
    bad = {
        b"bad-utf8": (b"\xff\xfe\x00not utf-8", "decode"),
        b"bad-json": (b'{"task_id": "t", "env": ', "decode"),
        b"bad-schema": (json.dumps({"task_id": "t", "env": "x"}).encode(), "schema"),
        b"bad-stage": (boom.to_bytes(), "stage"),
    }
    records: list[tuple[bytes | None, bytes | None]] = []
    for i in range(12):
        records.append((f"ok-{i}".encode(), factories.task(i).to_bytes()))
        if i % 3 == 0:
            key = list(bad)[i // 3]
            records.append((key, bad[key][0]))
    kafka.produce(src, records, headers=[("trace-id", b"t-1")])
    sources = {m.key(): m for m in kafka.read_all(src)}

    service = f"dlq{uid}"
    rt = StreamRuntime(settings(kafka.bootstrap, service), BoomStage(out), [src], dlq_topic=dlq)
    with InThread(rt) as running:
        wait_until(lambda: len(kafka.read_all(out)) == 12 and len(kafka.read_all(dlq)) == 4,
                   60, "12 outputs and 4 dead letters")
    assert running.error is None

    assert sorted(Task.from_bytes(m.value()).task_id for m in kafka.read_all(out)) == sorted(
        f"arith-{i}" for i in range(12)
    )
    letters = {m.key(): m for m in kafka.read_all(dlq)}
    assert set(letters) == set(bad)
    for key, (value, kind) in bad.items():
        letter, source = letters[key], sources[key]
        headers = dict(letter.headers())
        assert letter.value() == value, "the original bytes are kept"
        assert headers["flywheel-error-type"] == kind.encode()
        assert headers["flywheel-error-class"] in (b"ValidationError", b"RuntimeError")
        assert headers["flywheel-error-message"]
        assert headers["flywheel-source-topic"] == src.encode()
        assert headers["flywheel-source-partition"] == str(source.partition()).encode()
        assert headers["flywheel-source-offset"] == str(source.offset()).encode()
        assert headers["flywheel-service"] == service.encode()
        assert headers["trace-id"] == b"t-1"
    assert b"cannot handle arith-99" in dict(letters[b"bad-stage"].headers())[
        "flywheel-error-message"
    ]


def test_metrics_move_lag_returns_to_zero_and_readiness_follows_assignment(
    kafka: Broker, uid: str
) -> None:
    """Two instances, one partition: exactly one is assigned, so exactly one is ready."""
    src, out = f"in-{uid}", f"out-{uid}"
    kafka.create_topics([src, out, f"flywheel.dlq-{uid}"], partitions=1)
    n = 20_000
    kafka.produce(src, ((None, factories.task(i).to_bytes()) for i in range(n)))
    service = f"metrics{uid}"
    runtimes, servers = [], []
    for i in range(2):
        # Dynamic membership: a cleanly stopped member leaves at once, so failover is prompt.
        s = settings(kafka.bootstrap, service, batch_max_records=100, static_membership=False)
        s.instance_id = f"i{i}"
        rt = StreamRuntime(s, RelayStage(Task, out), [src], dlq_topic=f"flywheel.dlq-{uid}")
        runtimes.append(rt)
        servers.append(HealthServer("127.0.0.1", 0, alive=lambda rt=rt: rt.alive,
                                    ready=lambda rt=rt: rt.ready).start())
    ports = [srv.port for srv in servers]
    try:
        assert [_scrape(p, "/readyz")[0] for p in ports] == [503, 503]
        with InThread(runtimes[0]) as first, InThread(runtimes[1]) as second:
            lags, consumed = [], []
            def progressed() -> bool:
                body = _scrape(ports[0])[1]
                lag = _sample(body, "flywheel_runtime_consumer_lag_records", service=service)
                if lag is not None:
                    lags.append(lag)
                consumed.append(_sample(body, "flywheel_runtime_records_consumed_total",
                                        service=service, topic=src) or 0.0)
                return consumed[-1] >= n and lags[-1:] == [0.0]
            wait_until(progressed, 120, "all records consumed and lag back to 0", interval=0.05)
            assert max(lags) > 0, "lag was never seen above 0 while a backlog existed"
            assert consumed == sorted(consumed) and len(set(consumed)) > 2, "counter moved"

            body = _scrape(ports[0])[1]
            assert _sample(body, "flywheel_runtime_records_produced_total",
                           service=service, topic=out) == n
            assert (_sample(body, "flywheel_runtime_transactions_total", service=service,
                            outcome="committed") or 0) >= n / 100
            assert re.search(rf'flywheel_runtime_batch_seconds_count{{service="{service}"}}', body)
            readiness = sorted(_scrape(p, "/readyz")[0] for p in ports)
            assert readiness == [200, 503]
            assert [_scrape(p, "/healthz")[0] for p in ports] == [200, 200]

            # The assigned instance leaves: the other takes the partition over and gets ready.
            active = 0 if runtimes[0].ready else 1
            (first if active == 0 else second).stop()
            other = ports[1 - active]
            wait_until(lambda: _scrape(other, "/readyz")[0] == 200, 60, "failover readiness")
            assert _scrape(ports[active], "/healthz")[0] == 503
        assert first.error is None and second.error is None
    finally:
        for srv in servers:
            srv.close()
    assert len(kafka.read_all(out)) == n


def test_at_least_once_delivers_everything_and_commits_after_delivery(
    kafka: Broker, uid: str
) -> None:
    src, out = f"in-{uid}", f"out-{uid}"
    kafka.create_topics([src, out, f"dlq-{uid}"], partitions=3)
    n = 5000
    kafka.produce(src, ((None, factories.task(i).to_bytes()) for i in range(n)))
    service = f"alo{uid}"
    s = settings(kafka.bootstrap, service, delivery="at_least_once")
    rt = StreamRuntime(s, RelayStage(Task, out), [src], dlq_topic=f"dlq-{uid}")
    with InThread(rt) as running:
        wait_until(lambda: sum(kafka.committed(s.group_id, src).values()) == n, 60,
                   "offsets of every input committed")
    assert running.error is None
    ids = [Task.from_bytes(m.value()).task_id for m in kafka.read_all(out)]
    assert sorted(set(ids)) == sorted(f"arith-{i}" for i in range(n))
    assert kafka.committed(s.group_id, src) == kafka.end_offsets(src)


def test_a_missing_input_topic_stops_the_service_with_a_clear_error(
    kafka: Broker, uid: str
) -> None:
    kafka.create_topics([f"out-{uid}", f"dlq-{uid}"], partitions=1)
    s = settings(kafka.bootstrap, f"missing{uid}")
    rt = StreamRuntime(s, RelayStage(Task, f"out-{uid}"), [f"no-such-topic-{uid}"],
                       dlq_topic=f"dlq-{uid}")
    with pytest.raises(FatalRuntimeError, match="topics apply"):
        rt.run()
    assert not rt.alive


def test_a_missing_output_topic_stops_the_service_instead_of_aborting_forever(
    kafka: Broker, uid: str
) -> None:
    src = f"in-{uid}"
    kafka.create_topics([src, f"dlq-{uid}"], partitions=1)
    kafka.produce(src, [(None, factories.task(0).to_bytes())])
    s = settings(kafka.bootstrap, f"noout{uid}")
    rt = StreamRuntime(s, RelayStage(Task, f"no-such-output-{uid}"), [src],
                       dlq_topic=f"dlq-{uid}")
    with pytest.raises(FatalRuntimeError, match=f"no-such-output-{uid}"):
        rt.run()
    assert kafka.committed(s.group_id, src) == {0: 0}, "nothing may be committed"


def test_a_missing_dlq_topic_is_refused_at_start(kafka: Broker, uid: str) -> None:
    src = f"in-{uid}"
    kafka.create_topics([src], partitions=1)
    s = settings(kafka.bootstrap, f"nodlq{uid}")
    rt = StreamRuntime(s, RelayStage(Task, src), [src], dlq_topic=f"no-such-dlq-{uid}")
    with pytest.raises(FatalRuntimeError, match=f"no-such-dlq-{uid}"):
        rt.run()


def test_an_input_whose_output_is_too_large_is_dead_lettered_and_the_rest_flows(
    kafka: Broker, uid: str
) -> None:
    src, out, dlq = f"in-{uid}", f"out-{uid}", f"dlq-{uid}"
    kafka.create_topics([src, out, dlq], partitions=1)
    big = factories.task(7, pad=50_000).to_bytes()
    kafka.produce(src, [(b"small-0", factories.task(0).to_bytes()), (b"big", big),
                        (b"small-1", factories.task(1).to_bytes())])
    s = settings(kafka.bootstrap, f"big{uid}", max_record_bytes=20_000)
    with InThread(StreamRuntime(s, RelayStage(Task, out), [src], dlq_topic=dlq)) as running:
        wait_until(lambda: len(kafka.read_all(out)) == 2 and len(kafka.read_all(dlq)) == 1,
                   60, "2 outputs and 1 dead letter")
    assert running.error is None
    assert sorted(m.key() for m in kafka.read_all(out)) == [b"arith-0", b"arith-1"]  # task_id
    [letter] = kafka.read_all(dlq)
    headers = dict(letter.headers())
    assert letter.key() == b"big" and letter.value() is None
    assert headers["flywheel-error-class"] == b"OutputTooLarge"
    assert headers["flywheel-value-omitted"] == f"{len(big)} bytes".encode()
    assert headers["flywheel-source-offset"] == b"1"


class DownStage:
    input_type = Task

    def process(self, batch: Sequence[Task]) -> list[Output]:
        raise DependencyError("scoring sandbox pool unreachable")


def test_a_dependency_failure_stops_the_service_without_dead_lettering(
    kafka: Broker, uid: str
) -> None:
    src, dlq = f"in-{uid}", f"dlq-{uid}"
    kafka.create_topics([src, dlq], partitions=1)
    kafka.produce(src, [(None, factories.task(i).to_bytes()) for i in range(5)])
    s = settings(kafka.bootstrap, f"down{uid}")
    rt = StreamRuntime(s, DownStage(), [src], dlq_topic=dlq)
    with pytest.raises(DependencyError, match="unreachable"):
        rt.run()
    assert kafka.read_all(dlq) == []
    assert kafka.committed(s.group_id, src) == {0: 0}, "the batch stays to be processed again"


def test_members_sharing_bounds_each_stop_and_together_take_every_record_once(
        kafka: Broker, uid: str) -> None:
    """A replay's workers: two members of one group over bounded input, the second joining
    while the first works (a rebalance mid-run, revocations, possibly an empty assignment).
    Each stops by itself without error; together they wrote every task exactly once, and the
    group's offsets are at the ends (:func:`services.replay.workers.work_left` agrees)."""
    from confluent_kafka import Producer

    from services.replay.workers import work_left

    src, out, dlq = f"sb-in-{uid}", f"sb-out-{uid}", f"sb-dlq-{uid}"
    kafka.create_topics([src, out, dlq], partitions=6)
    producer = Producer({"bootstrap.servers": kafka.bootstrap, "transactional.id": uid})
    producer.init_transactions(30)
    for part in range(3):  # in transactions: the ends sit after commit markers
        producer.begin_transaction()
        for i in range(part * 1000, (part + 1) * 1000):
            producer.produce(src, factories.task(i).to_bytes(), f"k{i}".encode())
        producer.commit_transaction(30)
    ends = kafka.end_offsets(src)
    bounds = {src: {p: (0, end) for p, end in ends.items()}}
    base = settings(kafka.bootstrap, f"sb{uid}", bounds=bounds, shared_bounds=True,
                    batch_max_records=50)
    members = [base.model_copy(update={"instance_id": f"w{i}"}) for i in range(2)]
    first = InThread(StreamRuntime(members[0], BoomStage(out), [src], dlq_topic=dlq))
    second = InThread(StreamRuntime(members[1], BoomStage(out), [src], dlq_topic=dlq))
    with first:
        wait_until(lambda: len(kafka.read_all(out)) > 0 or first.error is not None, 60,
                   "the first member to commit output")
        with second:
            wait_until(lambda: all(not m.thread.is_alive() for m in (first, second)), 120,
                       "both members to stop by themselves")
    assert first.error is None and second.error is None
    assert first.runtime.finished and second.runtime.finished
    written = [Task.from_bytes(m.value()).task_id for m in kafka.read_all(out)]
    assert sorted(written) == sorted(f"arith-{i}" for i in range(3000))
    assert not work_left(base, src)


def test_fence_offsets_after_a_rewind_never_pass_the_rewound_records(
        kafka: Broker, uid: str) -> None:
    """Issue 38 suspected that after an abort's rewind (a seek back), a timer-only
    transaction's fence offsets (``positions``) could come from a position the seek had not
    yet moved, committing past records never processed. librdkafka answers the position of a
    partition just sought as unknown (the seek is asynchronous), so ``positions`` falls back
    to the group's committed offset: where the rewound batches begin. Shown here on the real
    broker, seek after seek."""
    from confluent_kafka import Consumer, TopicPartition

    from services.common.offsets import positions

    topic = f"seek{uid}"
    kafka.create_topics([topic], partitions=1)
    kafka.produce(topic, ((None, str(i).encode()) for i in range(300)))
    consumer = Consumer(kafka.conf(**{"group.id": f"seek{uid}", "enable.auto.commit": False,
                                      "auto.offset.reset": "earliest"}))
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        committed = 0
        for rewind in range(10):
            got: list[Any] = []
            while len(got) < 20:  # a batch past the committed offset, "aborted"
                got += [m for m in consumer.consume(20 - len(got), 5) if m.error() is None]
            assert positions(consumer, [tp])[(topic, 0)] == committed + 20
            consumer.seek(TopicPartition(topic, 0, committed))  # the rewind
            fence = positions(consumer, [tp])[(topic, 0)]
            # Nothing committed yet: no offset (the runtime sends none); else the committed.
            assert fence == committed if committed else fence < 0, (rewind, fence)
            consumer.consume(20, 5)  # processed again, and this time committed
            committed += 20
            consumer.commit(offsets=[TopicPartition(topic, 0, committed)], asynchronous=False)
    finally:
        consumer.close()
