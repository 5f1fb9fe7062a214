"""Processes killed mid-stream: exactly-once must hold, shutdown must be bounded and clean."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from schemas import Task
from tests import factories
from tests.integration.runners import spawn_relay
from tests.kafka import Broker, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.fault]

N = 20_000


def _relay_topics(kafka: Broker, prefix: str) -> tuple[str, str]:
    """Input (seeded with N tasks), output and dlq topics for a relay under ``prefix``."""
    src, out = f"{prefix}in", f"{prefix}out"
    kafka.create_topics([src, out, f"{prefix}dlq"], partitions=3)
    kafka.produce(src, ((f"k{i}".encode(), factories.task(i).to_bytes()) for i in range(N)))
    return src, out


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
    src, out = _relay_topics(kafka, prefix)
    expected = {str(Task.from_bytes(m.value()).event_id) for m in kafka.read_all(src)}
    assert len(expected) == N

    seed = int(os.environ.get("FLYWHEEL_TEST_SEED", random.randrange(1 << 30)))
    kill_at = random.Random(seed).randrange(2_000, N - 4_000)
    print(f"seed={seed}: SIGKILL once {kill_at} records are written (uncommitted included)")
    log = tmp_path / "relay.log"
    config = dict(service="relay", prefix=prefix, inputs=[src], output=out, log=log,
                  batch_max_records=500)

    first = spawn_relay(kafka.bootstrap, **config)
    try:
        wait_until(
            lambda: first.poll() is None
            and sum(kafka.end_offsets(out, "read_uncommitted").values()) >= kill_at,
            120, f"{kill_at} records written before the kill",
        )
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        _stop(first)
    at_kill = sum(_ids(kafka, out).values())
    assert at_kill < N, "the kill came after everything was committed: nothing was tested"

    second = spawn_relay(kafka.bootstrap, **config)
    try:
        group = f"{prefix}relay"
        wait_until(lambda: kafka.committed(group, src) == kafka.end_offsets(src), 180,
                   "the restarted relay to commit every input offset")
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0, log.read_text()[-3000:]

    ids = _ids(kafka, out)
    twice = [i for i, n in ids.items() if n > 1]
    assert not twice, f"{len(twice)} records appear more than once"
    assert set(ids) == expected, f"missing {len(expected - set(ids))}"
    assert sum(ids.values()) == N
    assert at_kill > 0, "the relay had committed nothing before it was killed"
    # Records of the transaction the kill cut off are in the log but no reader sees them.
    written = len(kafka.read_all(out, isolation="read_uncommitted"))
    print(f"committed before the kill: {at_kill}; data records in the log: {written}; "
          f"aborted (invisible to read_committed): {written - N}")


def test_sigterm_finishes_the_batch_in_flight_and_exits_cleanly(
    kafka: Broker, uid: str, tmp_path: Path
) -> None:
    prefix = f"term{uid}."
    src, out = _relay_topics(kafka, prefix)
    log = tmp_path / "relay.log"
    proc = spawn_relay(kafka.bootstrap, service="relay", prefix=prefix, inputs=[src], output=out,
                       log=log, batch_max_records=200, shutdown_timeout_seconds=10)
    try:
        wait_until(lambda: sum(kafka.end_offsets(out, "read_uncommitted").values()) >= 2_000,
                   120, "the relay to be mid-stream")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(40)
        took = time.monotonic() - sent
    finally:
        _stop(proc)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert took < 25, f"shutdown took {took:.1f} s"
    assert "received SIGTERM" in text and "runtime stopped" in text
    relayed = sum(_ids(kafka, out).values())
    committed = sum(kafka.committed(f"{prefix}relay", src).values())
    assert 0 < relayed < N, "stopped mid-stream"
    # Outputs and input offsets were committed together: no batch half-done.
    assert relayed == committed
