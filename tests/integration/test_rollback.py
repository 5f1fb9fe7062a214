"""The trainer and the gate on a real broker, through a stretch of poisoned data.

A bootstrapped seed model; the trainer (its own process) trains on labelled sums planted on
``accepted.sft``, and the gate (the embedded suite: a set per digit count) decides every
candidate. Then a poisoned stretch: every answer wrong, as a routing policy sending
incorrect samples to SFT would. With rollback on, the trainer leaves the regressed lineage
for the last promoted version, also across a SIGKILL taken while the rollback is pending.
With it off, the trainer keeps building on the rejected lineage. Either way the candidates'
``trained_on`` ranges tile the input: no gap, no overlap.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench.rollback import planted_sft
from schemas import CheckpointEvent
from services.cluster import topics as topic_ops
from services.common.config import KafkaSettings
from services.common.runtime import StreamRuntime
from services.envs.heldout import gate_guard
from services.gate.main import GateSettings, build_stage
from services.quarantine import quarantined, write_records
from services.seed_model import SeedModelSettings, make_seed_model, publish_promoted
from services.up.profile import Profile
from tests.integration.runners import InThread, spawn_service
from tests.kafka import Broker, wait_until
from tests.signing import signer, verifier

pytestmark = [pytest.mark.integration, pytest.mark.model]

ROUND = 256
"""Samples per round (the trainer's SFT quota)."""
HEALTHY = 4 * ROUND
POISON_TRIES = 4
"""Poisoned rounds, at most, until one candidate is rejected as regressed."""


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[Path, list[Any], dict[str, float]]:
    """The bootstrapped seed model (version 0 of a store) and its manifest, made once: each
    case copies it into its own store."""
    store = tmp_path_factory.mktemp("seed")
    uri, manifest, metrics = make_seed_model(SeedModelSettings(samples=60_000), str(store),
                                             "policy", held_out=gate_guard(Profile().gate))
    return Path(uri), manifest, metrics


def _events(kafka: Broker, prefix: str) -> list[CheckpointEvent]:
    return [CheckpointEvent.from_bytes(m.value()) for m in kafka.read_all(f"{prefix}checkpoints")]


# The first case's time includes the seed model's training (the module fixture: about 3.5
# minutes on an idle 2-core machine, 8 on a busy one, which the default 600 s did not allow).
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("rollback", [True, False], ids=["rollback", "no_rollback"])
def test_the_trainer_rolls_back_from_a_poisoned_lineage(
        kafka: Broker, uid: str, tmp_path: Path, rollback: bool,
        seed: tuple[Path, list[Any], dict[str, float]]) -> None:
    from transformers import AutoTokenizer

    from bench.bound import training_tasks

    prefix = f"rb{uid}."
    settings = KafkaSettings(bootstrap_servers=kafka.bootstrap, topic_prefix=prefix)
    topic_ops.apply(topic_ops.admin_client(settings), topic_ops.load(prefix=prefix))
    profile = Profile()
    store = tmp_path / "store"
    folder, manifest, metrics = seed
    uri = str(shutil.copytree(folder, store / folder.name))
    publish_promoted(settings, settings.topic("checkpoints"), "policy", uri, manifest, metrics,
                     signer())
    tokenizer = AutoTokenizer.from_pretrained(uri)
    # Healthy rounds, two poisoned stretches and the healthy round between them.
    tasks = iter(training_tasks(profile, HEALTHY + (2 * POISON_TRIES + 1) * ROUND, seed=3))

    def plant(n: int, *, poisoned: bool, tag: str) -> None:
        records = planted_sft(tokenizer, list(itertools.islice(tasks, n)), poisoned=poisoned,
                              tag=tag)
        kafka.produce(f"{prefix}accepted.sft",
                      ((r.partition_key().encode(), r.to_bytes()) for r in records))

    log = tmp_path / "trainer.log"
    env = {"FLYWHEEL_BASE_MODEL_PATH": uri, "FLYWHEEL_CHECKPOINT_URL": str(store),
           "FLYWHEEL_QUOTAS": json.dumps({"sft": ROUND, "rl": 0, "cpt": 0}),
           "FLYWHEEL_MAX_WAIT_SECONDS": "600",  # rounds of exactly ROUND samples
           "FLYWHEEL_OPTIM__LR": "0.0002", "FLYWHEEL_OPTIM__MICRO_BATCH": "64",
           "FLYWHEEL_OPTIM__DTYPE": "float32",  # the same learning on every CPU family
           "FLYWHEEL_ROLLBACK__ENABLED": str(rollback).lower(), "FLYWHEEL_ROLLBACK__AFTER": "1"}

    def start() -> subprocess.Popen[bytes]:
        return spawn_service(kafka.bootstrap, ["trainer"], prefix=prefix, instance="trainer-0",
                             log=log, env=env)

    gs = GateSettings(
        instance_id="g0", kafka={"bootstrap_servers": kafka.bootstrap, "topic_prefix": prefix},
        runtime={"lag_interval_seconds": 0.5}, metrics={"enabled": False}, model_name="policy",
        base_model_path=Path(uri), checkpoint_root=store, **profile.gate)

    def decided(n: int) -> dict[int, CheckpointEvent]:
        """Wait until ``n`` candidates are decided; the decisions by version."""
        def ready() -> bool:
            return len([e for e in _events(kafka, prefix) if e.status != "candidate"
                        and e.version > 0]) >= n or proc.poll() is not None \
                or gate.error is not None
        wait_until(ready, 300, f"{n} gate decisions", interval=1)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert gate.error is None
        return {e.version: e for e in _events(kafka, prefix)
                if e.status != "candidate" and e.version > 0}

    proc = start()
    count = 0  # candidates planted so far (one per round)

    def round_of(*, poisoned: bool) -> CheckpointEvent:
        """One more round planted; its candidate's decision."""
        nonlocal count
        plant(ROUND, poisoned=poisoned, tag=f"{'p' if poisoned else 'h'}{count}-")
        count += 1
        return decided(count)[count]

    def poison_until_regressed() -> int:
        """Poisoned rounds, one at a time, until the newest candidate is rejected as
        regressed: the trainer then holds a regressed lineage and has no round to train, so
        the rollback is pending."""
        for _ in range(POISON_TRIES):
            if (d := round_of(poisoned=True)).rejection == "regressed":
                return d.version
        raise AssertionError(f"{POISON_TRIES} poisoned rounds and no regressed candidate")

    def latest_promoted() -> int:
        return max(e.version for e in _events(kafka, prefix) if e.status == "promoted")

    try:
        with InThread(StreamRuntime(gs, build_stage(gs), [gs.topic("checkpoints")])) as gate:
            for _ in range(HEALTHY // ROUND):
                round_of(poisoned=False)
            best = latest_promoted()
            assert best > 0, [(v, e.reason) for v, e in decided(count).items()]
            regressed = [poison_until_regressed()]
            # The live path: the next round's candidate descends from the promoted version
            # (on), or from the regressed one (off). The target is read before that round:
            # its own candidate may be promoted.
            expected = latest_promoted() if rollback else regressed[0]
            healthy = round_of(poisoned=False)
            parents = {e.version: e.parent_version for e in _events(kafka, prefix)
                       if e.status == "candidate"}
            assert parents[healthy.version] == expected, parents
            if rollback:
                # The restart path: SIGKILL while a rollback is pending; the restart resumes
                # from the latest promoted version, not from the regressed lineage.
                regressed.append(poison_until_regressed())
                target = latest_promoted()
                proc.kill()
                proc.wait(10)
                proc = start()
                wait_until(lambda: f"resuming policy at version {count} " in log.read_text()
                           or proc.poll() is not None, 120, "the trainer to resume")
                assert f"resuming policy at version {count} (step" in log.read_text()
                assert f"from v{target} in" in log.read_text(), log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)

    candidates = {e.version: e for e in _events(kafka, prefix) if e.status == "candidate"}
    print(f"rollback={rollback}: pre-poison best v{best}; regressed {regressed}; first "
          f"healthy candidate after the poison v{healthy.version} from "
          f"v{healthy.parent_version}")
    # How soon a version then beats the pre-poison best is not looked at: on this toy it took
    # 2 to 7 healthy rounds in runs that recovered, and one fresh-clone run did not within 12;
    # it depends on the seed model's luck, not on the mechanism, and cost CI minutes.
    if rollback:
        assert "rollback: the gate rejected" in log.read_text()
    # The poisoned candidates' provenance names the poisoned policy, and `flywheel
    # quarantine` finds the records behind every regressed candidate.
    assert all("b" * 64 in candidates[v].provenance["router_policy"] for v in regressed)
    entries = quarantined(settings, settings.topic("checkpoints"), verifier())
    assert set(regressed) <= {q.version for q in entries}
    first = next(q for q in entries if q.version == min(regressed))
    assert first.since is not None and first.since <= best
    assert first.provenance["router_policy"]["b" * 64] >= ROUND
    written = write_records(settings, [first], tmp_path / "quarantine.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
    assert written == len(lines) == first.samples
    assert {x["router_policy_hash"] for x in lines} >= {"b" * 64}
    assert all(x["filter_policy_hash"] == "f" * 64 for x in lines)
    # Lineage stays exact across the rollback: the ranges tile the partitions.
    spans: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for e in sorted(candidates.values(), key=lambda e: e.version):
        for rg in e.trained_on:
            spans.setdefault((rg.topic, rg.partition), []).append((rg.start, rg.end))
    for tp, ranges in spans.items():
        ranges.sort()
        assert ranges[0][0] == 0, (tp, ranges)
        for (_, end), (begin, _) in itertools.pairwise(ranges):
            assert begin == end, f"{tp}: a gap or an overlap in {ranges}"
