"""Processes killed mid-stream: exactly-once must hold, shutdown must be bounded and clean."""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from schemas import Task
from tests import factories
from tests.integration.runners import (
    Feed,
    frozen_mid_transaction,
    kill_mid_transaction,
    spawn_relay,
)
from tests.kafka import Broker, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.fault]

N = 20_000
CHUNK = 2_000  # tasks fed at a time


def _relay_topics(kafka: Broker, prefix: str) -> tuple[str, str, Feed]:
    """Input, output and dlq topics for a relay under ``prefix``; the input's N tasks come in
    through the returned feed, of which the first two chunks are in already."""
    src, out = f"{prefix}in", f"{prefix}out"
    kafka.create_topics([src, out, f"{prefix}dlq"], partitions=3)
    feed = Feed(kafka, src, [(f"k{i}".encode(), factories.task(i).to_bytes()) for i in range(N)],
                chunk=CHUNK)
    feed.more(2)
    return src, out, feed


def _ids(kafka: Broker, topic: str) -> Counter[str]:
    return Counter(str(Task.from_bytes(m.value()).event_id) for m in kafka.read_all(topic))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


def test_sigkill_mid_stream_then_restart_gives_each_record_exactly_once(
    kafka: Broker, uid: str, tmp_path: Path
) -> None:
    prefix = f"crash{uid}."
    src, out, feed = _relay_topics(kafka, prefix)
    expected = {str(Task.from_bytes(v).event_id) for _, v in feed.records}
    assert len(expected) == N

    log = tmp_path / "relay.log"
    group = f"{prefix}relay"
    config = dict(service="relay", prefix=prefix, inputs=[src], output=out, log=log,
                  batch_max_records=200)  # a chunk spans ten transactions

    first = spawn_relay(kafka.bootstrap, **config)
    try:
        left = kill_mid_transaction(kafka, first, group=group, inputs=[src], outputs=[out],
                                    more=feed.more)
    finally:
        _stop(first)
    at_kill = sum(_ids(kafka, out).values())
    aborted = kafka.aborted(out)
    print(f"SIGKILL inside a transaction of {aborted} records, {left} input records "
          f"uncommitted; {at_kill} committed before")
    assert aborted > 0
    feed.rest()

    second = spawn_relay(kafka.bootstrap, **config)
    try:
        wait_until(lambda: kafka.left(group, src) == 0, 180,
                   "the restarted relay to commit every input record")
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0, log.read_text()[-3000:]

    ids = _ids(kafka, out)
    twice = [i for i, n in ids.items() if n > 1]
    assert not twice, f"{len(twice)} records appear more than once"
    assert set(ids) == expected, f"missing {len(expected - set(ids))}"
    assert sum(ids.values()) == N
    assert at_kill > 0, "the relay had committed nothing before it was killed"
    # The records of the transaction the kill cut off stay in the log; no reader sees them.
    assert len(kafka.read_all(out, isolation="read_uncommitted")) == N + aborted


def test_sigterm_finishes_the_batch_in_flight_and_exits_cleanly(
    kafka: Broker, uid: str, tmp_path: Path
) -> None:
    prefix = f"term{uid}."
    src, out, feed = _relay_topics(kafka, prefix)
    log = tmp_path / "relay.log"
    group = f"{prefix}relay"
    proc = spawn_relay(kafka.bootstrap, service="relay", prefix=prefix, inputs=[src], output=out,
                       log=log, batch_max_records=200, shutdown_timeout_seconds=10)
    try:
        # More input left than the batch in flight and the one open can hold (2 x 200).
        with frozen_mid_transaction(kafka, proc, group=group, inputs=[src], outputs=[out],
                                    more=feed.more, at_least=1_000) as left:
            proc.send_signal(signal.SIGTERM)  # handled once it runs again
            sent = time.monotonic()
        code = proc.wait(40)
        took = time.monotonic() - sent
    finally:
        _stop(proc)
    text = log.read_text()
    assert code == 0, text[-3000:]
    # Bounded: the batch in flight within shutdown_timeout_seconds (10), and the close.
    assert took < 25, f"shutdown took {took:.1f} s"
    assert "received SIGTERM" in text and "runtime stopped" in text
    relayed = sum(_ids(kafka, out).values())
    committed = sum(kafka.committed(group, src).values())
    print(f"SIGTERM with {left} input records uncommitted; {relayed} relayed of {feed.sent}")
    assert 0 < relayed < feed.sent, "stopped mid-stream: the rest left for the next instance"
    # Outputs and input offsets were committed together: no batch half-done.
    assert relayed == committed
