"""The trainer on a real broker: candidates with exact lineage, also across a SIGKILL."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import signal
import subprocess
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from schemas import CheckpointEvent, RoutedSample, Score, ScoredTrajectory, Trajectory, Turn
from services import envs
from services.cluster import topics as topic_ops
from services.cluster.local_broker import free_port
from services.common.config import KafkaSettings
from tests.integration.runners import spawn_service, torchrun_ranks
from tests.kafka import Broker, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.model]

SFT, RL_GROUPS = 400, 40  # four rounds or so at the quotas below: a kill inside the second


def _routed(tokenizer: Any, n_sft: int, n_rl: int) -> tuple[list[RoutedSample],
                                                            list[RoutedSample]]:
    env = envs.get("arithmetic")
    rng = random.Random(0)
    eos = tokenizer.eos_token_id

    def scored(a: int, b: int, answer: str, group: str, i: int, size: int) -> ScoredTrajectory:
        task = env.task(a, "+", b)
        ids = [*list(tokenizer(answer, add_special_tokens=False)["input_ids"]), eos]
        traj = Trajectory(
            task=task, group_id=group, sample_index=i, group_size=size,
            turns=[Turn(role="user", content=task.prompt),
                   Turn(role="assistant", content=answer)],
            completion=answer,
            prompt_token_ids=list(tokenizer(task.prompt, add_special_tokens=False)["input_ids"]),
            completion_token_ids=ids, completion_logprobs=[-1.0] * len(ids), policy_version=0,
            model="tiny")
        ok = answer == str(a + b)
        return ScoredTrajectory(trajectory=traj, reward=float(ok),
                                verdict="correct" if ok else "incorrect",
                                scores=[Score(scorer="verifier", version="t", value=float(ok),
                                              passed=ok)], reward_rule="t")

    common = {"policy_name": "t", "policy_hash": "0" * 64}
    sft = []
    for i in range(n_sft):
        a, b = rng.randrange(10), rng.randrange(10)
        sft.append(RoutedSample(stage="sft", group_id=f"s{i}", reason="verified_correct",
                                samples=[scored(a, b, str(a + b), f"s{i}", 0, 1)], **common))
    rl = []
    for g in range(n_rl):
        a, b = rng.randrange(10), rng.randrange(10)
        answers = [str(a + b), str(a + b + 1), str(a + b), str(a + b + 2)]
        rl.append(RoutedSample(stage="rl", group_id=f"r{g}", reason="group",
                               samples=[scored(a, b, x, f"r{g}", i, 4)
                                        for i, x in enumerate(answers)], **common))
    return sft, rl


def _candidates(kafka: Broker, prefix: str) -> list[CheckpointEvent]:
    return [e for e in (CheckpointEvent.from_bytes(m.value())
                        for m in kafka.read_all(f"{prefix}checkpoints"))
            if e.status == "candidate"]


def _covered(kafka: Broker, prefix: str) -> dict[tuple[str, int], list[tuple[int, int]]]:
    spans: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)
    for e in _candidates(kafka, prefix):
        for r in e.trained_on:
            spans[r.topic, r.partition].append((r.start, r.end))
    return spans


def _first_candidate(kafka: Broker, prefix: str, log: Path, env: dict[str, str],
                     what: str) -> CheckpointEvent:
    """A trainer started with ``env``, run until its first candidate is committed, stopped."""
    proc = spawn_service(kafka.bootstrap, ["trainer"], prefix=prefix, instance="trainer-0",
                         log=log, env=env)
    try:
        wait_until(lambda: _candidates(kafka, prefix) or proc.poll() is not None, 180, what)
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        proc.terminate()
        proc.wait(30)
    return _candidates(kafka, prefix)[0]


def _kill_mid_round(proc: subprocess.Popen[bytes], kafka: Broker, prefix: str,
                    log: Path, ranks: int, store: Path) -> int:
    """SIGKILL the trainer (with ``ranks`` > 1: rank 1) inside a round after its first: once
    the log says the round for version N began, the trainer is frozen (SIGSTOP; rank 1 first,
    then rank 0: a round rank 1 has not finished, rank 0 cannot finish either) and killed if
    N is not committed yet (observed on ``checkpoints``, twice) and, on ranks, rank 0 has not
    begun writing it (no folder for N in the store); else resumed until the next round
    begins. Rank 0 is resumed after the kill. Returns the committed versions at the kill."""
    def began(version: int) -> Callable[[], bool]:
        return lambda: (f"training round for v{version}:" in log.read_text()
                        or proc.poll() is not None)

    for version in itertools.count(max(2, len(_candidates(kafka, prefix)) + 1)):
        wait_until(began(version), 180, f"the round for v{version} to start")
        assert proc.poll() is None, log.read_text()[-3000:]
        pids = torchrun_ranks(proc.pid) if ranks > 1 else {0: proc.pid}
        frozen = [pids[r] for r in sorted(pids, reverse=True)]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        killed = False
        try:
            # Twice, half a second apart (a read): a commit it sent just before it stopped
            # would show as a difference.
            committed = len(_candidates(kafka, prefix))
            if committed == version - 1 == len(_candidates(kafka, prefix)) and (
                    ranks == 1 or not list(store.glob(f"*v{version:06d}*"))):
                os.kill(frozen[0], signal.SIGKILL)  # inside the round for `version`
                killed = True
                return committed
        finally:
            for pid in frozen[1:] if killed else frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
    raise AssertionError("unreachable")


@pytest.mark.parametrize("ranks", [1, 2], ids=["one-process", "two-ranks"])
def test_a_trainer_killed_mid_round_resumes_and_its_lineage_tiles_the_input(
        kafka: Broker, uid: str, tmp_path: Path, ranks: int) -> None:
    """One process SIGKILLed and started again; or a job of 2 ranks (torchrun, gloo, FSDP2)
    whose rank 1 is SIGKILLed: the job ends (torchrun stops rank 0) and is launched again, as
    a supervisor would."""
    from transformers import AutoTokenizer

    from services.models.tiny import tiny_model
    from services.up.view import _detail, scrape

    prefix = f"t{uid}."
    settings = KafkaSettings(bootstrap_servers=kafka.bootstrap, topic_prefix=prefix)
    topic_ops.apply(topic_ops.admin_client(settings), topic_ops.load(prefix=prefix))
    base = tiny_model(tmp_path / "base", hidden=256, layers=4)
    tokenizer = AutoTokenizer.from_pretrained(base)
    sft, rl = _routed(tokenizer, SFT, RL_GROUPS)
    for stage, records in (("sft", sft), ("rl", rl)):
        kafka.produce(f"{prefix}accepted.{stage}",
                      ((r.partition_key().encode(), r.to_bytes()) for r in records))
    ends = {(f"{prefix}accepted.{st}", p): e for st in ("sft", "rl", "cpt")
            for p, e in kafka.end_offsets(f"{prefix}accepted.{st}").items()}
    store = tmp_path / "store"
    log = tmp_path / "trainer.log"
    env = {"FLYWHEEL_BASE_MODEL_PATH": str(base), "FLYWHEEL_CHECKPOINT_URL": str(store),
           "FLYWHEEL_MODEL_NAME": "tiny", "FLYWHEEL_OPTIM__DTYPE": "float32",
           "FLYWHEEL_QUOTAS": json.dumps({"sft": 100, "rl": 40}),
           "FLYWHEEL_MAX_WAIT_SECONDS": "2", "FLYWHEEL_OPTIM__EPOCHS": "3",
           "FLYWHEEL_OPTIM__LR": "0.001", "FLYWHEEL_METRICS__PORT": str(free_port())}

    launcher = ["--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else None

    def start() -> subprocess.Popen[bytes]:
        return spawn_service(kafka.bootstrap, ["trainer"], prefix=prefix, instance="trainer-0",
                             log=log, launcher=launcher,
                             env=env | ({"OMP_NUM_THREADS": "1", "FLYWHEEL_STRATEGY": "fsdp"}
                                        if ranks > 1 else {}))

    proc = start()
    try:
        while True:
            killed_at = _kill_mid_round(proc, kafka, prefix, log, ranks, store)
            assert proc.wait(120) != 0  # the job ends with its rank
            proc = start()
            if len(_candidates(kafka, prefix)) == killed_at:
                break
            # Only on ranks, and only if rank 0 was frozen between the round's last
            # collective and its first write: it committed the round. Another kill.
        # The view's trainer row after the restart: the version it resumed at and every
        # stage's sample count (0 until its first round), not "samples" with nothing after.
        port = int(env["FLYWHEEL_METRICS__PORT"])
        wait_until(lambda: scrape(port).get("flywheel_trainer_candidate_version", 0)
                   >= killed_at or proc.poll() is not None, 180, "the trainer resumed")
        row = re.fullmatch(r"candidate v(\d+), float32; samples cpt \d+ rl \d+ sft \d+",
                           _detail("trainer", scrape(port)))
        assert row is not None and int(row[1]) >= killed_at, _detail("trainer", scrape(port))
        assert scrape(port).get("flywheel_trainer_ranks") == ranks

        def done() -> bool:
            covered = _covered(kafka, prefix)
            return all(max((e for _, e in covered.get(tp, [])), default=0) >= end
                       for tp, end in ends.items() if end > 0) or proc.poll() is not None

        wait_until(done, 300, "every accepted sample trained into a committed candidate",
                   interval=1)
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
    candidates = _candidates(kafka, prefix)
    versions = [c.version for c in candidates]
    assert versions == list(range(1, len(versions) + 1))  # no version twice, none skipped
    assert [c.parent_version for c in candidates] == [0, *versions[:-1]]
    text = log.read_text()
    assert killed_at >= 1 and f"resuming tiny at version {killed_at}" in text
    assert "optimizer state restored" in text
    if ranks > 1:  # the job, launched again, resumed on its 2 ranks
        assert text.count("rank 0 of 2 (fsdp)") >= 2 and "a rank that left the job" in text, \
            text[-3000:]
    # The optimizer state went on from the committed one: AdamW's step count in the last
    # candidate's is every step since the base (a fresh optimizer at the resume: fewer).
    from services.trainer.store import read_optimizer

    state = read_optimizer(store / f"v{versions[-1]:06d}")
    assert state is not None and candidates[-1].step == int(state["state"][0]["step"]) \
        == sum(int(c.metrics["steps"]) for c in candidates)
    for tp, spans in _covered(kafka, prefix).items():
        spans.sort()
        assert spans[0][0] == 0, (tp, spans)
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start == end, f"{tp}: a gap or an overlap in {spans}"
        assert spans[-1][1] == ends[tp]
    # No orphan: the store holds exactly the committed candidates, all verifiable.
    from services.models.manifest import verify

    folders = sorted(p.name for p in store.iterdir())
    assert folders == [f"v{v:06d}" for v in versions]
    for c in candidates:
        verify(c, store)
    assert all(c.stage_mix and c.metrics.get("steps", 0) > 0 for c in candidates)
    # Rounds keep to their quotas although the whole input waited from the start (one
    # consume() fetches hundreds of records): at most one record over, a group of 4 for RL.
    assert all(c.stage_mix.get("sft", 0) <= 100 and c.stage_mix.get("rl", 0) < 40 + 4
               for c in candidates), [c.stage_mix for c in candidates]


def test_a_round_takes_its_quota_from_skewed_partitions_without_waiting(
        kafka: Broker, uid: str, tmp_path: Path) -> None:
    """A stage's quota is shared over its partitions, and a partition past its share is held
    while another has records waiting; once the others are drained it rejoins the round. So
    a quota's worth of samples spread unevenly (one partition under its share, the others
    over it) makes one round at once, not a short round after ``max_wait_seconds`` (here
    600 s: a held partition that never rejoined would time this out; the rollback test did,
    once)."""
    from confluent_kafka import Producer
    from transformers import AutoTokenizer

    from services.models.tiny import tiny_model

    prefix = f"k{uid}."
    settings = KafkaSettings(bootstrap_servers=kafka.bootstrap, topic_prefix=prefix)
    topic_ops.apply(topic_ops.admin_client(settings), topic_ops.load(prefix=prefix))
    topic = f"{prefix}accepted.sft"
    partitions = sorted(kafka.end_offsets(topic))
    assert len(partitions) > 2
    base = tiny_model(tmp_path / "base")
    counts = {p: (4 if p == partitions[0] else 100) for p in partitions}
    sft, _ = _routed(AutoTokenizer.from_pretrained(base), sum(counts.values()), 0)
    producer = Producer(kafka.conf())
    records = iter(sft)
    for p, n in counts.items():
        for r in itertools.islice(records, n):
            producer.produce(topic, r.to_bytes(), r.partition_key().encode(), partition=p)
    assert producer.flush(30) == 0
    quota = sum(counts.values())
    env = {"FLYWHEEL_BASE_MODEL_PATH": str(base), "FLYWHEEL_CHECKPOINT_URL": str(tmp_path / "s"),
           "FLYWHEEL_MODEL_NAME": "tiny", "FLYWHEEL_OPTIM__DTYPE": "float32",
           "FLYWHEEL_QUOTAS": json.dumps({"sft": quota, "rl": 0, "cpt": 0}),
           "FLYWHEEL_MAX_WAIT_SECONDS": "600"}
    first = _first_candidate(kafka, prefix, tmp_path / "trainer.log", env,
                             "a round of the whole quota")
    assert first.stage_mix.get("sft") == quota, first.stage_mix
    assert {(r.partition, r.start, r.end) for r in first.trained_on} == \
        {(p, 0, n) for p, n in counts.items()}


def test_a_trainer_stopped_mid_round_stops_at_once_and_trains_the_round_after_a_restart(
        kafka: Broker, uid: str, tmp_path: Path) -> None:
    """SIGTERM inside a round (a real model's round takes minutes on a CPU, longer than a
    supervisor's grace): the trainer stops before its next micro-batch, writes and commits
    nothing, and exits cleanly; started again, it trains the same records into v1."""
    from transformers import AutoTokenizer

    from services.models.tiny import tiny_model

    prefix = f"m{uid}."
    settings = KafkaSettings(bootstrap_servers=kafka.bootstrap, topic_prefix=prefix)
    topic_ops.apply(topic_ops.admin_client(settings), topic_ops.load(prefix=prefix))
    base = tiny_model(tmp_path / "base")
    sft, _ = _routed(AutoTokenizer.from_pretrained(base), 64, 0)
    topic = f"{prefix}accepted.sft"
    kafka.produce(topic, ((r.partition_key().encode(), r.to_bytes()) for r in sft))
    ends = {p: e for p, e in kafka.end_offsets(topic).items() if e > 0}
    store, log = tmp_path / "store", tmp_path / "trainer.log"
    env = {"FLYWHEEL_BASE_MODEL_PATH": str(base), "FLYWHEEL_CHECKPOINT_URL": str(store),
           "FLYWHEEL_MODEL_NAME": "tiny", "FLYWHEEL_OPTIM__DTYPE": "float32",
           "FLYWHEEL_QUOTAS": json.dumps({"sft": 64, "rl": 0, "cpt": 0}),
           "FLYWHEEL_MAX_WAIT_SECONDS": "2", "FLYWHEEL_OPTIM__MICRO_BATCH": "4"}
    # 16 micro-batches an epoch; 1,000 epochs: a round far longer than the stop takes
    proc = spawn_service(kafka.bootstrap, ["trainer"], prefix=prefix, instance="trainer-0",
                         log=log, env=env | {"FLYWHEEL_OPTIM__EPOCHS": "1000"})
    try:
        wait_until(lambda: "training round for v1:" in log.read_text()
                   or proc.poll() is not None, 180, "the first round to start")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "stopping mid-round (stopped before micro-batch" in text, text[-3000:]
    assert not _candidates(kafka, prefix) and not (store.exists() and any(store.iterdir()))

    first = _first_candidate(kafka, prefix, log, env, "the round trained after the restart")
    assert (first.version, first.parent_version, first.stage_mix) == (1, 0, {"sft": 64})
    assert {(r.partition, r.start, r.end) for r in first.trained_on} == \
        {(p, 0, e) for p, e in ends.items()}


def test_a_round_longer_than_the_poll_interval_keeps_the_group_and_commits(
        kafka: Broker, uid: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A round is not bounded (a real model's, on a CPU, takes many minutes), and a member
    that does not poll for ``max.poll.interval.ms`` is dropped from its group: its commit is
    then refused and the round, trained again after the restart, is as long again. Here the
    interval is the shortest allowed (10 s) and the round is drawn out past twice that, as
    one of many micro-batches would be: between them it calls the hook ``train_round``
    calls. The candidate commits, its range whole, and no partition was revoked before."""
    import threading
    import time

    from confluent_kafka import Producer
    from transformers import AutoTokenizer

    from services.models.tiny import tiny_model
    from services.trainer import loop
    from services.trainer.settings import TrainerSettings

    interval = 10.0
    real = loop.train_round
    drawn_out: list[float] = []

    def long_round(*args: Any, between: Callable[[], None], **kwargs: Any) -> Any:
        stats = real(*args, between=between, **kwargs)
        started, tick = time.monotonic(), threading.Event()
        while time.monotonic() - started < 2 * interval + 5:  # the clock, not the machine
            between()
            tick.wait(0.2)  # one micro-batch's work
        drawn_out.append(time.monotonic() - started)
        return stats

    monkeypatch.setattr(loop, "train_round", long_round)
    prefix = f"kl{uid}."
    kafka_settings = KafkaSettings(bootstrap_servers=kafka.bootstrap, topic_prefix=prefix)
    topic_ops.apply(topic_ops.admin_client(kafka_settings), topic_ops.load(prefix=prefix))
    base = tiny_model(tmp_path / "base")
    sft, _ = _routed(AutoTokenizer.from_pretrained(base), 24, 0)
    producer = Producer(kafka.conf())
    for r in sft:
        producer.produce(f"{prefix}accepted.sft", r.to_bytes(), r.partition_key().encode())
    assert producer.flush(30) == 0
    settings = TrainerSettings(
        base_model_path=base, checkpoint_url=str(tmp_path / "store"), model_name="tiny",
        instance_id="trainer-0", kafka=kafka_settings, metrics={"enabled": False},
        quotas={"sft": len(sft), "rl": 0, "cpt": 0}, max_wait_seconds=600,
        optim={"dtype": "float32"}, max_round_seconds=1,
        runtime={"max_poll_interval_ms": int(interval * 1000), "session_timeout_ms": 6000})
    trainer = loop.Trainer(settings)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            trainer.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    with caplog.at_level("INFO", logger="services"):
        thread.start()
        try:
            wait_until(lambda: _candidates(kafka, prefix) or errors, 180, "the long round's "
                       "candidate")
        finally:
            trainer.stop()
            thread.join(60)
    assert not errors, errors[0]
    assert drawn_out and drawn_out[0] > 2 * interval
    [candidate] = _candidates(kafka, prefix)
    assert candidate.stage_mix == {"sft": len(sft)}
    assert sum(r.end - r.start for r in candidate.trained_on) == len(sft)
    # Revoked only as the trainer stopped, after the commit.
    lines = caplog.text.splitlines()
    committed = next(i for i, line in enumerate(lines) if "candidate v1 committed" in line)
    assert not any("revoked" in line for line in lines[:committed]), caplog.text
