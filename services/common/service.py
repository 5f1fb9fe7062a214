"""Running a stage as a service: the top-level error boundary every entry point goes through.

``serve`` logs the resolved config (secrets redacted), starts the health endpoint, turns
SIGTERM/SIGINT into a graceful stop, runs the runtime, and returns the process exit code:
0 after a requested stop (a bounded run: after reaching its end), 130 for a bounded run stopped
before its end, 1 after a fatal error (logged with its reason; an unexpected exception is
logged with its traceback).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, Protocol

from confluent_kafka import KafkaException

from services.common.config import ServiceSettings
from services.common.errors import (
    AccessDenied,
    BrokerUnreachable,
    FatalRuntimeError,
    FlywheelError,
)
from services.common.logs import setup_logging
from services.common.metrics import RECONNECTS, HealthServer
from services.common.runtime import StreamRuntime
from services.common.stage import Stage, StatefulStage
from services.common.transactions import WEDGED

log = logging.getLogger(__name__)

INTERRUPTED = 130
"""Exit code of a bounded run (a replay) stopped before its end, as after Ctrl-C."""


class Loop(Protocol):
    """What ``serve_loop`` runs: a blocking ``run`` that returns after ``stop``."""

    @property
    def alive(self) -> bool: ...

    @property
    def ready(self) -> bool: ...

    def run(self) -> None: ...

    def stop(self) -> None: ...


def serve(settings: ServiceSettings, stage: Stage[Any] | StatefulStage[Any],
          input_topics: Sequence[str]) -> int:
    """Run a stream stage as a service (the common case)."""
    setup_logging(settings.log_level)
    log.info("config: %s", json.dumps(settings.redacted(), sort_keys=True))
    state = stage.state if isinstance(stage, StatefulStage) else None

    def runtime() -> StreamRuntime:
        if state is not None:  # what is owned again is restored from the changelog
            state.drop(state.owned())
        return StreamRuntime(settings, stage, input_topics)

    loop = Reconnecting(settings, runtime)
    tune_gc()
    try:
        return serve_loop(settings, loop)
    finally:
        if state is not None:  # after every rebuild of the loop: they share the stage
            state.close()


class Reconnecting:
    """A loop whose Kafka clients are rebuilt in this process when a broker outage broke them.

    After an outage longer than the session or transaction timeout, the clients can be left
    unusable: a static member fenced by its own earlier registration (librdkafka #3437), a
    producer whose open transaction the broker aborted, a commit whose group generation is
    gone. Each ends the loop with a fatal error. If the broker was seen unreachable (by this
    loop or an earlier one of this process) within ``window`` before it, a new loop (new
    consumer and producer; the new producer's ``init_transactions`` aborts what the old one
    left open) takes over the same stage, so a loaded model stays loaded and the process is
    not restarted; uncommitted work is processed again, as after a restart. A failure with
    no outage seen (a missing topic, a denied ACL), a broker away for longer than
    ``broker_down_seconds``, or more than ``MAX_REBUILDS`` rebuilds within
    ``REBUILDS_WINDOW_SECONDS`` ends the service as before.
    """

    MAX_REBUILDS = 5
    REBUILDS_WINDOW_SECONDS = 1800.0

    def __init__(self, settings: ServiceSettings, make: Callable[[], Any]) -> None:
        self.settings, self.make = settings, make
        self.current = make()
        self.rebuilt_at: list[float] = []
        self.outage_at: float | None = None
        """The last time any loop of this process saw the broker unreachable."""
        self._stop = threading.Event()
        rt = settings.runtime
        self.window = max(300.0, 2 * rt.transaction_timeout_ms / 1000)

    @property
    def alive(self) -> bool:
        current = self.current  # None while rebuilding (read by the health thread)
        return current is not None and bool(current.alive)

    @property
    def ready(self) -> bool:
        current = self.current
        return current is not None and bool(current.ready)

    def stop(self) -> None:
        self._stop.set()
        current = self.current
        if current is not None:
            current.stop()

    def __getattr__(self, name: str) -> Any:  # finished, and whatever else callers read
        if name == "current":  # not built yet
            raise AttributeError(name)
        return getattr(self.current, name)

    def run(self) -> None:
        while True:
            try:
                self.current.run()
                return
            except (FatalRuntimeError, KafkaException) as exc:
                if not self._rebuildable(exc):
                    raise
                self.rebuilt_at.append(time.monotonic())
                RECONNECTS.labels(self.settings.service).inc()
                log.warning("Kafka clients lost after a broker outage (%s); rebuilding them "
                            "(%d in %.0f s)", exc, len(self.rebuilt_at),
                            self.REBUILDS_WINDOW_SECONDS)
            self.current = None
            _collect_frozen()  # the old loop's clients and model go before new ones load
            self.current = self.make()
            if self._stop.is_set():
                return

    def _rebuildable(self, exc: BaseException) -> bool:
        now = time.monotonic()
        health = getattr(self.current, "health", None)
        seen = health.last_outage if health is not None else None
        if seen is not None:
            self.outage_at = max(self.outage_at or seen, seen)
        self.rebuilt_at = [t for t in self.rebuilt_at
                           if now - t <= self.REBUILDS_WINDOW_SECONDS]
        return (not self._stop.is_set()
                and not isinstance(exc, BrokerUnreachable | AccessDenied)
                and len(self.rebuilt_at) < self.MAX_REBUILDS
                and self.outage_at is not None and now - self.outage_at <= self.window)


def _collect_frozen() -> None:
    """A full collection that reaches what :func:`tune_gc` froze (the loops are reference
    cycles), then the freeze again."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def serve_loop(settings: ServiceSettings, loop: Loop) -> int:
    """Health endpoint, signals and the top-level error boundary around ``loop.run()``."""
    setup_logging(settings.log_level)
    health = None
    if settings.metrics.enabled:
        health = HealthServer(
            settings.metrics.host, settings.metrics.port,
            alive=lambda: loop.alive, ready=lambda: loop.ready,
        ).start()
    restore = _stop_on_signals(loop)
    try:
        loop.run()
    except FlywheelError as exc:
        log.error("%s stopped: %s", settings.service, exc)
        return 1
    except Exception:
        log.exception("%s stopped by an unexpected error", settings.service)
        return 1
    finally:
        restore()
        if health is not None:
            health.close()
    bounded = getattr(settings.runtime, "bounds", None) is not None
    if bounded and not getattr(loop, "finished", True):
        log.info("%s stopped before the end of its bounds; run it again to resume",
                 settings.service)
        return INTERRUPTED
    return 0


def exit_now_if_wedged(code: int) -> None:
    """A process holding a wedged producer (:mod:`services.common.transactions`) cannot exit
    normally: its stuck call's thread would be joined, and destroying the producer could
    block. It leaves at once, logs flushed. Called by the CLI when its command returned."""
    if WEDGED:
        log.error("exiting without cleanup: %d wedged producer(s)", len(WEDGED))
        logging.shutdown()
        os._exit(code)


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a streaming loop.

    Every batch builds thousands of short-lived pydantic objects; with CPython's defaults the
    collector runs every 700 allocations and its full passes walk every module object loaded
    at start. Freezing what exists after start-up moves it out of the collector's way, and a
    higher first threshold makes collections rarer. Measured by ``bench runtime`` (see
    docs/architecture.md); reference cycles are still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _stop_on_signals(runtime: Loop) -> Any:
    """SIGTERM and SIGINT ask the loop to stop; returns a function restoring the handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, finishing the batch in flight", signal.Signals(signum).name)
        runtime.stop()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore
