"""The whole flywheel, end to end, as ``flywheel up`` runs it: a bootstrapped seed model, two
generators, scorer, filter, router, trainer and gate as supervised processes on a real broker.

The run lasts until what the test checks has happened, observed in the running system (the
checkpoints topic and every service's /metrics), or until a generous budget is spent: the held-out
pass rate has risen by a clear margin over the seed model across at least three promoted
versions, and every generator has produced trajectories with the newest promoted version. A slow
or busy machine takes longer; it does not get a different verdict."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import pytest

from schemas import CheckpointEvent
from services.bootstrap import BootstrapSettings
from services.common.broker import free_ports
from services.envs.heldout import suite, suite_tasks
from services.up.profile import Profile
from services.up.stack import Snapshot, Stack
from tests.kafka import Broker

pytestmark = [pytest.mark.integration, pytest.mark.model]

GENERATORS = ("generator-0", "generator-1")
PROMOTIONS = 3  # promoted versions after the seed model, at least
RISE = 0.3  # the newest promoted version's held-out pass rate over the seed model's, at least
# The seed model: a sample budget, so it is the same model on any machine of this kind
# (held-out pass rate 0.035 on the 2-core machine the suite is written on, about 40 s).
SEED = BootstrapSettings(samples=100_000)
# The rise took 1 to 2 minutes of the services on that machine; the budget allows for a machine
# several times slower or busier.
BUDGET_SECONDS = 900.0


def _risen(versions: list[CheckpointEvent]) -> int | None:
    """The newest promoted version if the pass rate has risen as required, else None."""
    promoted = [e for e in versions if e.status == "promoted"]
    seed = next((e for e in promoted if e.version == 0), None)
    later = [e for e in promoted if e.version > 0]
    if seed is None or len(later) < PROMOTIONS:
        return None
    if later[-1].metrics["pass_rate"] < seed.metrics["pass_rate"] + RISE:
        return None
    return later[-1].version


class ServedNewest:
    """``until`` for the stack: the pass rate has risen, and every generator has made a batch of
    trajectories since it began serving the newest promoted version (its /metrics say so)."""

    def __init__(self) -> None:
        self.since: dict[str, tuple[int, float]] = {}  # generator -> (version, produced then)
        self.newest: int | None = None  # the newest promoted version once the rate has risen
        self.fired = False

    def __call__(self, snapshot: Snapshot) -> bool:
        newest = _risen(snapshot.versions)
        if newest is None:
            return False
        self.newest = newest
        done = True
        for name in GENERATORS:
            row = snapshot.rows.get(name, {})
            if row.get("serving") != newest:
                done = False
                continue
            version, produced = self.since.get(name, (None, 0.0))
            if version != newest:  # first seen serving it: count its batches from here
                self.since[name] = (newest, row["produced"])
                done = False
                continue
            done &= row["produced"] > produced
        self.fired = done
        return done


@pytest.mark.timeout(BUDGET_SECONDS + 600)  # and the seed model, and stopping
def test_the_pass_rate_rises_across_promoted_versions_served_by_every_generator(
        kafka: Broker, uid: str, tmp_path: Path) -> None:
    prefix = f"fw{uid}."
    profile = Profile(
        kafka={"bootstrap_servers": kafka.bootstrap, "topic_prefix": prefix},
        home=tmp_path / "home", checkpoint_url=str(tmp_path / "store"),
        generators=len(GENERATORS), bootstrap=SEED)
    profile.metrics_port = free_ports(profile.processes)
    stack = Stack(profile)
    stack.prepare(say=print)

    until = ServedNewest()
    started = time.monotonic()
    final = stack.run(seconds=BUDGET_SECONDS, until=until, supervisor_options={"grace": 60.0})
    took = time.monotonic() - started
    assert all(r["restarts"] == 0 for r in final.rows.values()), final.rows

    events = [json.loads(m.value()) for m in kafka.read_all(f"{prefix}checkpoints")]
    decided = [e for e in events if e["model"] == "policy" and e["status"] != "candidate"]
    promoted = [e for e in decided if e["status"] == "promoted"]
    seed = next(e for e in promoted if e["version"] == 0)
    later = [e for e in promoted if e["version"] > 0]
    rates = [e["metrics"]["pass_rate"] for e in later]
    print(f"seed {seed['metrics']['pass_rate']:.3f}; promoted {len(later)} in {took:.0f} s: "
          f"{[round(r, 3) for r in rates]}; rejected "
          f"{sum(1 for e in decided if e['status'] == 'rejected')}")
    assert until.newest is not None, (
        f"in the {BUDGET_SECONDS:.0f} s budget the pass rate did not rise by {RISE} over the "
        f"seed's {seed['metrics']['pass_rate']:.3f} across {PROMOTIONS} promotions: {rates}")
    assert until.fired, (f"in the {BUDGET_SECONDS:.0f} s budget not every generator made a "
                         f"batch with v{until.newest}: {final.rows}")
    assert [e["version"] for e in later] == sorted(e["version"] for e in later)
    # A clear margin: the newest promoted version well above the seed model.
    newest = next(e for e in later if e["version"] == until.newest)
    assert newest["metrics"]["pass_rate"] >= seed["metrics"]["pass_rate"] + RISE, rates

    # Held-out hygiene: not one of the gate's held-out tasks was generated on, so none can
    # have been trained on. (The embedded feeder draws from the held-out's distribution.)
    # The suite has a set per curriculum level, 1-digit sums included.
    sets = suite(profile.gate["held_out"])
    held_out = {t.task_id for t in suite_tasks(sets)}
    published = {json.loads(m.value())["task_id"] for m in
                 kafka.read_all(f"{prefix}tasks", isolation="read_uncommitted")}
    assert {s.difficulty for s in sets} == set(profile.feeder["curriculum"]["levels"])
    assert published
    assert not held_out & published, sorted(held_out & published)[:5]

    served: dict[str, set[int]] = defaultdict(set)
    for m in kafka.read_all(f"{prefix}raw", isolation="read_uncommitted"):
        t = json.loads(m.value())
        served[t["producer"]["instance"]].add(t["policy_version"])
        assert t["task"]["task_id"] not in held_out
    assert set(served) == set(GENERATORS)
    allowed = {e["version"] for e in promoted}
    for instance, versions in served.items():
        # Only what the gate promoted ever reached a generator, and every generator reached the
        # newest. (A generator busy with a batch when two promotions land loads only the newer
        # one, so it need not have served every version in between.)
        assert versions <= allowed, (instance, sorted(versions - allowed))
        assert until.newest in versions, (instance, sorted(versions))
        print(f"{instance} served {sorted(versions)} of promoted {sorted(allowed)}")
