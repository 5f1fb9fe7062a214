"""The whole flywheel, end to end, as ``flywheel up`` runs it: a bootstrapped seed model, two
generators, scorer, filter, router, trainer and gate as supervised processes on a real broker.
The held-out pass rate must rise by a clear margin across at least three promoted versions, and
every generator must have served every promoted version."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import pytest

from services.bootstrap import BootstrapSettings
from services.common.broker import free_port
from services.up.profile import Profile
from services.up.stack import Snapshot, Stack
from tests.kafka import Broker

pytestmark = [pytest.mark.integration, pytest.mark.model]

PROMOTIONS = 4  # promoted versions after the seed model before the run ends
SETTLE_SECONDS = 20.0  # then this long, so every generator reloads the last one
BUDGET_SECONDS = 420.0


@pytest.mark.timeout(900)
def test_the_pass_rate_rises_across_promoted_versions_served_by_every_generator(
        kafka: Broker, uid: str, tmp_path: Path) -> None:
    prefix = f"fw{uid}."
    profile = Profile(
        kafka={"bootstrap_servers": kafka.bootstrap, "topic_prefix": prefix},
        home=tmp_path / "home", checkpoint_url=str(tmp_path / "store"), generators=2,
        metrics_port=free_port(), bootstrap=BootstrapSettings(seconds=45))
    stack = Stack(profile)
    stack.prepare(say=print)

    enough_at: list[float] = []
    promoted_by_then: set[int] = set()

    def until(snapshot: Snapshot) -> bool:
        promoted = [e for e in snapshot.versions if e.status == "promoted" and e.version > 0]
        if len(promoted) >= PROMOTIONS and not enough_at:
            enough_at.append(time.monotonic())
            promoted_by_then.update(e.version for e in promoted)
        return bool(enough_at) and time.monotonic() - enough_at[0] >= SETTLE_SECONDS

    started = time.monotonic()
    final = stack.run(seconds=BUDGET_SECONDS, until=until,
                      supervisor_options={"grace": 60.0})
    took = time.monotonic() - started
    assert all(r["restarts"] == 0 for r in final.rows.values()), final.rows

    events = [json.loads(m.value()) for m in kafka.read_all(f"{prefix}checkpoints")]
    decided = [e for e in events if e["model"] == "policy" and e["status"] != "candidate"]
    promoted = [e for e in decided if e["status"] == "promoted"]
    seed = next(e for e in promoted if e["version"] == 0)
    later = [e for e in promoted if e["version"] > 0]
    rates = [e["metrics"]["pass_rate"] for e in later]
    print(f"seed {seed['metrics']['pass_rate']:.3f}; promoted {len(later)} in {took:.0f} s: "
          f"{[round(r, 3) for r in rates]}")
    assert len(later) >= 3, f"only {len(later)} promotions in {took:.0f} s"
    assert [e["version"] for e in later] == sorted(e["version"] for e in later)
    # A clear margin: the last promoted version well above the seed model.
    assert rates[-1] >= seed["metrics"]["pass_rate"] + 0.3, rates

    served: dict[str, set[int]] = defaultdict(set)
    for m in kafka.read_all(f"{prefix}raw", isolation="read_uncommitted"):
        t = json.loads(m.value())
        served[t["producer"]["instance"]].add(t["policy_version"])
    assert set(served) == {"generator-0", "generator-1"}
    # Every version promoted at least SETTLE_SECONDS before the stop (one promoted while the
    # services were stopping may not have been served by then).
    wanted = {0, *promoted_by_then}
    for instance, versions in served.items():
        assert wanted <= versions, (instance, sorted(wanted - versions))
