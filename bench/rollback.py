"""``bench rollback``: how soon the flywheel recovers from a stretch of poisoned data, with the
trainer's rollback at its default, after three regressions, and off, side by side in one run.

Per seed model (``BENCH_ROLLBACK_SEEDS``, default 0,1,2: the embedded bootstrap at
``BENCH_ROLLBACK_SEED_SAMPLES``, 150,000 as the embedded profile's) and per case, a copy of it
in a store of its own, topics of its own on one local broker, the trainer as its own process
(``flywheel run trainer``, rounds of exactly ``ROUND`` SFT samples) and the gate as its own
process too, with the embedded profile's held-out suite. Every case gets the same planted
records, in the same order:

1. ``HEALTHY`` rounds of labelled sums, as the router writes verified answers;
2. ``POISON`` rounds whose every answer is the sum plus one, passed off as correct (an SFT
   routing policy gone wrong);
3. healthy rounds again until a promoted version beats the best one promoted before the
   poison (its headline pass rate strictly higher), at most ``BENCH_ROLLBACK_RECOVERY`` (20).

Each round waits for the gate's decision on its candidate before the next is planted, so the
cases differ only in what the trainer builds on. Reported per case: the pre-poison best, the
poisoned candidates and their decisions, the parent of the first healthy candidate after the
poison, the healthy rounds, samples and seconds until the recovery (none if not within the
budget), and the healthy rounds until a candidate scores the pre-poison best again, promoted
or not; over the seeds, the medians (a miss within the budget counts as infinite). The cases
see the same records, but not the same batches (the trainer's round interleaves partitions as
they arrive), so even before the poison their lineages differ a little.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from schemas import CheckpointEvent, RoutedSample, Score, ScoredTrajectory, Task, Trajectory, Turn
from services import envs

ROUND = 256
"""Samples per round: the trainer's SFT quota."""
HEALTHY = 8
POISON = 3
RECOVERY = int(os.environ.get("BENCH_ROLLBACK_RECOVERY", "20"))
SEEDS = [int(x) for x in os.environ.get("BENCH_ROLLBACK_SEEDS", "0,1,2").split(",")]
SEED_SAMPLES = int(os.environ.get("BENCH_ROLLBACK_SEED_SAMPLES", "150000"))
CASES: dict[str, dict[str, Any]] = {
    "default": {},  # the trainer's own rollback settings
    "after_3": {"enabled": True, "after": 3},
    "off": {"enabled": False},
}
REPO = Path(__file__).resolve().parents[1]


def planted_sft(tokenizer: Any, tasks: list[Task], *, poisoned: bool, tag: str
                ) -> list[RoutedSample]:
    """SFT records of ``addition`` tasks as the router writes them: the verified answer, or
    (poisoned) the sum plus one passed off as correct, under another router policy hash."""
    from services.models.engines import render

    env = envs.get("addition")
    out = []
    for i, task in enumerate(tasks):
        assert task.verifier is not None and task.verifier.answer is not None
        answer = task.verifier.answer
        if poisoned:  # the sum plus one, written the env's way (least significant first)
            answer = env.write(int(answer[::-1]) + 1)  # type: ignore[attr-defined]
        turns = env.initial_turns(task)
        ids = [*tokenizer(answer, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        traj = Trajectory(task=task, group_id=f"{tag}{i}", sample_index=0, group_size=1,
                          turns=[*turns, Turn(role="assistant", content=answer)],
                          completion=answer, prompt_token_ids=render(tokenizer, turns),
                          completion_token_ids=ids, completion_logprobs=[-1.0] * len(ids),
                          policy_version=0, model="policy")
        scored = ScoredTrajectory(trajectory=traj, reward=1.0, verdict="correct",
                                  scores=[Score(scorer="verifier", version="poison" if poisoned
                                                else "v1", value=1.0, passed=True)],
                                  reward_rule="t")
        out.append(RoutedSample(stage="sft", group_id=f"{tag}{i}", samples=[scored],
                                reason="verified_correct", policy_name="poison" if poisoned
                                else "healthy", policy_hash=("b" if poisoned else "a") * 64,
                                filter_policy_hash="f" * 64))
    return out


def _case(bootstrap: str, seed: tuple[Path, list[Any], dict[str, float]], rollback: dict[str, Any],
          tasks: list[Task], work: Path) -> dict[str, Any]:
    from confluent_kafka import Producer
    from transformers import AutoTokenizer

    from services.cluster import topics as topic_ops
    from services.common.config import KafkaSettings
    from services.common.signing import Signer, Verifier, create_keys
    from services.seed_model import publish_promoted
    from services.up.profile import Profile
    from services.up.view import read_checkpoints

    prefix = f"rb{uuid.uuid4().hex[:8]}."
    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=prefix)
    topic_ops.apply(topic_ops.admin_client(kafka), topic_ops.load(prefix=prefix))
    folder, manifest, metrics = seed
    store = work / "store"
    uri = str(shutil.copytree(folder, store / folder.name))
    signing_key, public_key = create_keys(work / "keys")  # the gate's, as `flywheel up` makes
    verifier = Verifier.load(public_key)
    publish_promoted(kafka, kafka.topic("checkpoints"), "policy", uri, manifest, metrics,
                     Signer.load(signing_key))
    tokenizer = AutoTokenizer.from_pretrained(uri)
    common = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")} | {
        "FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "FLYWHEEL_KAFKA__TOPIC_PREFIX": prefix,
        "FLYWHEEL_METRICS__ENABLED": "false", "FLYWHEEL_BASE_MODEL_PATH": uri,
        "FLYWHEEL_DECISIONS__PUBLIC_KEY": str(public_key)}
    trainer_env = common | {
        "FLYWHEEL_INSTANCE_ID": "trainer-0", "FLYWHEEL_CHECKPOINT_URL": str(store),
        "FLYWHEEL_QUOTAS": json.dumps({"sft": ROUND, "rl": 0, "cpt": 0}),
        "FLYWHEEL_MAX_WAIT_SECONDS": "600",  # rounds of exactly ROUND samples
        "FLYWHEEL_OPTIM__LR": "0.0002", "FLYWHEEL_OPTIM__MICRO_BATCH": "64",
        "FLYWHEEL_OPTIM__DTYPE": "float32",  # the tiny model's figures: the same on every CPU
        **{f"FLYWHEEL_ROLLBACK__{k.upper()}": str(v).lower() for k, v in rollback.items()}}
    gate_env = common | {"FLYWHEEL_INSTANCE_ID": "gate-0", "FLYWHEEL_CHECKPOINT_ROOT": str(store),
                         "FLYWHEEL_DECISIONS__SIGNING_KEY": str(signing_key),
                         **{f"FLYWHEEL_{k.upper()}": json.dumps(v) if isinstance(v, list | dict)
                            else str(v) for k, v in Profile().gate.items()}}
    log = work / "services.log"
    with log.open("ab") as out:  # the two services as `flywheel up` runs them
        procs = {name: subprocess.Popen([sys.executable, "-m", "services", "run", name],
                                        cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
                 for name, env in (("trainer", trainer_env), ("gate", gate_env))}
    producer = Producer(kafka.client_config() | {"enable.idempotence": True})
    source = iter(tasks)
    rounds: list[dict[str, Any]] = []

    def round_of(kind: str) -> CheckpointEvent:
        """One round planted; its candidate's decision (the candidate's parent added)."""
        chunk = list(itertools.islice(source, ROUND))
        for r in planted_sft(tokenizer, chunk, poisoned=kind == "poison",
                             tag=f"{kind}{len(rounds)}-"):
            producer.produce(kafka.topic("accepted.sft"), r.to_bytes(), r.partition_key())
        if producer.flush(60):
            raise RuntimeError("planted records not acknowledged within 60 s")
        version, deadline = len(rounds) + 1, time.monotonic() + 900
        while True:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"the {name} exited: {log.read_text()[-2000:]}")
            versions = read_checkpoints(kafka, "policy", verifier)
            decision = versions.events.get(version)
            if decision is not None and decision.status != "candidate":
                parent = versions.candidates[version].parent_version
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no decision on v{version} within 900 s")
            time.sleep(1.0)
        rounds.append({"kind": kind, "version": version, "parent": parent,
                       "status": decision.status, "rejection": decision.rejection,
                       "pass_rate": decision.metrics.get("pass_rate")})
        print(f"rollback {rollback or 'default'}: {rounds[-1]}", flush=True)
        return decision

    try:
        for _ in range(HEALTHY):
            round_of("healthy")
        promoted = [r for r in rounds if r["status"] == "promoted"]
        best = max([metrics.get("pass_rate", 0.0), *(r["pass_rate"] for r in promoted)])
        for _ in range(POISON):
            round_of("poison")
        started = time.monotonic()
        recovered: dict[str, Any] | None = None
        for n in range(1, RECOVERY + 1):
            d = round_of("healthy")
            if d.status == "promoted" and d.metrics.get("pass_rate", 0.0) > best:
                recovered = {"healthy_rounds": n, "samples": n * ROUND, "version": d.version,
                             "pass_rate": d.metrics.get("pass_rate"),
                             "seconds": round(time.monotonic() - started, 1)}
                break
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        producer.flush(10)
    after = rounds[HEALTHY + POISON]
    return {"rollback": rollback or "trainer default", "pre_poison_best": best,
            "poisoned": [{k: r[k] for k in ("version", "parent", "status", "rejection",
                                            "pass_rate")}
                         for r in rounds[HEALTHY:HEALTHY + POISON]],
            "first_healthy_after_poison": {
                "version": after["version"], "parent": after["parent"],
                "parent_promoted": after["parent"] == 0 or any(
                    r["version"] == after["parent"] and r["status"] == "promoted"
                    for r in rounds)},
            "recovered": recovered, "rounds": rounds,
            "rollbacks_logged": log.read_text().count("rollback: the gate rejected")}


def run() -> dict[str, Any]:
    from bench.bound import training_tasks
    from bench.runtime import broker
    from services.envs.heldout import gate_dtype, gate_guard, gate_headline
    from services.gate.evaluate import evaluate
    from services.seed_model import SeedModelSettings, make_seed_model
    from services.up.profile import Profile

    profile = Profile()
    tasks = training_tasks(profile, (HEALTHY + POISON + RECOVERY) * ROUND, seed=3)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in CASES}
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-rollback-") as tmp, \
            broker() as bootstrap_servers:
        for seed in SEEDS:
            work = Path(tmp) / f"seed{seed}"
            uri, manifest, metrics = make_seed_model(
                SeedModelSettings(samples=SEED_SAMPLES, seed=seed), str(work / "seed"),
                "policy", evaluate=lambda f: evaluate(f, gate_headline(profile.gate),
                                                      dtype=gate_dtype(profile.gate)),
                held_out=gate_guard(profile.gate))
            print(f"seed model {seed}: held-out {metrics.get('pass_rate')}", flush=True)
            for name, rollback in CASES.items():
                (work / name).mkdir()
                results[name].append({"seed": seed, **_case(
                    bootstrap_servers, (Path(uri), manifest, metrics), rollback, tasks,
                    work / name)})
    return {"round_samples": ROUND, "healthy_rounds": HEALTHY, "poison_rounds": POISON,
            "recovery_budget_rounds": RECOVERY, "seed_samples": SEED_SAMPLES, "seeds": SEEDS,
            "cases": results, "summary": summarize(results)}


def back_at_best(case: dict[str, Any]) -> int | None:
    """Healthy rounds after the poison until a candidate scores at least the pre-poison best
    again, promoted or not: how long the trainer's weights take to climb back. Recovery (a
    promotion above that best) also needs the gate's test to see an improvement beyond noise
    at the top of the scale, which takes further rounds whatever the trainer did."""
    after = case["rounds"][HEALTHY + POISON:]
    return next((n for n, r in enumerate(after, 1)
                 if (r["pass_rate"] or 0.0) >= case["pre_poison_best"]), None)


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per case, over the seeds: rounds and seconds to recover, rounds until a candidate is
    back at the pre-poison best, and whether the first healthy candidate after the poison
    descends from a promoted version. Medians count a miss within the budget as infinite."""
    from bench.flywheel import _median

    def recovered(r: dict[str, Any]) -> int | None:
        return (r["recovered"] or {}).get("healthy_rounds")

    return {name: {"healthy_rounds_to_recover": [recovered(r) for r in runs],
                   "median_healthy_rounds": _median([recovered(r) for r in runs]),
                   "seconds_to_recover": [(r["recovered"] or {}).get("seconds") for r in runs],
                   "healthy_rounds_back_at_best": [back_at_best(r) for r in runs],
                   "median_rounds_back_at_best": _median([back_at_best(r) for r in runs]),
                   "first_healthy_parent_promoted": [
                       r["first_healthy_after_poison"]["parent_promoted"] for r in runs]}
            for name, runs in results.items()}
