"""The live view of a running flywheel: every service's /metrics and the model's versions,
as a rich table (``flywheel up``, ``flywheel status``)."""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaException
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group
from rich.table import Table

from schemas import CheckpointEvent
from services.common.checkpoints import CheckpointFollower
from services.common.config import KafkaSettings
from services.common.signing import Verifier

log = logging.getLogger(__name__)


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


def read_checkpoints(settings: KafkaSettings, model: str, verifier: Verifier,
                     wait: float = 60.0) -> Versions:
    """Every event of ``model`` on ``checkpoints`` so far. Just after the topics were created
    their partitions may have no leader yet: retried until ``wait`` has passed."""
    deadline = time.monotonic() + wait
    while True:
        versions = Versions(model)
        try:
            follower = CheckpointFollower(settings, settings.topic("checkpoints"), versions,
                                          verifier=verifier)
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
        return f"serving v{m.get('flywheel_generator_policy_version', 0):.0f}{_precision(m)}"
    if service == "filter":
        return f"accept ratio {m.get('flywheel_filter_accept_ratio', 0):.2f}"
    if service == "router":
        return _per_stage(m, "flywheel_router_routed_samples_total")
    if service == "trainer":
        return (f"candidate v{m.get('flywheel_trainer_candidate_version', 0):.0f}"
                f"{_precision(m)}; samples " + _per_stage(m, "flywheel_trainer_samples_total"))
    if service == "gate":
        return f"promoted v{m.get('flywheel_gate_promoted_version', 0):.0f}{_precision(m)}"
    return ""


def _precision(m: dict[str, float]) -> str:
    """``, bfloat16``: the dtype a model service computes in (``flywheel_model_precision``)."""
    chosen = [k.split('dtype=')[1].rstrip("}") for k, v in m.items()
              if k.startswith("flywheel_model_precision{") and v == 1]
    return f", {chosen[0]}" if chosen else ""


def _per_stage(m: dict[str, float], metric: str) -> str:
    """``cpt 12 rl 40 sft 9`` from a counter labelled by stage."""
    stages = {k.split("stage=")[1].split(",")[0].rstrip("}"): v for k, v in m.items()
              if k.startswith(metric + "{")}
    return " ".join(f"{k} {v:.0f}" for k, v in sorted(stages.items()))
