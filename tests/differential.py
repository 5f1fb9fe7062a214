"""The filter and the router over 20,000 varied scored records, on the hot path and on the path
before it (pydantic models, datasketch's MinHash: commit ``OLD``), for
``tests/unit/test_differential.py``.

:func:`records` builds the records the same on every run: groups of 8 over 300 tasks with
exact and near repeats of earlier completions, low rewards, truncations, stale versions,
loops, incomplete groups, at-least-once repeats of whole records, lax forms the models accept
(``"3"`` for an int, a date-only time), unknown fields, and the hostile records stored in the
golden file (drawn once from :mod:`tests.hostile`, whose draws depend on hypothesis' version).

:func:`run` is the driver: it decodes each record as the runtime does (the stage's
``input_type``), runs the filter in batches of 500, then the router over what the filter
accepted, and sums up every outcome (dead letters with their kind and message, decisions,
routed samples, and a digest of the JSON they embed). It imports only what both trees have,
so the same function runs on this tree and, in a subprocess, on the old one.

``python -m tests.differential`` writes the golden file: the old tree's outcomes, from
``git archive OLD`` (so it needs the repository's history, and ``datasketch``).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import random
import subprocess
import sys
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

OLD = "73e9f87"
"""The last commit before the hot path (issue 39)."""
GOLDEN = Path(__file__).parent / "data" / f"differential-{OLD}.json.gz"
RECORDS = 20_000
HOSTILE = 200
LATEST_VERSION = 5
FILTER_POLICY = {"name": "differential", "min_reward": 0.0, "max_staleness": 2,
                 "length": {"unit": "tokens", "min": 1, "max": 48}}
ROUTING_POLICY = {"name": "differential"}
WORDS = ("first", "add", "the", "ones", "digit", "carry", "one", "then", "tens", "so", "we",
         "get", "sum", "of", "and", "next", "column", "write", "down", "check", "result",
         "again", "total", "is", "which", "gives", "step", "hundreds", "plus", "equals")


def records(hostile: list[tuple[int, bytes | None]]) -> list[bytes | None]:
    """The varied records, with ``hostile`` (position, value) put in at their positions."""
    from schemas import Score as ScoreModel
    from schemas import ScoredTrajectory, Task, Trajectory, Turn, VerifierSpec
    from services.common.text import REPETITION_MEASURE, repetition_ratio

    rng = random.Random(39)
    epoch = datetime(2026, 1, 1, tzinfo=UTC)

    def ident() -> uuid.UUID:
        return uuid.UUID(int=rng.getrandbits(128), version=4)

    tasks = []
    for i in range(300):
        a, b = rng.randrange(100, 1000), rng.randrange(100, 1000)
        tasks.append(Task(event_id=ident(), created_at=epoch, task_id=f"diff:{i}",
                          env="arithmetic", prompt=f"{a}+{b}=",
                          verifier=VerifierSpec(kind="env", answer=str(a + b))))
    said: dict[str, list[str]] = {}
    out: list[bytes | None] = []
    group = 0
    while len(out) < RECORDS - len(hostile):
        task = tasks[rng.randrange(len(tasks))]
        earlier = said.setdefault(task.task_id, [])
        size = 8
        present = [i for i in range(size) if not (i == 7 and rng.random() < 0.03)]
        for index in present:
            roll = rng.random()
            if earlier and roll < 0.1:  # an exact repeat, up to case and spaces
                text = rng.choice(earlier).upper().replace(" ", "  ")
            elif earlier and roll < 0.2:  # a near repeat: a word changed or added
                words = rng.choice(earlier).split()
                if rng.random() < 0.5:
                    words[rng.randrange(len(words))] = rng.choice(WORDS)
                else:
                    words.insert(rng.randrange(len(words) + 1), rng.choice(WORDS))
                text = " ".join(words)
            elif roll < 0.23:  # a loop
                text = " ".join(["carry the one"] * rng.randrange(4, 12))
            else:
                text = " ".join(rng.choice(WORDS) if rng.random() > 0.15
                                else str(rng.randrange(1000)) for _ in range(rng.randrange(8, 50)))
            earlier.append(text)
            right = rng.random() < 0.5
            tokens = [rng.randrange(50_000) for _ in range(rng.randrange(1, 60))]
            at = epoch + timedelta(seconds=len(out))
            traj = Trajectory(
                event_id=ident(), created_at=at, task=task, group_id=f"g{group}",
                sample_index=index, group_size=size,
                turns=[Turn(role="user", content=task.prompt),
                       Turn(role="assistant", content=text, token_ids=tokens,
                            logprobs=[-rng.random() for _ in tokens])],
                completion=text, prompt_token_ids=[rng.randrange(50_000) for _ in range(8)],
                completion_token_ids=tokens, completion_logprobs=[-0.5] * len(tokens),
                finish_reason="length" if rng.random() < 0.03 else "stop",
                policy_version=LATEST_VERSION - (3 if rng.random() < 0.03 else
                                                 rng.randrange(2)),
                model="tiny")
            ngram = 3 if rng.random() < 0.8 else 4  # a measure the filter can, or cannot, reuse
            ratio = repetition_ratio(text, ngram)
            scores = [ScoreModel(scorer="verifier", version="v", value=float(right),
                                 passed=right),
                      ScoreModel(scorer="repetition", version="r", value=ratio,
                                 passed=ratio <= 0.5,
                                 details={"measure": REPETITION_MEASURE, "ngram": ngram})]
            reward = -1.0 if rng.random() < 0.05 else float(right)
            scored = ScoredTrajectory(
                event_id=ident(), created_at=at, trajectory=traj, scores=scores,
                reward=reward, verdict="correct" if right else "incorrect",
                reward_rule="differential")
            value = scored.to_bytes()
            lax = rng.random()
            if lax < 0.01:
                doc = json.loads(value)
                doc["trajectory"]["policy_version"] = str(doc["trajectory"]["policy_version"])
                value = json.dumps(doc).encode()
            elif lax < 0.02:
                doc = json.loads(value)
                doc["from_a_newer_producer"] = {"kept": True}
                value = json.dumps(doc).encode()
            out.append(value)
            if rng.random() < 0.02:  # delivered again, at least once
                out.append(value)
        group += 1
    out = out[:RECORDS - len(hostile)]
    for position, value in sorted(hostile, key=lambda h: h[0]):
        out.insert(position, value)
    return out


def _digest(embedded: Any) -> str:
    """What a consumer parses from an embedded record, as one digest."""
    return hashlib.sha256(json.dumps(embedded, sort_keys=True).encode()).hexdigest()[:12]


def _id(value: str) -> str:
    return value.replace("-", "")[:12]


def run(values: list[bytes | None], *, near: bool) -> dict[str, Any]:
    """Decode, filter and route ``values`` (with or without the near-duplicate rule, the one
    that reads MinHash signatures); every outcome, in order, ids cut to 12 hex digits."""
    from services.common.stage import DecodeFailure, decode
    from services.common.state import StateStore
    from services.filter.policy import FilterPolicy
    from services.filter.stage import FilterStage
    from services.router.policy import RoutingPolicy
    from services.router.stage import RouterStage

    fstore, rstore = StateStore("filter.state"), StateStore("router.state")
    fstore.adopt(0)
    rstore.adopt(0)
    policy = {**FILTER_POLICY, "dedup": {"near": near}}
    filt = FilterStage(FilterPolicy.model_validate(policy), "f" * 64,
                       accepted_topic="filtered", rejected_topic="rejected", state=fstore,
                       latest_version=lambda _model: LATEST_VERSION)
    router = RouterStage(RoutingPolicy.model_validate(ROUTING_POLICY), "r" * 64, state=rstore,
                         topics={s: f"accepted.{s}" for s in ("cpt", "sft", "rl")})
    dead: list[Any] = []
    decisions: list[Any] = []
    routed: list[Any] = []
    forward: list[bytes] = []

    def through(stage: Any, store: Any, batch: list[bytes | None], sink: list[Any]) -> None:
        good = []
        for value in batch:
            try:
                good.append(decode(stage.input_type, value))
                dead.append(None)
            except DecodeFailure as exc:
                dead.append([exc.kind, str(exc)])
        store.begin()
        for output in stage.process_partition(store.partition(0), good):
            data = output.value.to_bytes()
            sink.append((output.topic, json.loads(data)))
            if output.topic == "filtered":
                forward.append(data)
        store.changes()

    filtered: list[Any] = []
    for i in range(0, len(values), 500):
        through(filt, fstore, values[i:i + 500], filtered)
    for topic, d in filtered:
        decisions.append([topic, _id(d["event_id"]), _id(d["scored"]["event_id"]),
                          d["accepted"], d["reasons"], d["flags"], d["group_accepted"],
                          d["latest_version"], _digest(d["scored"])])
    dead_filter, dead[:] = list(dead), []
    routed_raw: list[Any] = []
    for i in range(0, len(forward), 500):
        through(router, rstore, list(forward[i:i + 500]), routed_raw)
    for topic, r in routed_raw:
        routed.append([topic, _id(r["event_id"]), r["stage"], r["group_id"],
                       [_id(i) for i in r["decision_ids"]], r["weight"], r["reason"],
                       r["filter_policy_hash"] == "f" * 64, [_digest(s) for s in r["samples"]]])
    return {"dead": dead_filter, "decisions": decisions, "routed": routed,
            "dead_router": [d for d in dead if d is not None]}


def _old(values: list[bytes | None]) -> dict[str, Any]:
    """:func:`run` on the tree of ``OLD``, in a subprocess, with the near-duplicate rule
    (``near``) and without (``exact``)."""
    repo = Path(__file__).parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", OLD, "services", "schemas"], cwd=repo,
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        (Path(tmp) / "tests").mkdir()
        (Path(tmp) / "tests" / "__init__.py").write_text("")
        (Path(tmp) / "tests" / "differential.py").write_text(Path(__file__).read_text())
        inputs = Path(tmp) / "inputs.json"
        inputs.write_text(json.dumps([None if v is None else base64.b64encode(v).decode()
                                      for v in values]))
        script = ("import base64, json, sys; from tests.differential import run; "
                  "v = [None if x is None else base64.b64decode(x) "
                  "for x in json.load(open(sys.argv[1]))]; "
                  "json.dump({'near': run(v, near=True), 'exact': run(v, near=False)}, "
                  "open(sys.argv[2], 'w'))")
        result = Path(tmp) / "result.json"
        subprocess.run([sys.executable, "-c", script, str(inputs), str(result)], cwd=tmp,
                       check=True, env={"PYTHONPATH": tmp, "PATH": "/usr/bin:/bin"})
        outcome: dict[str, Any] = json.loads(result.read_text())
        return outcome


def row_digest(row: Any) -> str:
    return hashlib.sha256(json.dumps(row).encode()).hexdigest()[:8]


def compact(outcome: dict[str, Any], *, near: bool) -> dict[str, Any]:
    """What the golden file keeps of an outcome: dead letters whole; each decision and routed
    sample as a digest of all of it, with (under the near-duplicate rule, for telling its
    disagreements apart) a decision's acceptance, reasons, flags and group count, and a routed
    sample's stage and group."""
    if not near:
        return {"dead": outcome["dead"], "dead_router": outcome["dead_router"],
                "decisions": [row_digest(r) for r in outcome["decisions"]],
                "routed": [row_digest(r) for r in outcome["routed"]]}
    return {"dead": outcome["dead"], "dead_router": outcome["dead_router"],
            "decisions": [[r[3], r[4], r[5], r[6], row_digest(r)]
                          for r in outcome["decisions"]],
            "routed": [[r[2], r[3], row_digest(r)] for r in outcome["routed"]]}


def make_golden() -> None:
    from tests import hostile as hostile_records

    rng = random.Random(390)
    drawn = hostile_records.records("scored", HOSTILE)
    hostile = [(rng.randrange(RECORDS), value) for _kind, value in drawn]
    old = _old(records(hostile))
    outcome = {mode: compact(old[mode], near=mode == "near") for mode in ("near", "exact")}
    GOLDEN.parent.mkdir(exist_ok=True)
    doc = {"old": OLD, "hostile": [[p, None if v is None else base64.b64encode(v).decode()]
                                   for p, v in hostile], "outcomes": outcome}
    with gzip.open(GOLDEN, "wt", encoding="utf-8") as f:
        json.dump(doc, f)


def golden() -> tuple[list[tuple[int, bytes | None]], dict[str, Any]]:
    with gzip.open(GOLDEN, "rt", encoding="utf-8") as f:
        doc = json.load(f)
    hostile = [(p, None if v is None else base64.b64decode(v)) for p, v in doc["hostile"]]
    return hostile, doc["outcomes"]


if __name__ == "__main__":
    make_golden()
    print(f"wrote {GOLDEN}")
