"""A real Prometheus server scrapes a running service and answers queries about it."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from schemas import Task
from services.cluster.local_broker import free_port
from services.common.metrics import HealthServer
from services.common.runtime import StreamRuntime
from services.relay.stage import RelayStage
from tests import factories
from tests.integration.runners import InThread, settings
from tests.kafka import Broker, wait_until

pytestmark = pytest.mark.integration

def _query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
    except OSError:
        return []
    assert body["status"] == "success", body
    return body["data"]["result"]


def _value(port: int, expr: str) -> float | None:
    """The single value of an instant query, or None while Prometheus has none."""
    result = _query(port, expr)
    return float(result[0]["value"][1]) if len(result) == 1 else None


def test_prometheus_scrapes_runtime_metrics(
        kafka: Broker, uid: str, tmp_path: Path, prometheus: str) -> None:
    src, out = f"in-{uid}", f"out-{uid}"
    kafka.create_topics([src, out, f"dlq-{uid}"], partitions=2)
    n = 3000
    kafka.produce(src, ((None, factories.task(i).to_bytes()) for i in range(n)))
    service = f"prom{uid}"
    rt = StreamRuntime(settings(kafka.bootstrap, service), RelayStage(Task, out), [src],
                       dlq_topic=f"dlq-{uid}")
    health = HealthServer("127.0.0.1", 0, alive=lambda: rt.alive, ready=lambda: rt.ready).start()
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: relay\n    static_configs: [{{targets: ['127.0.0.1:{health.port}']}}]\n"
    )
    prom = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb"),
    )
    try:
        with InThread(rt) as running:
            sel = f'service="{service}"'
            wait_until(
                lambda: _value(prom_port, f"flywheel_runtime_records_consumed_total{{{sel}}}")
                == n, 90, "Prometheus to see every record consumed",
            )
            assert _value(prom_port, 'up{job="relay"}') == 1
            assert _value(prom_port, f"flywheel_runtime_ready{{{sel}}}") == 1
            wait_until(
                lambda: _value(prom_port, f"sum(flywheel_runtime_consumer_lag_records{{{sel}}})")
                == 0, 30, "lag 0 in Prometheus",
            )
            committed = f'flywheel_runtime_transactions_total{{{sel},outcome="committed"}}'
            assert (_value(prom_port, committed) or 0) >= 1
        assert running.error is None
    finally:
        prom.terminate()
        prom.wait(30)
        health.close()
