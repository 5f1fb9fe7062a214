"""Seeding tasks and the feeder's bounded backlog, against a real broker."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from schemas import Task
from services.envs.heldout import HeldOut
from services.envs.tasksets import SOURCE, FieldMap, TaskSetSpec, load, split, write_rows
from services.feeder.loop import Feeder
from services.feeder.settings import FeederSettings
from services.feeder.sources import TaskSetSource
from tests import factories
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


def test_seed_leaves_the_gates_held_out_tasks_out(kafka: Broker, uid: str,
                                                  tmp_path: Path) -> None:
    """``tasks seed`` used to publish whatever it drew: the default suite's own seed
    republished every held-out task. Now the gate's suite (its default, or a profile's) is
    kept off ``tasks`` by id and by prompt."""
    from services.envs.heldout import HeldOut, guard, suite

    prefix, other = f"seedh{uid}.", f"seedp{uid}."
    kafka.create_topics([f"{prefix}tasks", f"{other}tasks"], partitions=3)
    default = HeldOut()
    done = _seed(kafka, prefix, "--count", "300", "--seed", str(default.seed))
    assert done.returncode == 0, done.stderr
    left_out = int(done.stderr.split("left out ")[1].split()[0])
    assert left_out >= default.count - 5, done.stderr  # its own draws: all held out
    published = [Task.from_bytes(m.value()) for m in kafka.read_all(f"{prefix}tasks")]
    assert len(published) == 300 - left_out
    assert not [t for t in published if guard(suite(None)).holds(t)]
    # A profile whose suite is a task file of arithmetic prompts under ids of its own form.
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"id": f"q{a}", "prompt": f"{a}+{a}=", "answer": "0",
                                        "env": "arithmetic"}) + "\n" for a in range(10)),
                    encoding="utf-8")
    profile = tmp_path / "p.yaml"
    profile.write_text(json.dumps({"gate": {"held_out": {"name": "mine",
                                                         "tasks_file": str(held)}}}))
    mine = _seed(kafka, other, "--count", "200", "--difficulty", "1", "--seed", "2",
                 "--profile", str(profile))
    assert mine.returncode == 0 and "left out" in mine.stderr, mine.stderr
    tasks = [Task.from_bytes(m.value()) for m in kafka.read_all(f"{other}tasks")]
    assert len(tasks) == int(mine.stderr.split("published ")[1].split()[0]) < 200
    doubles = {f"{a}+{a}=" for a in range(10)}
    assert not [t for t in tasks if t.prompt in doubles]


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


def _settings(kafka: Broker, prefix: str, **fields: Any) -> FeederSettings:
    return FeederSettings(kafka={"bootstrap_servers": kafka.bootstrap, "topic_prefix": prefix},
                          interval_seconds=0.2, seed=7, metrics={"enabled": False}, **fields)


def _published(kafka: Broker, topic: str) -> list[Task]:
    tasks = [Task.from_bytes(m.value()) for m in kafka.read_all(topic)]
    return sorted(tasks, key=lambda t: (t.metadata[SOURCE]["epoch"],
                                        t.metadata[SOURCE]["position"]))


def test_a_task_set_is_cycled_across_a_restart_with_none_starved_and_none_held_out(
        kafka: Broker, uid: str, tmp_path: Path) -> None:
    rows = [{"qid": i, "q": f"What is {i} + 3?", "a": i + 3} for i in range(40)]
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    fields = FieldMap(id="qid", prompt="q", answer="a")
    full = TaskSetSpec(name="sums", path=path, fields=fields)
    train, test = split(full, held_out=8, seed=1)
    write_rows(tmp_path / "held.jsonl", test, "jsonl")
    held = HeldOut(taskset=TaskSetSpec(name="sums", path=tmp_path / "held.jsonl",
                                       fields=fields))
    held_ids = {t.task_id for t in held.tasks()}
    assert len(held_ids) == 8 and len(train) == 32

    # The feeder is given the whole file: it must keep the 8 held-out tasks off `tasks` itself.
    topics = {}
    for run in ("restarted", "straight"):
        prefix = f"sets{run[0]}{uid}."
        topics[run] = f"{prefix}tasks"
        kafka.create_topics([topics[run], f"{prefix}scored"], partitions=3)
        settings = dict(tasksets=[full], held_out=held, task_curriculum={"enabled": False})
        if run == "restarted":
            first = Feeder(_settings(kafka, prefix, target_backlog=50, **settings))
            assert first.tick() == 50  # an epoch and a half
            first.backlog.close()
            second = Feeder(_settings(kafka, prefix, target_backlog=100, **settings))
            assert second.tick() == 50  # nobody consumed: 50 waiting, 50 more
            second.backlog.close()
        else:
            once = Feeder(_settings(kafka, prefix, target_backlog=100, **settings))
            assert once.tick() == 100
            once.backlog.close()

    restarted, straight = (_published(kafka, topics[r]) for r in ("restarted", "straight"))
    assert [t.task_id for t in restarted] == [t.task_id for t in straight], \
        "the restart changed the sequence"
    assert not held_ids & {t.task_id for t in restarted}
    # Each publication is its own record: trajectory and group ids derive from event ids.
    assert len({t.event_id for t in restarted}) == 100
    cursors = [(t.metadata[SOURCE]["epoch"], t.metadata[SOURCE]["position"]) for t in restarted]
    assert len(set(cursors)) == 100, "a cursor was published twice"
    by_epoch: dict[int, list[str]] = {}
    for t in restarted:
        by_epoch.setdefault(t.metadata[SOURCE]["epoch"], []).append(t.task_id)
    train_ids = {f"sums:{r['qid']}" for r in train}
    for epoch in (0, 1):  # every task once per full epoch: none starved, none twice
        assert sorted(by_epoch[epoch]) == sorted(train_ids)
    assert by_epoch[0] != by_epoch[1], "each epoch is shuffled anew"
    assert len(by_epoch[3]) == 100 - 3 * 32


def test_the_per_task_curriculum_rebuilds_its_states_from_scored_after_a_restart(
        kafka: Broker, uid: str, tmp_path: Path) -> None:
    prefix = f"cur{uid}."
    kafka.create_topics([f"{prefix}tasks", f"{prefix}scored"], partitions=3)
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": f"q{i}", "answer": "1"}) + "\n"
                            for i in range(6)), encoding="utf-8")
    spec = TaskSetSpec(name="t", path=path)
    tasks = {t.task_id: t for t in load(spec)}
    # Planted verdicts: t:0 always passes, t:1 one in four, t:2 never over 40 tries.
    plan = {"t:0": [True] * 16, "t:1": [i % 4 == 0 for i in range(16)], "t:2": [False] * 40}
    records = []
    for task_id, verdicts in plan.items():
        for i, passed in enumerate(verdicts):
            s = factories.scored(i)
            traj = s.trajectory.model_copy(update={"task": tasks[task_id],
                                                   "group_id": f"{task_id}-{i // 8}",
                                                   "group_size": 8})
            s = s.model_copy(update={"trajectory": traj,
                                     "verdict": "correct" if passed else "incorrect"})
            records.append((task_id.encode(), s.to_bytes()))
    kafka.produce(f"{prefix}scored", records)

    settings = _settings(kafka, prefix, target_backlog=400, tasksets=[spec])
    for _ in ("first start", "restart"):
        feeder = Feeder(settings)
        assert isinstance(feeder.source, TaskSetSource) and feeder.follower is not None
        curriculum = feeder.source.curriculum
        assert curriculum is not None
        feeder.follower.start()
        try:
            wait_until(feeder.follower.caught_up.is_set, 60, "the curriculum to read scored")
            assert curriculum.counts() == {"new": 3, "frontier": 1, "mastered": 1,
                                           "unsolved": 0, "hopeless": 1}
            # 9 complete groups of 8: t:1's two vary; t:0's two and t:2's five do not
            assert curriculum.variance_share() == pytest.approx(2 / 9)
        finally:
            feeder.follower.stop()
            feeder.backlog.close()
    # What it draws from those states: the frontier task most, mastered and hopeless rarely.
    drawn = Counter(t.task_id for t in feeder.source.draw(400, random.Random(1)))
    assert drawn["t:1"] > 200
    assert drawn["t:0"] < 20 and drawn["t:2"] < 20
    assert all(drawn[f"t:{i}"] > 20 for i in (3, 4, 5))  # new tasks keep coming


@pytest.mark.parametrize(("content", "where", "error"), [
    ('{"id": 1, "prompt": "1+1?", "answer": "2"}\n{"id": 2, "prompt": "2+2?"\n', ":2:",
     "not JSON"),
    ('{"id": 1, "prompt": "1+1?", "answer": "2"}\n{"id": 2, "answer": "4"}\n', ":2:",
     "missing field 'prompt'"),
])
def test_flywheel_up_refuses_a_bad_task_file_naming_it_and_publishes_nothing(
        kafka: Broker, uid: str, tmp_path: Path, content: str, where: str, error: str) -> None:
    prefix = f"bad{uid}."
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(content, encoding="utf-8")
    profile = tmp_path / "p.yaml"
    profile.write_text(json.dumps({
        "home": str(tmp_path / "home"), "model_path": str(tmp_path / "no-model"),
        "kafka": {"bootstrap_servers": kafka.bootstrap, "topic_prefix": prefix},
        "feeder": {"tasksets": [{"name": "mine", "path": str(tasks)}]},
    }), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "services", "up", "--profile", str(profile),
                           "--no-view"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 1, done.stderr
    # On one line, the path whole (a path longer than the console once got cut mid-word)
    assert f"{tasks}{where} {error}" in done.stderr, done.stderr
    topics = kafka.admin().list_topics(timeout=10).topics
    assert not [t for t in topics if t.startswith(prefix)], "something was set up"


def test_flywheel_up_refuses_an_unknown_verifier(tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text(json.dumps({
        "home": str(tmp_path / "home"),
        "kafka": {"bootstrap_servers": "127.0.0.1:1"},
        "feeder": {"tasksets": [{"name": "m", "path": "t.jsonl", "verifier": "vibes"}]},
    }), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "services", "up", "--profile", str(profile),
                           "--no-view"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    said = " ".join(done.stderr.split())
    assert done.returncode == 1, said
    assert "profile section 'feeder'" in said and "tasksets.0.verifier" in said, said
