"""The whole embedded flywheel under faults, then an independent accounting over its topics.

``flywheel up``'s stack runs with its own local broker. Once a version past the seed model is
promoted, hostile records go to every consumed topic (tests/hostile.py, and forged checkpoint
events pointing at real folders in the store), a slice of committed ``raw`` records is written
again (what a generator restarted between producing and committing does), and then, one at a
time, each service is SIGKILLed while it works (its process group: children too), observed
in the running system, never timed; the supervisor restarts it, and the next kill waits until
it works again. Then the broker is stopped mid-stream and started again: every service's
/readyz must turn false while it is away and true after, with no service restarted. The run
ends when a version promoted after all that is served by every generator.

The accounting reads the topics with its own consumers, decoding every record itself:

- every ``raw`` record before the scorer's committed offset is scored exactly once, or
  dead-lettered (by source offset);
- every ``scored`` record before the filter's committed offset ends in exactly one of
  ``filtered``, ``rejected`` or ``dlq``, or waits in the filter's state (an open group); a
  trajectory is accepted at most once, and its repeats are rejected as duplicates;
- no trajectory twice in one ``accepted.*`` stage;
- the trainer's candidate versions are 1..N, and their ``trained_on`` ranges tile each input
  partition from 0 to the trainer's committed offset: no gap, no overlap;
- every hostile record is on ``dlq`` with its reason, from the service that consumes its
  topic (exactly once where that service is exactly-once).

Not in the default run (about 10 minutes on 2 cores): ``make faults``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from schemas import (
    CheckpointEvent,
    FileDigest,
    Trajectory,
)
from services.cluster import local_broker as local_kafka
from services.cluster.local_broker import free_port, free_ports
from services.models.manifest import build_manifest
from services.seed_model import SeedModelSettings
from services.up.profile import Profile
from services.up.stack import Stack
from services.up.view import Snapshot
from tests import hostile
from tests.accounting import Accounting, account, header
from tests.integration.runners import ready
from tests.kafka import Broker
from tests.signing import sign

pytestmark = [pytest.mark.integration, pytest.mark.model, pytest.mark.fault]

GENERATORS = ("generator-0", "generator-1")
KILLED = ("feeder", "generator-0", "scorer", "filter", "router", "trainer", "gate")
SERVICES = ("feeder", *GENERATORS, "scorer", "filter", "router", "trainer", "gate")
SEED = SeedModelSettings(samples=100_000)
HOSTILE_PER_TOPIC = 24
REPEATED = 40  # committed raw records written again
BUDGET_SECONDS = 2400.0


def _promoted(snapshot: Snapshot) -> int:
    """The newest version the gate promoted (forged promotions are not the gate's)."""
    return max((e.version for e in snapshot.versions if e.status == "promoted"
                and e.producer is not None and e.producer.service == "gate"), default=0)


@dataclass
class Injected:
    topic: str
    partition: int
    offset: int
    kind: str


@dataclass
class Faults:
    """The stack's ``until``: a script advanced once per snapshot (about every second)."""

    stack: Stack
    broker: Broker
    prefix: str
    store: Path
    phase: str = "warm-up"
    injected: list[Injected] = field(default_factory=list)
    repeated: list[tuple[str, str]] = field(default_factory=list)
    repeated_at: list[tuple[int, int]] = field(default_factory=list)
    """Where the repeats went on ``raw``: (partition, offset)."""
    kills: dict[str, dict[str, Any]] = field(default_factory=dict)
    outage: dict[str, Any] = field(default_factory=dict)
    done: bool = False
    snapshot: Snapshot | None = None

    def __post_init__(self) -> None:
        self._script = self._run()

    def __call__(self, snapshot: Snapshot) -> bool:
        self.snapshot = snapshot
        self.done = next(self._script)
        return self.done

    # -- observations ---------------------------------------------------------------------

    def _produced(self, name: str) -> float:
        assert self.snapshot is not None
        return float(self.snapshot.rows.get(name, {}).get("produced") or 0.0)

    def _log(self, name: str) -> str:
        path = self.stack.home / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def _training(self) -> bool:
        """The trainer is inside a round: its log's last round began after its last commit."""
        text = self._log("trainer")
        return text.rfind("training round for") > text.rfind("committed:")

    def _evaluating(self) -> bool:
        """A candidate is committed that the gate has not decided yet."""
        assert self.snapshot is not None
        text = self._log("trainer")
        at = text.rfind("candidate v")
        if at < 0:
            return False
        candidate = int(text[at + len("candidate v"):].split(" ", 1)[0])
        decided = {e.version for e in self.snapshot.versions}
        return candidate not in decided

    def _decided(self) -> int:
        """The newest version the gate decided on."""
        assert self.snapshot is not None
        return max((e.version for e in self.snapshot.versions
                    if e.producer is not None and e.producer.service == "gate"), default=0)

    def _ready(self, name: str) -> bool:
        return ready(self.stack.ports[name])

    # -- the script -----------------------------------------------------------------------

    def _run(self) -> Iterator[bool]:
        supervisor = self.stack.supervisor
        assert supervisor is not None
        while not all(self._ready(n) for n in SERVICES):
            yield False
        self.phase = "hostile input"
        self._inject()  # early, so that the trainer's backlog does not hide it long
        while self.snapshot is None or _promoted(self.snapshot) < 1:
            yield False
        self._repeat_raw()
        for name in KILLED:
            child = supervisor.children[name]
            self.phase = f"{name}: waiting for it to work"
            base = self._produced(name)
            if name == "trainer":
                working = self._training
            elif name == "gate":
                working = self._evaluating
            else:
                def working(name: str = name, base: float = base) -> bool:
                    return self._produced(name) > base
            while not working() or child.proc is None:
                yield False
            restarts, produced, decided = child.restarts, self._produced(name), self._decided()
            os.killpg(child.proc.pid, signal.SIGKILL)
            self.kills[name] = {"at_produced": produced, "at_decided": decided}
            self.phase = f"{name}: waiting for its restart to work"
            started = time.monotonic()
            while True:
                yield False
                if child.restarts <= restarts or not self._ready(name):
                    continue
                if name in ("trainer", "gate"):  # a decision on a candidate after the kill
                    if self._decided() > decided:
                        break
                elif self._produced(name) > 0:  # counters start again at 0
                    break
            self.kills[name]["recovered_seconds"] = round(time.monotonic() - started, 1)
        yield from self._broker_outage(supervisor)
        self.phase = "a promotion after the faults, served by every generator"
        assert self.snapshot is not None
        after = _promoted(self.snapshot)
        while _promoted(self.snapshot) <= after:
            yield False
        while True:  # the newest promoted version (it may move on meanwhile) served by all
            newest = _promoted(self.snapshot)
            if all(self.snapshot.rows[g].get("serving") == newest for g in GENERATORS):
                break
            yield False
        since = {g: self._produced(g) for g in GENERATORS}  # then a batch of it from each
        while not all(self._produced(g) > since[g] for g in GENERATORS):
            yield False
        self.outage["final_version"] = newest
        self.phase = "every hostile record consumed"
        while not self._all_consumed():
            yield False
        yield True

    def _all_consumed(self) -> bool:
        """Every injected record is behind its consumer group's committed offset, and every
        repeat behind the scorer's (the filter then decides it within its group timeout)."""
        committed = self.broker.committed(self.prefix + "scorer", self.prefix + "raw")
        if any(offset >= committed[p] for p, offset in self.repeated_at):
            return False
        for topic in {h.topic for h in self.injected}:
            group = self.prefix + hostile.CONSUMER[topic[len(self.prefix):]]
            committed = self.broker.committed(group, topic)
            if any(h.offset >= committed[h.partition] for h in self.injected
                   if h.topic == topic):
                return False
        return True

    def _broker_outage(self, supervisor: Any) -> Iterator[bool]:
        self.phase = "broker: every service ready before it stops"
        while not all(self._ready(n) for n in SERVICES):
            yield False
        restarts = {n: c.restarts for n, c in supervisor.children.items()}
        kafka_dir = self.stack.home / "kafka"
        port = self.stack.profile.broker_port
        stopped = time.monotonic()
        local_kafka.stop(kafka_dir)
        self.phase = "broker away: every /readyz false"
        unready: set[str] = set()
        while unready != set(SERVICES):
            unready |= {n for n in SERVICES if not self._ready(n)}
            yield False
        self.outage["all_unready_seconds"] = round(time.monotonic() - stopped, 1)
        local_kafka.start(kafka_dir, port)
        back = time.monotonic()
        self.phase = "broker back: every /readyz true"
        while not all(self._ready(n) for n in SERVICES):
            yield False
        self.outage["ready_again_seconds"] = round(time.monotonic() - back, 1)
        self.outage["restarts_during"] = {
            n: c.restarts - restarts[n] for n, c in supervisor.children.items()
            if c.restarts != restarts[n]}

    # -- what is written --------------------------------------------------------------------

    def _inject(self) -> None:
        producer = Producer({"bootstrap.servers": self.broker.bootstrap})
        sent: list[tuple[str, str, Any]] = []

        def report(kind: str) -> Any:
            def on_delivery(err: Any, msg: Any) -> None:
                assert err is None, err
                self.injected.append(Injected(msg.topic(), msg.partition(), msg.offset(),
                                              kind))
            return on_delivery

        for topic in hostile.TYPES:
            key = b"policy" if topic == "checkpoints" else None
            for kind, value in hostile.records(topic, HOSTILE_PER_TOPIC):
                producer.produce(self.prefix + topic, value, key, on_delivery=report(kind))
                sent.append((topic, kind, value))
        for kind, event in self._forged():
            producer.produce(self.prefix + "checkpoints", event.to_bytes(), b"policy",
                             on_delivery=report(kind))
        assert producer.flush(60) == 0

    def _forged(self) -> list[tuple[str, CheckpointEvent]]:
        """Promotions of checkpoints that must never load: each refused for its own reason.
        All but the first are signed with the gate's key, as a gate that was fooled would
        sign them: the checks behind the signature's still hold."""
        root = self.store
        good = sorted(p for p in root.glob("v*") if (p / "config.json").is_file())[0]
        outside = self.stack.home / "outside"
        outside.mkdir()

        def copy(name: str) -> Path:
            folder = root / f"forged-{name}"
            folder.mkdir()
            for f in ("config.json", "model.safetensors"):
                (folder / f).write_bytes((good / f).read_bytes())
            return folder

        def event(kind: str, folder: Path, n: int, manifest: list[FileDigest] | None = None
                  ) -> tuple[str, CheckpointEvent]:
            return kind, sign(CheckpointEvent(
                model=self.stack.profile.model_name, version=10_000 + n, uri=str(folder),
                manifest=manifest if manifest is not None else build_manifest(folder),
                status="promoted"))

        # Sound weights, promoted by someone without the gate's key.
        forged = [("unsigned", CheckpointEvent(
            model=self.stack.profile.model_name, version=10_100, uri=str(good),
            manifest=build_manifest(good), status="promoted"))]
        forged.append(event("outside_root", outside, 0, build_manifest(good)))
        link = root / "forged-link"
        link.symlink_to(outside, target_is_directory=True)
        forged.append(event("symlink", link, 1, build_manifest(good)))
        pickled = copy("pickle")
        (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04\x95pickle")
        forged.append(event("pickle", pickled, 2))
        tampered = copy("sha256")
        manifest = build_manifest(tampered)
        weights = tampered / "model.safetensors"
        weights.write_bytes(bytes(b ^ 1 for b in weights.read_bytes()[:64])
                            + weights.read_bytes()[64:])
        forged.append(event("sha256", tampered, 3, manifest))
        truncated = copy("truncated")
        manifest = build_manifest(truncated)
        data = (truncated / "model.safetensors").read_bytes()
        (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
        forged.append(event("truncated", truncated, 4, manifest))
        absurd = copy("config")
        config = json.loads((absurd / "config.json").read_text())
        (absurd / "config.json").write_text(json.dumps(config | {"hidden_size": 10**9}))
        forged.append(event("absurd_config", absurd, 5))
        escape = copy("escape")
        forged.append(event("manifest_escape", escape, 6, [
            *build_manifest(escape), FileDigest(path="../../outside/x", sha256="0" * 64,
                                                size_bytes=1)]))
        return forged

    def _repeat_raw(self) -> None:
        """Committed raw records written again, byte for byte: a generator's repeats."""
        topic = self.prefix + "raw"
        hostile_at = {(h.topic, h.partition, h.offset) for h in self.injected}
        records = [m for m in self.broker.read_all(topic)
                   if (m.topic(), m.partition(), m.offset()) not in hostile_at][:REPEATED]
        producer = Producer({"bootstrap.servers": self.broker.bootstrap})

        def written(err: Any, msg: Any) -> None:
            assert err is None, err
            self.repeated_at.append((msg.partition(), msg.offset()))

        for m in records:
            producer.produce(topic, m.value(), m.key(), on_delivery=written)
            self.repeated.append((str(Trajectory.from_bytes(m.value()).event_id),
                                  m.key().decode() if m.key() else ""))
        assert producer.flush(60) == 0


@pytest.mark.timeout(BUDGET_SECONDS + 900)
def test_every_service_killed_and_the_broker_restarted_lose_and_repeat_nothing(
        tmp_path: Path) -> None:
    profile = Profile(home=tmp_path / "home", checkpoint_url=str(tmp_path / "store"),
                      generators=len(GENERATORS), bootstrap=SEED, broker_port=free_port(),
                      kafka={"topic_prefix": "fault."})
    profile.metrics_port = free_ports(profile.processes)
    prefix = "fault."
    stack = Stack(profile)
    stack.prepare(say=print)
    kafka = Broker(stack.kafka["bootstrap_servers"])
    faults = Faults(stack, kafka, prefix, tmp_path / "store")
    try:
        final = stack.run(seconds=BUDGET_SECONDS, until=faults, stop_broker=False,
                          supervisor_options={"grace": 60.0})
        print("kills:", json.dumps(faults.kills), "\noutage:", json.dumps(faults.outage))
        assert faults.done, f"the run did not finish in {BUDGET_SECONDS:.0f} s: {faults.phase}"
        assert set(faults.kills) == set(KILLED)
        assert faults.outage["restarts_during"] == {}, faults.outage
        # Over the whole run: each killed service restarted once, no other process at all.
        restarts = {n: r["restarts"] for n, r in final.rows.items()}
        assert restarts == {n: int(n in KILLED) for n in SERVICES}, restarts
        _account(kafka, prefix, faults)
    finally:
        local_kafka.stop(stack.home / "kafka")


def _account(kafka: Broker, prefix: str, faults: Faults) -> None:
    books = Accounting(kafka, prefix)

    # Every hostile record is dead-lettered, with its reason, by its topic's consumer.
    missing, twice = [], []
    for h in faults.injected:
        letters = books.dead.get((h.topic, h.partition, h.offset), [])
        topic = h.topic[len(prefix):]
        if not letters:
            missing.append((topic, h.kind))
            continue
        for m in letters:
            assert header(m, "flywheel-service") == hostile.CONSUMER[topic], (topic, h.kind)
            assert header(m, "flywheel-error-message"), (topic, h.kind)
        if len(letters) > 1 and topic != "tasks":  # the generator alone is at-least-once
            twice.append((topic, h.kind))
    print(f"hostile records: {len(faults.injected)}; kinds "
          f"{dict(Counter(h.kind for h in faults.injected))}")
    assert not missing, f"not dead-lettered: {missing}"
    assert not twice, f"dead-lettered twice by an exactly-once service: {twice}"

    # The chain: nothing lost, nothing twice, repeats decided as duplicates.
    counts = account(books, {i for i, _ in faults.repeated})
    print("accounting:", json.dumps(counts))
