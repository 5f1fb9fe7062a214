"""The process supervisor, with real child processes."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from services.up.supervisor import ProcessSpec, Supervisor


def _wait(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_process_that_dies_is_restarted_with_growing_backoff(tmp_path: Path) -> None:
    crash = ProcessSpec("crash", [sys.executable, "-c", "print('up'); raise SystemExit(3)"])
    sleeper = ProcessSpec("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    sup = Supervisor([crash, sleeper], tmp_path / "logs", initial_backoff=0.1,
                     max_backoff=0.4, healthy_after=30)
    sup.start()
    try:
        backoffs = []
        def restarted_thrice() -> bool:
            sup.poll()
            child = sup.children["crash"]
            if child.backoff and (not backoffs or backoffs[-1] != child.backoff):
                backoffs.append(child.backoff)
            return child.restarts >= 3
        assert _wait(restarted_thrice)
        assert backoffs[:3] == [0.1, 0.2, 0.4] and sup.children["crash"].last_exit == 3
        assert sup.children["sleeper"].state == "running"
        assert (tmp_path / "logs" / "crash.log").read_text().count("up") >= 3
    finally:
        codes = sup.stop()
    assert codes["sleeper"] is not None and codes["sleeper"] < 0  # ended by SIGTERM
    restarts = sup.children["crash"].restarts
    crash = sup.children["crash"]
    assert _wait(lambda: time.monotonic() > crash.next_start)  # past its back-off
    sup.poll()  # a stopped supervisor restarts nothing
    assert sup.children["crash"].restarts == restarts
    assert sup.children["sleeper"].proc is not None
    assert sup.children["sleeper"].proc.poll() is not None


def test_stop_kills_what_ignores_sigterm_after_the_grace_period(tmp_path: Path) -> None:
    stubborn = ProcessSpec("stubborn", [sys.executable, "-c",
                                        "import signal, time\n"
                                        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                        "print('ready', flush=True)\n"
                                        "time.sleep(60)"])
    sup = Supervisor([stubborn], tmp_path / "logs", grace=0.5)
    sup.start()
    assert _wait(lambda: "ready" in (tmp_path / "logs" / "stubborn.log").read_text())
    started = time.monotonic()
    codes = sup.stop()
    assert codes["stubborn"] == -9 and time.monotonic() - started < 5
