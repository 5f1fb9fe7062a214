"""``flywheel up``: a whole flywheel from one profile, supervised, with a live view.

Order: the broker (a local one unless the profile names a cluster), the topics, the seed model
(bootstrapped when the profile has no model folder and the store has no version 0), the policy
files, then every service as its own supervised process (``python -m services run <name>``)
with its settings in ``FLYWHEEL_*`` variables, logs in ``<home>/logs/<name>.log`` and its
``/metrics`` on its own port. ``<home>/up.json`` describes the running stack for
``flywheel status`` and ``flywheel down``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import KafkaException
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from rich.console import Group
from rich.table import Table

from schemas import CheckpointEvent
from services import registry
from services.common import broker as local_kafka
from services.common import topics as topic_ops
from services.common.checkpoints import CheckpointFollower
from services.common.config import KafkaSettings
from services.common.errors import ConfigError
from services.up import monitor
from services.up.profile import POLICY_FIELD, SERVICES, Profile
from services.up.supervisor import ProcessSpec, Supervisor

log = logging.getLogger(__name__)

STATE_FILE = "up.json"


class Versions:
    """Every checkpoint event of the model, for the view: candidates and the gate's calls."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.events: dict[int, CheckpointEvent] = {}
        self.candidates: dict[int, CheckpointEvent] = {}
        self.lock = threading.Lock()

    def offer(self, event: CheckpointEvent) -> None:
        if event.model != self.model:
            return
        with self.lock:
            if event.status == "candidate":
                self.candidates[event.version] = event
            seen = self.events.get(event.version)
            if seen is None or seen.status == "candidate":
                self.events[event.version] = event

    def decided(self) -> list[CheckpointEvent]:
        with self.lock:
            return [e for _, e in sorted(self.events.items()) if e.status != "candidate"]


@dataclass
class Stack:
    profile: Profile
    kafka: dict[str, Any] = field(default_factory=dict)
    base_path: Path | None = None
    policy_files: dict[str, Path] = field(default_factory=dict)
    started_broker: bool = False
    ports: dict[str, int] = field(default_factory=dict)
    versions: Versions | None = None
    """Every checkpoint event the last run() saw."""
    prometheus: monitor.Prometheus | None = None

    @property
    def home(self) -> Path:
        return self.profile.home

    @property
    def kafka_settings(self) -> KafkaSettings:
        return KafkaSettings(**self.kafka)

    # -- set-up ---------------------------------------------------------------------------

    def prepare(self, say: Callable[[str], None] = print) -> None:
        p = self.profile
        self.home.mkdir(parents=True, exist_ok=True)
        self.kafka = dict(p.kafka)
        self.policy_files = self._policies()
        self._validate()  # before anything starts
        self._monitor(say)
        if p.local_broker:
            local_kafka.install()
            broker, self.started_broker = local_kafka.start(self.home / "kafka", p.broker_port)
            self.kafka["bootstrap_servers"] = broker.bootstrap
            say(f"broker: {broker.bootstrap} ({'started' if self.started_broker else 'running'})")
        try:
            self._prepare(say)
        except BaseException:
            if self.started_broker:  # leave nothing behind that this call started
                local_kafka.stop(self.home / "kafka")
            raise

    def _monitor(self, say: Callable[[str], None]) -> None:
        settings = self.profile.prometheus
        program = settings.program()
        if program is None:
            say("prometheus: not installed, not started (alert rules and dashboards: "
                "deploy/prometheus, deploy/grafana)" if settings.enabled is None else
                "prometheus: off")
            return
        if not local_kafka.bindable(settings.port):
            if settings.enabled:
                raise ConfigError(f"prometheus.port {settings.port} is in use (another "
                                  "Prometheus?); choose another in the profile")
            say(f"prometheus: port {settings.port} is in use, not started (set "
                "prometheus.port in the profile)")
            return
        self.prometheus = monitor.Prometheus(settings, program, self.home)
        say(f"prometheus: {self.prometheus.url} (alert rules: deploy/prometheus/alerts.yml; "
            "dashboards: deploy/grafana)")

    def _prepare(self, say: Callable[[str], None]) -> None:
        p = self.profile
        settings = self.kafka_settings
        report = topic_ops.apply(topic_ops.admin_client(settings),
                                 topic_ops.load(prefix=settings.topic_prefix))
        say(f"topics: {len(report.changes)} changes under {settings.topic_prefix!r}")
        self.base_path = p.model_path or self._seed_model(say)

    def _policies(self) -> dict[str, Path]:
        out = {}
        for service, value in self.profile.policies.items():
            if service not in POLICY_FIELD:
                raise ConfigError(f"policies: unknown service {service!r}; one of "
                                  f"{sorted(POLICY_FIELD)}")
            if isinstance(value, Path):
                out[service] = value
                continue
            target = self.home / "policies" / f"{service}.yaml"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(yaml.safe_dump(value, sort_keys=False), encoding="utf-8")
            out[service] = target
        return out

    def _validate(self) -> None:
        """Every service's settings and policy, checked before anything starts."""
        from services.common.policy import load_policy
        from services.filter.policy import FilterPolicy
        from services.router.policy import RoutingPolicy
        from services.scorer.stage import ScoringConfig

        kinds: dict[str, type[Any]] = {"scorer": ScoringConfig, "filter": FilterPolicy,
                                       "router": RoutingPolicy}
        for service, path in self.policy_files.items():
            load_policy(kinds[service], path)
        placeholder = {"model_path": "x", "base_model_path": "x"}
        checked = {}
        for service in SERVICES:
            cls = registry.SERVICES[service].settings_class()
            fields = {k: v for k, v in placeholder.items() if k in cls.model_fields}
            try:
                checked[service] = cls(**{**fields, **self._section(service),
                                          "kafka": self.kafka})
            except ValidationError as exc:
                raise ConfigError(f"profile section {service!r}: {exc}") from exc
        # Every row of every task file, so a bad line is named now, with nothing published.
        from services.envs.heldout import suite_tasks
        from services.envs.tasksets import load

        for spec in checked["feeder"].tasksets:
            load(spec)
        suite_tasks(checked["gate"].held_out)

    def _section(self, service: str) -> dict[str, Any]:
        """A service's settings as the profile gives them; the feeder also gets the gate's
        held-out suite, so it keeps those tasks off ``tasks``."""
        fields = self.profile.section(service)
        if service == "feeder":
            fields.setdefault("held_out", self.profile.gate.get("held_out", {}))
        return fields

    def _seed_model(self, say: Callable[[str], None]) -> Path:
        from services.bootstrap import bootstrap, publish_promoted
        from services.envs.heldout import gate_headline, gate_task_ids
        from services.gate.evaluate import evaluate
        from services.trainer.store import MANIFEST_FILE, CheckpointStore

        p, settings = self.profile, self.kafka_settings
        store = CheckpointStore(p.checkpoint_url)
        if not store.local:
            raise ConfigError("bootstrapping needs a local checkpoint store; give the profile "
                              "a model_path for a remote one")
        folder = Path(store.uri(0))
        versions = _read_checkpoints(settings, p.model_name)
        if 0 in store.versions():
            say(f"seed model: {folder} (exists)")
            if any(e.version == 0 for e in versions.decided()):
                return folder
            document = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
            from schemas import FileDigest
            manifest = [FileDigest(**f) for f in document["files"]]
            metrics = document.get("metrics", {})
            uri = str(folder)
        else:
            held = gate_headline(p.gate)
            say(f"seed model: training a tiny model on {p.bootstrap.samples:,} samples of easy "
                f"{p.bootstrap.env} data ...")
            uri, manifest, metrics = bootstrap(p.bootstrap, p.checkpoint_url, p.model_name,
                                               evaluate=lambda f: evaluate(f, held),
                                               excluded=gate_task_ids(p.gate))
            say(f"seed model: held-out pass rate {metrics.get('pass_rate', 0):.3f}")
        publish_promoted(settings, settings.topic("checkpoints"), p.model_name, uri, manifest,
                         metrics)
        say("seed model: published as promoted version 0")
        return folder

    # -- processes ------------------------------------------------------------------------

    def specs(self) -> list[ProcessSpec]:
        p = self.profile
        assert self.base_path is not None, "prepare() first"
        root = str(Path(p.checkpoint_url).resolve()) if "://" not in p.checkpoint_url \
            else p.checkpoint_url
        model = {
            "generator": {"model_path": str(self.base_path), "model_name": p.model_name,
                          "base_version": 0, "checkpoint_root": root},
            "trainer": {"base_model_path": str(self.base_path), "model_name": p.model_name,
                        "base_version": 0, "checkpoint_url": p.checkpoint_url},
            "gate": {"base_model_path": str(self.base_path), "model_name": p.model_name,
                     "base_version": 0, "checkpoint_root": root},
        }
        out, port = [], p.metrics_port
        for service in SERVICES:
            fields = {**self._section(service), **model.get(service, {})}
            if service in self.policy_files:
                fields[POLICY_FIELD[service]] = str(self.policy_files[service])
            replicas = p.generators if service == "generator" else 1
            for i in range(replicas):
                name = f"{service}-{i}" if service == "generator" else service
                env = self._env(fields, instance=name, port=port)
                out.append(ProcessSpec(name, [sys.executable, "-m", "services", "run", service],
                                       env))
                self.ports[name] = port
                port += 1
        return out

    def _env(self, fields: dict[str, Any], *, instance: str, port: int) -> dict[str, str]:
        threads = str(self.profile.threads)
        env = {}
        for key, value in fields.items():
            if value is None:  # the setting's default
                continue
            env[f"FLYWHEEL_{key.upper()}"] = (json.dumps(value, default=str)
                                              if isinstance(value, dict | list) else str(value))
        # The stack's own keys last: one cluster, distinct instance ids and ports.
        env |= {"FLYWHEEL_KAFKA": json.dumps(self.kafka), "FLYWHEEL_INSTANCE_ID": instance,
                "FLYWHEEL_METRICS__PORT": str(port), "OMP_NUM_THREADS": threads,
                "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
        return env

    def write_state(self) -> None:
        state = {"pid": os.getpid(), "ports": self.ports, "kafka": self.kafka,
                 "prometheus": self.prometheus.url if self.prometheus else None,
                 "model_name": self.profile.model_name, "started_broker": self.started_broker,
                 "home": str(self.home.resolve()), "started_at": time.time()}
        (self.home / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")

    def run(self, *, seconds: float | None = None, view: Callable[[Snapshot], None] | None
            = None, until: Callable[[Snapshot], bool] | None = None, stop_broker: bool = True,
            supervisor_options: dict[str, Any] | None = None) -> Snapshot:
        """Start every service, supervise until SIGINT/SIGTERM, ``seconds`` or ``until``
        returns true for a snapshot; then stop them."""
        specs = self.specs()
        if self.prometheus is not None:  # scrapes every service's port
            specs.append(self.prometheus.spec(self.ports))
        supervisor = Supervisor(specs, self.home / "logs", **(supervisor_options or {}))
        stopping = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stopping.set())
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        versions = self.versions = Versions(self.profile.model_name)
        settings = self.kafka_settings
        snapshot = Snapshot.empty()
        follower: CheckpointFollower | None = None
        try:
            follower = CheckpointFollower(settings, settings.topic("checkpoints"), versions)
            follower.start()
            self.write_state()
            started = time.monotonic()
            supervisor.start()
            while not stopping.is_set():
                supervisor.poll()
                snapshot = Snapshot.take(self.ports, versions, snapshot,
                                         {n: c.state for n, c in supervisor.children.items()},
                                         {n: c.restarts for n, c in supervisor.children.items()},
                                         self.prometheus.alerts() if self.prometheus else None)
                if view is not None:
                    view(snapshot)
                if seconds is not None and time.monotonic() - started >= seconds:
                    break
                if until is not None and until(snapshot):
                    break
                stopping.wait(1.0)
        finally:
            codes = supervisor.stop()
            log.info("stopped: %s", codes)
            if follower is not None:
                follower.stop()
                try:  # again from the start: the decisions committed while stopping too
                    self.versions = _read_checkpoints(settings, self.profile.model_name, 10)
                except Exception as exc:  # the view's record only: never mask the exit
                    log.warning("checkpoints not read to the end: %s", exc)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            (self.home / STATE_FILE).unlink(missing_ok=True)
            if stop_broker and self.started_broker:
                local_kafka.stop(self.home / "kafka")
        return snapshot


# -- the view -------------------------------------------------------------------------------

def scrape(port: int, timeout: float = 0.5) -> dict[str, float]:
    """``name{labels}`` -> value of every sample on a service's /metrics; {} if it is down."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
            text = r.read().decode()
    except OSError:
        return {}
    return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, float]:
    """``name{labels}`` -> value of every sample in a Prometheus text exposition."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def _total(metrics: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in metrics.items() if k == prefix or k.startswith(prefix + "{"))


THROUGHPUT = {"feeder": "flywheel_feeder_tasks_published_total",
              "generator": "flywheel_generator_trajectories_total"}


@dataclass
class Snapshot:
    at: float
    rows: dict[str, dict[str, Any]]
    versions: list[CheckpointEvent]
    counters: dict[str, float]
    alerts: list[dict[str, Any]] | None = None
    """Prometheus's pending and firing alerts; None without a Prometheus that answers."""

    @classmethod
    def empty(cls) -> Snapshot:
        return cls(time.monotonic(), {}, [], {})

    @classmethod
    def take(cls, ports: dict[str, int], versions: Versions, before: Snapshot,
             states: dict[str, str] | None = None, restarts: dict[str, int] | None = None,
             alerts: list[dict[str, Any]] | None = None) -> Snapshot:
        now, rows, counters = time.monotonic(), {}, {}
        for name, port in ports.items():
            m = scrape(port)
            service = name.split("-")[0]
            produced = _total(m, THROUGHPUT.get(service, "flywheel_runtime_records_produced_total"))
            counters[name] = produced
            elapsed = now - before.at
            rate = ((produced - before.counters[name]) / elapsed
                    if name in before.counters and elapsed > 0 else None)
            rows[name] = {
                "state": (states or {}).get(name, "up" if m else "down"),
                "restarts": (restarts or {}).get(name, 0),
                "rate": rate, "produced": produced,
                "lag": _total(m, "flywheel_runtime_consumer_lag_records") if m else None,
                "serving": m.get("flywheel_generator_policy_version"),
                "detail": _detail(service, m),
            }
        return cls(now, rows, versions.decided(), counters, alerts)

    def render(self) -> Group:
        services = Table(title="services", expand=True)
        for col in ("service", "state", "restarts", "out/s", "out total", "lag", "detail"):
            services.add_column(col)
        for name, r in self.rows.items():
            services.add_row(name, r["state"], str(r["restarts"]),
                             "" if r["rate"] is None else f"{r['rate']:.1f}",
                             f"{r['produced']:.0f}",
                             "" if r["lag"] is None else f"{r['lag']:.0f}", r["detail"])
        versions = Table(title="versions (held-out)", expand=True)
        for col in ("version", "status", "pass rate", "trained on", "reason"):
            versions.add_column(col)
        for e in self.versions[-12:]:
            versions.add_row(str(e.version), e.status, f"{e.metrics.get('pass_rate', 0):.3f}",
                             " ".join(f"{k}={v}" for k, v in sorted(e.stage_mix.items())),
                             (e.reason or "")[:60])
        if self.alerts is None:
            return Group(services, versions)
        firing = [a for a in self.alerts if a.get("state") == "firing"]
        alerts = Table(title=f"alerts firing: {len(firing)}", expand=True)
        for col in ("alert", "severity", "summary"):
            alerts.add_column(col)
        for a in firing:
            alerts.add_row(a["labels"].get("alertname", "?"), a["labels"].get("severity", ""),
                           a.get("annotations", {}).get("summary", ""))
        return Group(services, versions, alerts)


def _detail(service: str, m: dict[str, float]) -> str:
    if not m:
        return ""
    if service == "feeder":
        return (f"backlog {m.get('flywheel_feeder_backlog_tasks', 0):.0f}, "
                f"frontier {m.get('flywheel_curriculum_frontier', 0):g}")
    if service == "generator":
        return f"serving v{m.get('flywheel_generator_policy_version', 0):.0f}"
    if service == "filter":
        return f"accept ratio {m.get('flywheel_filter_accept_ratio', 0):.2f}"
    if service == "router":
        return _per_stage(m, "flywheel_router_routed_samples_total")
    if service == "trainer":
        return (f"candidate v{m.get('flywheel_trainer_candidate_version', 0):.0f}; samples "
                + _per_stage(m, "flywheel_trainer_samples_total"))
    if service == "gate":
        return f"promoted v{m.get('flywheel_gate_promoted_version', 0):.0f}"
    return ""


def _read_checkpoints(settings: KafkaSettings, model: str, wait: float = 60.0) -> Versions:
    """Every event of ``model`` on ``checkpoints`` so far. Just after the topics were created
    their partitions may have no leader yet: retried until ``wait`` has passed."""
    deadline = time.monotonic() + wait
    while True:
        versions = Versions(model)
        try:
            follower = CheckpointFollower(settings, settings.topic("checkpoints"), versions)
            try:
                follower.catch_up()
            finally:
                follower.stop()
            return versions
        except KafkaException as exc:
            if time.monotonic() > deadline:
                raise
            log.info("checkpoints not readable yet (%s); retrying", exc)
            time.sleep(1.0)


def _per_stage(m: dict[str, float], metric: str) -> str:
    """``cpt 12 rl 40 sft 9`` from a counter labelled by stage."""
    stages = {k.split("stage=")[1].split(",")[0].rstrip("}"): v for k, v in m.items()
              if k.startswith(metric + "{")}
    return " ".join(f"{k} {v:.0f}" for k, v in sorted(stages.items()))


def read_state(home: Path) -> dict[str, Any] | None:
    path = home / STATE_FILE
    if not path.is_file():
        return None
    state: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    try:
        os.kill(int(state["pid"]), 0)
    except ProcessLookupError:
        return None
    return state


def status_snapshot(state: dict[str, Any]) -> Snapshot:
    """A running stack's snapshot from outside: its /metrics and the checkpoints topic."""
    versions = _read_checkpoints(KafkaSettings(**state["kafka"]), state["model_name"])
    ports = {k: int(v) for k, v in state["ports"].items()}
    first = Snapshot.take(ports, versions, Snapshot.empty())
    time.sleep(1.0)  # out/s: counters one second apart
    url = state.get("prometheus")
    return Snapshot.take(ports, versions, first,
                         alerts=monitor.alerts(url) if url else None)


def down(home: Path, timeout: float = 120.0) -> bool:
    """Stop the stack running from ``home`` (SIGTERM to ``flywheel up``); False if none."""
    state = read_state(home)
    if state is None:
        return False
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.5)
    raise TimeoutError(f"flywheel up (pid {pid}) did not stop within {timeout:.0f} s")
