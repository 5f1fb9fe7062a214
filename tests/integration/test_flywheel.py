"""The whole flywheel, end to end, as ``flywheel up`` runs it: a bootstrapped seed model, two
generators, scorer, filter, router, trainer and gate as supervised processes on a real broker.

The run lasts until what the test checks has happened, observed in the running system (the
checkpoints topic and every service's /metrics), or until a generous budget is spent: the held-out
pass rate has risen by a clear margin over the seed model across at least three promoted
versions, and every generator has produced trajectories with the newest promoted version. A slow
or busy machine takes longer; it does not get a different verdict.

It is watched as an operator would: ``flywheel up`` runs a real Prometheus with the deployment's
configuration and alert rules. A record planted on ``scored`` is dead-lettered and the dead-letter
alert fires in the live view; then every Grafana panel query and every alert expression is
evaluated through Prometheus's HTTP API (each must parse; every panel must return data), and
``promtool check metrics`` passes on every service's /metrics.

It runs as production clusters are set up: the broker enforces SASL (SCRAM-SHA-512) and ACLs,
``flywheel up`` connects as an administrator whose password is only in the environment, and each
service as its own principal with only the ACLs ``flywheel acls apply`` grants it. No password
appears in a log, in ``up.json``, on /metrics or in ``flywheel status``."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from schemas import CheckpointEvent
from services.cluster import access
from services.cluster.local_broker import free_port, free_ports
from services.common.config import DEPLOY_DIR
from services.envs.heldout import suite, suite_tasks
from services.seed_model import SeedModelSettings
from services.up.monitor import Prometheus, PrometheusProfile
from services.up.profile import Profile, ServiceCredentials
from services.up.stack import Stack
from services.up.view import Snapshot
from tests.conftest import SecureCluster

pytestmark = [pytest.mark.integration, pytest.mark.model]

GENERATORS = ("generator-0", "generator-1")
PROMOTIONS = 3  # promoted versions after the seed model, at least
RISE = 0.3  # the newest promoted version's held-out pass rate over the seed model's, at least
# The seed model: a sample budget, so it is the same model on any machine of this kind
# (held-out pass rate 0.035 on the 2-core machine the suite is written on, about 40 s).
SEED = SeedModelSettings(samples=100_000)
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


class Watched:
    """``until``: :class:`ServedNewest` and the planted dead letter's alert firing in the view;
    then, while the stack still runs, what the dashboards and alert rules would see."""

    def __init__(self, served: ServedNewest, prometheus: Prometheus, promtool: str,
                 ports: dict[str, int]) -> None:
        self.served, self.prometheus, self.promtool, self.ports = (
            served, prometheus, promtool, ports)
        self.view = ""
        self.panels: dict[str, list[int]] = {}
        self.rules: dict[str, int] = {}
        self.metrics: dict[str, subprocess.CompletedProcess[str]] = {}
        self.exposed: dict[str, str] = {}
        """What an operator sees, to be searched for secrets: /metrics, up.json, status."""
        self.home: Path | None = None

    def __call__(self, snapshot: Snapshot) -> bool:
        if not self.served(snapshot):
            return False
        if not any(a["labels"].get("alertname") == "FlywheelDeadLetters"
                   and a["state"] == "firing" for a in snapshot.alerts or []):
            return False
        console = Console(file=io.StringIO(), width=200, record=True)
        console.print(snapshot.render())
        self.view = console.export_text()
        for path in sorted((DEPLOY_DIR / "grafana" / "dashboards").glob("*.json")):
            board = json.loads(path.read_text(encoding="utf-8"))
            for panel in board["panels"]:
                self.panels[f"{board['title']} / {panel['title']}"] = [
                    self._series(t["expr"]) for t in panel["targets"]]
        rules = yaml.safe_load((DEPLOY_DIR / "prometheus" / "alerts.yml").read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                self.rules[rule["alert"]] = self._series(rule["expr"])
        for name, port in self.ports.items():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
            self.exposed[f"{name} /metrics"] = text
            self.metrics[name] = subprocess.run([self.promtool, "check", "metrics"],
                                                input=text, capture_output=True, text=True)
        assert self.home is not None
        self.exposed["up.json"] = (self.home / "up.json").read_text(encoding="utf-8")
        status = subprocess.run([sys.executable, "-m", "services", "status", "--home",
                                 str(self.home)], capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr
        self.exposed["flywheel status"] = status.stdout + status.stderr
        return True

    def _series(self, expr: str) -> int:
        """Series with a value (NaN is none) an instant query returns; it must parse. Grafana's
        rate window becomes 5 minutes, longer than the whole run's samples need."""
        data = self.prometheus.api("query", query=expr.replace("$__rate_interval", "5m"))
        return sum(1 for r in data["result"] if not math.isnan(float(r["value"][1])))


@pytest.mark.timeout(BUDGET_SECONDS + 600)  # and the seed model, and stopping
def test_the_pass_rate_rises_across_promoted_versions_served_by_every_generator(
        secure_kafka: SecureCluster, uid: str, tmp_path: Path, prometheus: str, promtool: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = f"fw{uid}."
    kafka = secure_kafka.broker
    access.apply(kafka.admin(), access.all_grants(prefix))
    admin = secure_kafka.kafka(topic_prefix=prefix)
    # up's own password only in the environment, as the services' are.
    monkeypatch.setenv("FLYWHEEL_KAFKA__SASL_PASSWORD", admin.pop("sasl_password"))
    credentials = {}
    for name, password in secure_kafka.passwords.items():
        monkeypatch.setenv(f"FLYWHEEL_TEST_{name.upper()}_PASSWORD", password)
        credentials[name] = ServiceCredentials(username=name,
                                               password_env=f"FLYWHEEL_TEST_{name.upper()}_PASSWORD")
    profile = Profile(
        kafka=admin, credentials=credentials,
        home=tmp_path / "home", checkpoint_url=str(tmp_path / "store"),
        generators=len(GENERATORS), bootstrap=SEED,
        prometheus=PrometheusProfile(enabled=True, binary=prometheus, port=free_port(),
                                     scrape_interval="1s"))
    profile.metrics_port = free_ports(profile.processes)
    stack = Stack(profile)
    stack.prepare(say=print)
    assert stack.prometheus is not None
    kafka.produce(f"{prefix}scored", [(None, b"not a message")])  # for the filter's DLQ

    until = ServedNewest()
    watched = Watched(until, stack.prometheus, promtool, stack.ports)
    watched.home = profile.home
    started = time.monotonic()
    final = stack.run(seconds=BUDGET_SECONDS, until=watched, supervisor_options={"grace": 60.0})
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

    # Watched as an operator would, while it ran.
    assert watched.view, (f"the dead-letter alert did not fire within the budget; alerts: "
                          f"{final.alerts}")
    assert "FlywheelDeadLetters" in watched.view and "filter" in watched.view, watched.view
    for panel, series in watched.panels.items():
        print(f"panel {panel}: {sum(series)} series {series}")
    assert len(watched.panels) >= 5 * 4  # every panel of the five dashboards (committed JSON)
    empty = [panel for panel, series in watched.panels.items() if sum(series) == 0]
    assert not empty, f"panels without data: {empty}"
    print("alert expressions (series now):", watched.rules)
    for name, check in watched.metrics.items():
        assert check.returncode == 0, (name, check.stdout, check.stderr)

    # No secret where an operator looks: every service's log, up.json, /metrics, the status.
    logs = {f"log {p.name}": p.read_text(errors="replace")
            for p in (profile.home / "logs").glob("*.log")}
    assert len(logs) >= len(GENERATORS) + 6 and watched.exposed
    seen = logs | watched.exposed
    assert all("SASL_PLAINTEXT" in seen[f"log {n}.log"] for n in ("scorer", "trainer"))
    for secret in [secure_kafka.admin[1], *secure_kafka.passwords.values()]:
        leaked = [where for where, text in seen.items() if secret in text]
        assert not leaked, f"a password appears in {leaked}"
