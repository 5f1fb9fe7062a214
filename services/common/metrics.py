"""Standard runtime metrics and the HTTP endpoint every service serves.

Endpoints: ``/metrics`` (Prometheus text format), ``/healthz`` (200 while the process loop is
alive), ``/readyz`` (200 once connected and assigned partitions, 503 before).

Runtime metrics are shared by all services and labelled by ``service``; a service's own
metrics are named ``flywheel_<service>_<what>_<unit>``. Labels stay low-cardinality: service,
topic, partition, outcome, error type; never a record id.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

log = logging.getLogger(__name__)

RECORDS_CONSUMED = Counter(
    "flywheel_runtime_records_consumed_total", "Records read from input topics.",
    ["service", "topic"],
)
RECORDS_PRODUCED = Counter(
    "flywheel_runtime_records_produced_total",
    "Records written to output topics (dead letters excluded).", ["service", "topic"],
)
RECORDS_DEAD_LETTERED = Counter(
    "flywheel_runtime_records_dead_lettered_total",
    "Input records sent to the dead-letter topic, by source topic and error type.",
    ["service", "topic", "error"],
)
BATCH_SECONDS = Histogram(
    "flywheel_runtime_batch_seconds",
    "Wall time to process, produce and commit one batch.", ["service"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BATCH_RECORDS = Histogram(
    "flywheel_runtime_batch_records", "Input records per batch.", ["service"],
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
)
CONSUMER_LAG = Gauge(
    "flywheel_runtime_consumer_lag_records",
    "Records between the consumer's position and the end of the partition (read_committed).",
    ["service", "topic", "partition"],
)
TRANSACTIONS = Counter(
    "flywheel_runtime_transactions_total", "Kafka transactions by outcome.",
    ["service", "outcome"],
)
FOLLOWER_SKIPPED = Counter(
    "flywheel_follower_records_skipped_total",
    "Records a background follower could not take (malformed), skipped.", ["follower"],
)
CHECKPOINT_EVENTS_REFUSED = Counter(
    "flywheel_checkpoint_events_refused_total",
    "Events on `checkpoints` a reader dropped: malformed (invalid_event) or a decision "
    "without the gate's signature (unsigned).", ["reason"],
)
RECONNECTS = Counter(
    "flywheel_runtime_reconnects_total",
    "Kafka clients rebuilt in-process after a broker outage left them unusable.", ["service"],
)
READY = Gauge("flywheel_runtime_ready", "1 when connected and assigned partitions.", ["service"])


@functools.cache
def labelled(metric: Any, *values: str) -> Any:
    """``metric.labels(*values)``, remembered: the same child prometheus_client keeps, without
    its per-call label checks (some microseconds, on per-record paths). Not for a metric whose
    series are ever removed."""
    return metric.labels(*values)


class Tally:
    """What a batch adds to counters and histograms, handed to prometheus_client when the
    batch is done (:meth:`batch`): counter increments added up, a lock and a call per series
    and batch instead of per record. A batch that raises is not counted, neither its
    increments nor its observations (its outputs are aborted with its transaction, and the
    batch is processed again)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[Any, tuple[str, ...]], float] = {}
        self._observed: list[tuple[Any, tuple[str, ...], float]] = []

    def inc(self, metric: Any, *values: str, amount: float = 1.0) -> None:
        key = (metric, values)
        self._counts[key] = self._counts.get(key, 0.0) + amount

    def observe(self, metric: Any, *values: str, value: float) -> None:
        self._observed.append((metric, values, value))

    @contextmanager
    def batch(self) -> Iterator[None]:
        self._counts.clear()
        self._observed.clear()
        yield
        for (metric, values), amount in self._counts.items():
            labelled(metric, *values).inc(amount)
        for metric, values, value in self._observed:
            (labelled(metric, *values) if values else metric).observe(value)
        self._counts.clear()
        self._observed.clear()


class HealthServer:
    """Serves /metrics, /healthz and /readyz from a daemon thread.

    ``alive`` and ``ready`` are callables so the endpoint always reports the runtime's current
    state rather than a copy of it.
    """

    def __init__(
        self, host: str, port: int, *, alive: Callable[[], bool], ready: Callable[[], bool],
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self._alive, self._ready, self._registry = alive, ready, registry
        handler = self._handler()
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("serving /metrics, /healthz, /readyz on port %d", self.port)
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(outer._registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok = outer._alive()
                    self._send(200 if ok else 503, b"ok\n" if ok else b"dead\n")
                elif path == "/readyz":
                    ok = outer._ready()
                    self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
                else:
                    self._send(404, b"not found\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    # A scraper that timed out while a busy service (a gate evaluating, a
                    # trainer training) held the interpreter: nothing to answer, no traceback.
                    log.debug("http: the client left before the answer to %s", self.path)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("http: " + format, *args)

        return Handler
