"""The gate on a real broker: a good candidate is promoted and generators reload it; a
degraded one is rejected and generators keep the promoted version. Gate and generator run as
on a host that does not mount the trainer's store: they fetch each version over HTTP from a
real server on localhost (the mounted path runs in the flywheel and rollback tests)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from schemas import CheckpointEvent
from services.cluster import topics as topic_ops
from services.common.checkpoints import CheckpointFollower
from services.common.config import KafkaSettings
from services.common.runtime import StreamRuntime
from services.envs.heldout import HeldOut
from services.gate.main import GateSettings, build_stage
from tests.integration.runners import InThread, http_server
from tests.kafka import Broker, wait_until
from tests.signing import signer, verifier

pytestmark = [pytest.mark.integration, pytest.mark.model]


def test_the_gate_promotes_a_better_candidate_and_rejects_a_degraded_one(
        kafka: Broker, uid: str, tmp_path: Path) -> None:
    import torch

    from services.models.engines import TransformersEngine
    from services.models.tiny import tiny_model
    from services.trainer.store import CheckpointStore
    from services.trainer.train import OptimSettings, make_optimizer
    from tests.unit.test_training import _sft_round

    prefix = f"g{uid}."
    settings = KafkaSettings(bootstrap_servers=kafka.bootstrap, topic_prefix=prefix)
    topic_ops.apply(topic_ops.admin_client(settings), topic_ops.load(prefix=prefix))
    base = tiny_model(tmp_path / "base", seed=1)
    root = tmp_path / "store"
    store = CheckpointStore(str(root))

    trainer = TransformersEngine(base)  # its model is trained in place
    s = OptimSettings(lr=3e-3, micro_batch=32, dtype="float32")
    optimizer = make_optimizer(trainer.model, s)
    rng = random.Random(5)
    for r in range(60):
        _sft_round(trainer, rng, optimizer, s, r)
    uri1, manifest1 = store.write(1, trainer.model, trainer.tokenizer, None)
    with torch.no_grad():  # degraded: every weight matrix's rows shuffled
        for p in trainer.model.parameters():
            if p.dim() == 2:
                p.copy_(p[torch.randperm(p.shape[0])])
    uri2, manifest2 = store.write(2, trainer.model, trainer.tokenizer, None)
    candidates = [
        CheckpointEvent(model="tiny", version=1, parent_version=0, uri=uri1,
                        manifest=manifest1, status="candidate"),
        CheckpointEvent(model="tiny", version=2, parent_version=1, uri=uri2,
                        manifest=manifest2, status="candidate"),
    ]
    kafka.produce(f"{prefix}checkpoints", ((b"tiny", c.to_bytes()) for c in candidates))
    with http_server(root) as (url, requested):
        _gate_and_generator(kafka, tmp_path, prefix, base, url, candidates)
    assert {p.split("/")[1] for p in requested} == {"v000001", "v000002"}  # all over HTTP


def _gate_and_generator(kafka: Broker, tmp_path: Path, prefix: str, base: Path, url: str,
                        candidates: list[CheckpointEvent]) -> None:
    import torch

    from services.generator.reload import Reloader
    from services.models.engines import TransformersEngine
    from services.models.episodes import ModelVersion
    from services.models.fetch import CheckpointSource, CheckpointSourceSettings

    settings = KafkaSettings(bootstrap_servers=kafka.bootstrap, topic_prefix=prefix)
    unmounted = tmp_path / "not-mounted"  # where this host would mount the store
    unmounted.mkdir()
    gs = GateSettings(
        instance_id="g0", kafka={"bootstrap_servers": kafka.bootstrap, "topic_prefix": prefix},
        # Both candidates wait before the gate starts: one at a time, each is evaluated (in
        # one batch the older would be superseded, tests/unit/test_gate.py).
        runtime={"lag_interval_seconds": 0.5, "batch_max_records": 1},
        metrics={"enabled": False}, model_name="tiny", dtype="float32",  # on every CPU
        base_model_path=base, checkpoint_root=unmounted,
        checkpoint_source={"url": url, "cache_dir": tmp_path / "gate-cache"},
        held_out=HeldOut(env="arithmetic", difficulty=1, count=60, max_tokens=4))

    def decisions() -> dict[int, CheckpointEvent]:
        return {e.version: e for e in (CheckpointEvent.from_bytes(m.value())
                                       for m in kafka.read_all(f"{prefix}checkpoints"))
                if e.status != "candidate"}

    with InThread(StreamRuntime(gs, build_stage(gs), [gs.topic("checkpoints")])) as gate:
        wait_until(lambda: len(decisions()) >= 2 or gate.error, 180, "two gate decisions",
                   interval=1)
        assert gate.error is None
    decided = decisions()
    assert decided[1].status == "promoted", decided[1].reason
    _restarted_gate_shows_what_it_promoted(gs, decided[1])
    assert decided[2].status == "rejected", decided[2].reason
    assert decided[1].metrics["pass_rate"] > decided[2].metrics["pass_rate"]
    assert "regressed" in (decided[2].reason or "")
    assert decided[1].trained_on == candidates[0].trained_on

    # A generator (transformers backend) serves only what the gate promoted.
    served = tmp_path / "served"
    shutil.copytree(base, served)
    engine = TransformersEngine(served)
    reloader = Reloader(engine, unmounted, ModelVersion("tiny", 0), served, CheckpointSource(
        unmounted, CheckpointSourceSettings(url=url, cache_dir=tmp_path / "generator-cache")))
    follower = CheckpointFollower(settings, f"{prefix}checkpoints", reloader,
                                  verifier=verifier())
    try:
        follower.catch_up()
        assert reloader.apply_pending()
    finally:
        follower.stop()
    assert reloader.serving.version == 1
    assert reloader.served.is_relative_to(tmp_path / "generator-cache")
    promoted = TransformersEngine(Path(candidates[0].uri))
    for a, b in zip(engine.model.parameters(), promoted.model.parameters(), strict=True):
        assert torch.equal(a, b)


def _restarted_gate_shows_what_it_promoted(gs: GateSettings, promoted: CheckpointEvent) -> None:
    """A new gate process (its gauges at 0) shows the promoted version and its held-out
    scores as soon as its state is restored, not after its next decision; so does the view."""
    from prometheus_client import REGISTRY, generate_latest

    from services.gate import metrics as m
    from services.up.view import _detail, parse_metrics

    m.GATE_PROMOTED_VERSION.set(0)
    m.GATE_PROMOTED_SCORE.clear()
    with InThread(StreamRuntime(gs, build_stage(gs), [gs.topic("checkpoints")])) as gate:
        wait_until(lambda: gate.runtime.ready or gate.error, 60, "the gate restored")
        assert gate.error is None
        shown = parse_metrics(generate_latest(REGISTRY).decode())
    assert shown["flywheel_gate_promoted_version"] == promoted.version == 1
    assert shown["flywheel_gate_promoted_score{metric=pass_rate,set=held_out}"] == \
        promoted.metrics["pass_rate"]
    assert _detail("gate", shown) == "promoted v1, float32"


def test_a_decision_commits_when_made_even_when_the_next_evaluation_outlasts_the_transaction(
        kafka: Broker, uid: str, tmp_path: Path) -> None:
    """The runtime pipelines its transactions: a batch commits when the next one has been
    processed. For the gate, whose processing is an evaluation of minutes, that held every
    decision back a whole evaluation (a promotion reached the generators 6.8 minutes late on
    the real profile), and an evaluation longer than the transaction timeout got the open
    decision aborted by the broker. Here v2's evaluation is held (by the test, not a sleep)
    until v1's decision is read back committed, and then until the clock passes three
    transaction timeouts plus the broker's abort sweep; each candidate is evaluated once and
    decided once. The evaluation is the unit tests' table (no model): what is tested is when
    the runtime commits."""
    import threading
    import time

    from services.common.state import StateStore
    from services.gate.stage import GateStage
    from tests.integration.runners import settings
    from tests.unit.test_gate import _candidate, _outcomes, _result

    prefix = f"gt{uid}."
    topic_ops.apply(topic_ops.admin_client(
        KafkaSettings(bootstrap_servers=kafka.bootstrap, topic_prefix=prefix)),
        topic_ops.load(prefix=prefix))
    table = {"base": _outcomes(10), "v1": _outcomes(60), "v2": _outcomes(70)}
    evaluated: list[str] = []
    finished: dict[str, float] = {}
    holding, release = threading.Event(), threading.Event()

    def evaluate(folder: Path) -> dict[str, Any]:
        evaluated.append(folder.name)
        if folder.name == "v2":
            holding.set()
            assert release.wait(120), "the test never released v2's evaluation"
        finished[folder.name] = time.monotonic()
        return {"held_out": _result(table[folder.name])}

    (tmp_path / "base").mkdir()
    timeout_ms = 6000  # short, yet long enough for a commit on a loaded machine
    gs = settings(kafka.bootstrap, "gate", prefix=prefix, batch_max_records=1,
                  transaction_timeout_ms=timeout_ms)
    store = StateStore(gs.topic("gate.state"))
    gate = GateStage(state=store, output_topic=gs.topic("checkpoints"), root=tmp_path,
                     evaluate=evaluate, base={"tiny": (0, tmp_path / "base")},
                     tolerance=0.05, signer=signer(), verifier=verifier())
    candidates = [_candidate(tmp_path, v) for v in (1, 2)]
    kafka.produce(gs.topic("checkpoints"), ((b"tiny", c.to_bytes()) for c in candidates))

    def decided() -> dict[int, list[CheckpointEvent]]:
        out: dict[int, list[CheckpointEvent]] = {}
        for m in kafka.read_all(gs.topic("checkpoints")):
            e = CheckpointEvent.from_bytes(m.value())
            if e.status != "candidate":
                out.setdefault(e.version, []).append(e)
        return out

    with InThread(StreamRuntime(gs, gate, [gs.topic("checkpoints")])) as runtime:
        try:
            wait_until(lambda: holding.is_set() or runtime.error, 60, "v2's evaluation started")
            wait_until(lambda: 1 in decided() or runtime.error, 30,
                       "v1's decision committed while v2 is evaluated")
            assert runtime.error is None, runtime.error
            seen = time.monotonic()
            print(f"v1 decided -> committed and read back: {seen - finished['v1']:.2f} s")
            # Past the transaction timeout and the broker's sweep of timed-out transactions
            # (deploy/kafka/server.properties: 10 s): an open transaction would be aborted.
            past = finished["v1"] + 3 * timeout_ms / 1000 + 10
            wait_until(lambda: time.monotonic() > past, 60, "the clock past the timeout")
        finally:
            release.set()
        wait_until(lambda: 2 in decided() or runtime.error, 60, "v2 decided")
        assert runtime.error is None
    final = decided()
    assert [(e.status, e.rejection) for e in final[1]] == [("promoted", None)]
    assert [(e.status, e.rejection) for e in final[2]] == [("promoted", None)]
    assert sorted(evaluated) == ["base", "v1", "v2"], evaluated  # none evaluated twice


def test_a_stopping_gate_interrupts_its_evaluation_and_commits_nothing_of_it(
        kafka: Broker, uid: str, tmp_path: Path) -> None:
    """A stop used to wait for the evaluation in flight (minutes on a real model: `flywheel
    up` killed the gate after its 30 s of grace). Now the evaluation stops at its next token
    and the runtime stops without committing the batch; a restarted gate decides the candidate
    once. The evaluation is long here (1,000 held-out tasks, about 30 s each for the base and
    the candidate on 2 cores), and the stop comes as soon as the candidate's has begun."""
    import threading

    from services.models.tiny import tiny_model
    from services.trainer.store import CheckpointStore

    prefix = f"gs{uid}."
    topic_ops.apply(topic_ops.admin_client(
        KafkaSettings(bootstrap_servers=kafka.bootstrap, topic_prefix=prefix)),
        topic_ops.load(prefix=prefix))
    base = tiny_model(tmp_path / "base", seed=1)
    root = tmp_path / "store"
    from services.models.engines import TransformersEngine

    engine = TransformersEngine(base)
    uri, manifest = CheckpointStore(str(root)).write(1, engine.model, engine.tokenizer, None)
    candidate = CheckpointEvent(model="tiny", version=1, parent_version=0, uri=uri,
                                manifest=manifest, status="candidate")
    kafka.produce(f"{prefix}checkpoints", [(b"tiny", candidate.to_bytes())])

    def gate_settings(count: int) -> GateSettings:
        return GateSettings(
            instance_id="g0", kafka={"bootstrap_servers": kafka.bootstrap,
                                     "topic_prefix": prefix},
            runtime={"lag_interval_seconds": 0.5}, metrics={"enabled": False},
            model_name="tiny", dtype="float32", base_model_path=base, checkpoint_root=root,
            held_out=HeldOut(env="arithmetic", count=count, max_tokens=64))

    def decided() -> list[CheckpointEvent]:
        return [e for e in (CheckpointEvent.from_bytes(m.value())
                            for m in kafka.read_all(f"{prefix}checkpoints"))
                if e.status != "candidate"]

    gs = gate_settings(1000)
    stage = build_stage(gs)
    started, finished = threading.Event(), []
    inner = stage.evaluate

    def evaluate(folder: Path) -> Any:
        if folder != base:  # the candidate's, in the stage (the base's ran on a thread)
            started.set()
        out = inner(folder)
        finished.append(folder.name)
        return out

    stage.evaluate = evaluate
    gate = InThread(StreamRuntime(gs, stage, [gs.topic("checkpoints")]))
    with gate:
        wait_until(lambda: started.is_set() or gate.error, 120,
                   "the candidate's evaluation begun")
    assert gate.error is None and finished == ["base"]  # the candidate's was cut short
    assert decided() == []

    with InThread(StreamRuntime(small := gate_settings(20), build_stage(small),
                                [small.topic("checkpoints")])) as again:
        wait_until(lambda: decided() or again.error, 180, "the candidate decided")
    assert [(e.version, e.status) for e in decided()] == [(1, "rejected")]
