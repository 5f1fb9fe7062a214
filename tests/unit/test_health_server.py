"""The /metrics, /healthz, /readyz endpoint follows the state it is given."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

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


def test_a_scraper_that_leaves_before_the_answer_is_no_error(
    capsys: pytest.CaptureFixture[str]
) -> None:
    """A scraper that times out while the service is busy (seen: a gate evaluating) resets
    the connection; the server logs it at debug level, prints no traceback, serves on."""
    closed = threading.Event()

    class Slow(Collector):
        def collect(self) -> Iterator[Metric]:
            closed.wait(10)  # the answer is made only after the client has gone
            yield from ()

    noticed = threading.Event()

    class Notice(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "left before the answer" in record.getMessage():
                noticed.set()

    registry = CollectorRegistry()
    registry.register(Slow())
    logger = logging.getLogger("services.common.metrics")
    logger.setLevel(logging.DEBUG)
    notice = Notice()
    logger.addHandler(notice)
    server = HealthServer("127.0.0.1", 0, alive=lambda: True, ready=lambda: True,
                          registry=registry).start()
    try:
        client = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # a reset, as a timed-out scraper's
        closed.set()
        assert noticed.wait(10), "the server never noticed the client left"
        assert _get(server.port, "/healthz") == (200, "ok\n")
    finally:
        server.close()
        logger.removeHandler(notice)
        logger.setLevel(logging.NOTSET)
    assert "Traceback" not in capsys.readouterr().err
