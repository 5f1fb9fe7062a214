"""The /metrics, /healthz, /readyz endpoint follows the state it is given."""

from __future__ import annotations

import urllib.error
import urllib.request

from services.common import metrics
from services.common.metrics import HealthServer


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_endpoints_follow_state() -> None:
    state = {"alive": True, "ready": False}
    server = HealthServer(
        "127.0.0.1", 0, alive=lambda: state["alive"], ready=lambda: state["ready"]
    ).start()
    try:
        assert _get(server.port, "/healthz") == (200, "ok\n")
        assert _get(server.port, "/readyz")[0] == 503
        state["ready"] = True
        assert _get(server.port, "/readyz") == (200, "ready\n")
        state["alive"] = False
        assert _get(server.port, "/healthz")[0] == 503
        metrics.RECORDS_CONSUMED.labels("health-test", "t").inc(3)
        code, body = _get(server.port, "/metrics")
        assert code == 200
        sample = 'flywheel_runtime_records_consumed_total{service="health-test",topic="t"} 3.0'
        assert sample in body
        assert _get(server.port, "/nope")[0] == 404
    finally:
        server.close()
