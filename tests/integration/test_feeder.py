"""Seeding tasks and the feeder's bounded backlog, against a real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from schemas import Task
from services.feeder.main import Feeder, FeederSettings
from tests.integration.runners import InThread
from tests.kafka import Broker, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _seed(kafka: Broker, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap,
           "FLYWHEEL_KAFKA__TOPIC_PREFIX": prefix}
    return subprocess.run([sys.executable, "-m", "services", "tasks", "seed", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120, check=False)


def test_seed_from_an_environment_and_from_a_file(kafka: Broker, uid: str, tmp_path: Path) -> None:
    prefix = f"seed{uid}."
    kafka.create_topics([f"{prefix}tasks"], partitions=3)
    done = _seed(kafka, prefix, "--env", "arithmetic", "--count", "50", "--difficulty", "2",
                 "--seed", "1")
    assert done.returncode == 0, done.stderr
    assert "published 50 tasks" in done.stderr
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"prompt": "Capital of France?", "answer": "Paris"}) + "\n"
                 + json.dumps({"prompt": "9+9=", "env": "arithmetic", "answer": "18"}) + "\n")
    assert _seed(kafka, prefix, "--file", str(f)).returncode == 0
    tasks = [Task.from_bytes(m.value()) for m in kafka.read_all(f"{prefix}tasks")]
    assert len(tasks) == 52
    arithmetic = [t for t in tasks if t.env == "arithmetic" and t.difficulty == 2]
    assert len(arithmetic) == 50 and all(t.producer and t.producer.service == "cli"
                                         for t in tasks)
    assert {t.env for t in tasks} == {"arithmetic", "reference"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "env": "chess"}) + "\n")
    refused = _seed(kafka, prefix, "--file", str(bad))
    assert refused.returncode == 1 and "unknown environment" in refused.stderr


class _FeederLoop:
    """Adapts Feeder to the InThread runner."""

    def __init__(self, feeder: Feeder) -> None:
        self.feeder = feeder

    def run(self) -> None:
        self.feeder.run()

    def stop(self) -> None:
        self.feeder.stop()


def test_feeder_keeps_the_backlog_at_its_target(kafka: Broker, uid: str) -> None:
    prefix = f"feed{uid}."
    topic = f"{prefix}tasks"
    kafka.create_topics([topic], partitions=2)
    settings = FeederSettings(
        kafka={"bootstrap_servers": kafka.bootstrap, "topic_prefix": prefix},
        target_backlog=100, interval_seconds=0.2, seed=3, metrics={"enabled": False},
    )
    feeder = Feeder(settings)
    published = lambda: sum(kafka.end_offsets(topic, "read_uncommitted").values())  # noqa: E731
    with InThread(_FeederLoop(feeder)) as running:  # type: ignore[arg-type]
        wait_until(lambda: published() == 100, 30, "the first 100 tasks")
        wait_until(lambda: feeder.backlog.size() == 100, 60, "the backlog measured at 100")
        ticks = 5
        for _ in range(ticks):  # nobody consumes: it must not publish more
            assert feeder.tick() == 0
        assert published() == 100

        # A generator takes 60 tasks and commits: the feeder tops the backlog back up.
        gen = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": f"{prefix}generator",
                        "enable.auto.commit": False})
        ends = kafka.end_offsets(topic, "read_uncommitted")
        take = {0: min(60, ends[0]), 1: 60 - min(60, ends[0])}  # 60 in all, however split
        gen.commit(offsets=[TopicPartition(topic, p, n) for p, n in take.items()],
                   asynchronous=False)
        gen.close()
        wait_until(lambda: published() == 160, 30, "the backlog topped up by 60")
        assert feeder.backlog.size() == 100
    assert running.error is None
    tasks = [Task.from_bytes(m.value()) for m in kafka.read_all(topic)]
    assert len(tasks) == 160 and {t.env for t in tasks} == {"arithmetic"}
