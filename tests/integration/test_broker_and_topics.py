"""The local broker as a user starts it (CLI), and topics as code against a real cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

from services.cluster import topics
from services.cluster.local_broker import free_port
from services.registry import TOPICS
from tests.kafka import Broker, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _flywheel(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services", *args], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=300, check=False,
    )


def test_cli_broker_lifecycle_kcat_and_idempotent_topics(tmp_path: Path, kcat: str) -> None:
    """`flywheel kafka install && flywheel kafka start`, kcat -L, `topics apply` twice, restart."""
    data, port = tmp_path / "kafka", free_port()
    install = _flywheel("kafka", "install")
    assert install.returncode == 0, install.stderr
    assert "already installed" in _flywheel("kafka", "install").stderr

    start = _flywheel("kafka", "start", "--data-dir", str(data), "--port", str(port))
    assert start.returncode == 0, start.stderr
    address = start.stdout.strip()
    assert address == f"127.0.0.1:{port}"
    try:
        again = _flywheel("kafka", "start", "--data-dir", str(data), "--port", str(port))
        assert again.returncode == 0 and "already running" in again.stderr
        assert again.stdout.strip() == address
        assert _flywheel("kafka", "status", "--data-dir", str(data)).stdout.strip() == address

        listing = subprocess.run([kcat, "-L", "-b", address], capture_output=True, text=True,
                                 timeout=60, check=True).stdout
        assert f"broker 1 at {address}" in listing

        env = {"FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS": address}
        first = _flywheel("topics", "apply", env=env)
        assert first.returncode == 0, first.stderr
        assert first.stderr.count("created") == len(TOPICS)
        second = _flywheel("topics", "apply", env=env)
        assert second.returncode == 0, second.stderr
        assert "no changes" in second.stderr and "changed" not in second.stderr

        # apply returned once the broker's metadata had every topic: kcat sees them at once.
        out = subprocess.run([kcat, "-L", "-b", address], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        assert all(f'topic "flywheel.{name}"' in out for name in TOPICS), out

        # Stop and start again from the same folder: storage is not reformatted, topics stay.
        assert _flywheel("kafka", "stop", "--data-dir", str(data)).returncode == 0
        assert _flywheel("kafka", "status", "--data-dir", str(data)).returncode == 1
        restart = _flywheel("kafka", "start", "--data-dir", str(data), "--port", str(port))
        assert restart.returncode == 0, restart.stderr
        shown = _flywheel("topics", "list", env=env)
        assert shown.returncode == 0, shown.stderr
        assert "flywheel.accepted.rl" in shown.stdout and "missing" not in shown.stdout
        assert "no changes" in _flywheel("topics", "apply", env=env).stderr
    finally:
        _flywheel("kafka", "stop", "--data-dir", str(data))


def test_apply_converges_and_describe_shows_end_offsets(kafka: Broker, uid: str) -> None:
    prefix = f"apply{uid}."
    specs = topics.load(prefix=prefix)
    admin = kafka.admin()
    first = topics.apply(admin, specs)
    assert len(first.changes) == len(TOPICS)
    assert topics.apply(admin, specs).changes == []

    # Someone changed a config by hand: apply puts the declared value back, and only that.
    raw = f"{prefix}raw"
    resource = ConfigResource(ConfigResource.Type.TOPIC, raw, incremental_configs=[
        ConfigEntry("retention.ms", "1000", incremental_operation=AlterConfigOpType.SET)])
    for fut in admin.incremental_alter_configs([resource]).values():
        fut.result()
    wait_until(  # the change reaches the broker's metadata cache asynchronously (KRaft)
        lambda: topics.describe(admin, [s for s in specs if s.name == raw])[0]
        .config["retention.ms"] == "1000", 30, "the hand-made config change to show",
    )
    drift = topics.apply(admin, specs)
    assert drift.changes == [f"{raw}: retention.ms '1000' -> '-1'"]
    assert topics.apply(admin, specs).changes == []

    # Declaring more partitions adds them, with a warning about key re-mapping.
    grown = [s if s.name != raw else topics.TopicSpec(s.name, s.partitions + 2,
             s.replication_factor, s.config) for s in specs]
    report = topics.apply(admin, grown)
    assert report.changes == [f"{raw}: partitions 6 -> 8"] and report.warnings
    assert topics.apply(admin, grown).changes == [], "applying the same file again is a no-op"
    assert topics.describe(admin, [s for s in specs if s.name == raw])[0].partitions == 8
    shrunk = topics.apply(admin, specs)
    assert shrunk.changes == [] and "cannot remove" in shrunk.warnings[0]

    kafka.produce(f"{prefix}tasks", [(f"k{i}".encode(), b"{}") for i in range(7)])
    states = {s.name: s for s in topics.describe(admin, specs)}
    assert sum(states[f"{prefix}tasks"].end_offsets.values()) == 7
    assert states[raw].partitions == 8 and states[raw].config["retention.ms"] == "-1"
    assert all(s.exists for s in states.values())
