"""Controlling a running ``flywheel up`` from outside: its state file (``<home>/up.json``),
``flywheel status`` and ``flywheel down``."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from services.common.config import KafkaSettings
from services.up import monitor
from services.up.view import Snapshot, read_checkpoints

STATE_FILE = "up.json"


def write_state(home: Path, **state: Any) -> None:
    """What ``flywheel status`` and ``flywheel down`` need: this process, ports, cluster."""
    state = {"pid": os.getpid(), **state, "home": str(home.resolve()),
             "started_at": time.time()}
    (home / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")


def clear_state(home: Path) -> None:
    (home / STATE_FILE).unlink(missing_ok=True)


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
    versions = read_checkpoints(KafkaSettings(**state["kafka"]), state["model_name"])
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
