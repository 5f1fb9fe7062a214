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
import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any, Protocol

from services.common.config import ServiceSettings
from services.common.errors import FlywheelError
from services.common.logs import setup_logging
from services.common.metrics import HealthServer
from services.common.runtime import StreamRuntime
from services.common.stage import Stage, StatefulStage

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
    runtime = StreamRuntime(settings, stage, input_topics)
    tune_gc()
    return serve_loop(settings, runtime)


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
