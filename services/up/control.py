"""Controlling a running ``flywheel up`` from outside: its state file (``<home>/up.json``),
``flywheel status`` and ``flywheel down``.

``up`` holds an exclusive lock on ``<home>/up.lock`` for as long as it lives; the kernel
releases it when the process dies, even by SIGKILL. The state file names every child's
process group (with its start time, so a reused pid is never taken for it), rewritten
atomically under that lock whenever the supervisor starts one. So ``down`` can tell a live
``up`` (locked: it is asked to stop, and stops its children) from a dead one whose children
and broker are orphans (unlocked: ``down`` stops them itself).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import time
from pathlib import Path
from typing import IO, Any

from services.cluster import local_broker as local_kafka
from services.common.errors import ConfigError
from services.common.signing import Verifier
from services.up import monitor
from services.up.profile import kafka_from_env
from services.up.view import Snapshot, read_checkpoints

STATE_FILE = "up.json"
LOCK_FILE = "up.lock"


class Owner:
    """The lock a running ``up`` holds on its home; taken at start, released at exit."""

    def __init__(self, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = (home / LOCK_FILE).open("a")
        for attempt in range(5):  # a probe (_owner_alive) holds it for an instant
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                time.sleep(0.05 * (attempt + 1))
        self._file.close()
        self._file = None
        raise ConfigError(f"a flywheel is already running from {home}; `flywheel status` "
                          "or `flywheel down`")

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock
            self._file = None


def _owner_alive(home: Path) -> bool:
    """Whether an ``up`` holds the home's lock."""
    path = home / LOCK_FILE
    if not path.is_file():
        return False
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def write_state(home: Path, **state: Any) -> None:
    """What ``flywheel status`` and ``flywheel down`` need: this process, ports, cluster."""
    state = {"pid": os.getpid(), "children": {}, **state, "home": str(home.resolve()),
             "started_at": time.time()}
    _write(home, state)


def record_child(home: Path, name: str, pid: int) -> None:
    """A child (the leader of its own process group) started or restarted: recorded before
    anything else can happen to it."""
    state = _read(home)
    if state is None:
        return
    state.setdefault("children", {})[name] = {"pgid": pid, "started": _start_time(pid)}
    _write(home, state)


def _write(home: Path, state: dict[str, Any]) -> None:
    tmp = home / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")
    os.replace(tmp, home / STATE_FILE)  # never seen half-written


def _read(home: Path) -> dict[str, Any] | None:
    path = home / STATE_FILE
    if not path.is_file():
        return None
    state: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return state


def clear_state(home: Path) -> None:
    (home / STATE_FILE).unlink(missing_ok=True)


def read_state(home: Path) -> dict[str, Any] | None:
    """The state of the ``up`` running from ``home``, or None if none runs."""
    state = _read(home)
    return state if state is not None and _owner_alive(home) else None


def orphans(home: Path) -> dict[str, int]:
    """Children (process groups) a dead ``up`` left running, by name; empty while an ``up``
    owns the home."""
    state = _read(home)
    if state is None or _owner_alive(home):
        return {}
    return orphans_of(state)


def orphans_of(state: dict[str, Any]) -> dict[str, int]:
    """The children recorded in ``state`` that still run (the same processes, by start
    time)."""
    return {name: c["pgid"] for name, c in state.get("children", {}).items()
            if _same_process(c["pgid"], c.get("started"))}


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    fields = _stat(pid)
    return int(fields[19]) if fields is not None else None


def _same_process(pid: int, started: int | None) -> bool:
    """Whether ``pid`` still runs and is the process started at ``started`` (a zombie that
    no one reaped yet does not run)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or another user's: not ours
        return False
    fields = _stat(pid)
    if fields is None:
        return started is None  # no /proc: trust the pid
    return fields[0] != "Z" and (started is None or int(fields[19]) == started)


def _group_alive(pgid: int) -> bool:
    """A process of the group still runs (zombies aside)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    if not Path("/proc/self/stat").exists():
        return True  # no /proc: the group is there
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat(int(entry.name))
        if fields is not None and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def status_snapshot(state: dict[str, Any]) -> Snapshot:
    """A running stack's snapshot from outside: its /metrics and the checkpoints topic."""
    # The state holds no secret: the password comes from the environment, as for up.
    verifier = Verifier.load(Path(state.get("public_key") or Path(state["home"]) / "keys"
                                  / "gate.pub"))
    versions = read_checkpoints(kafka_from_env(state["kafka"]), state["model_name"], verifier)
    ports = {k: int(v) for k, v in state["ports"].items()}
    first = Snapshot.take(ports, versions, Snapshot.empty())
    time.sleep(1.0)  # out/s: counters one second apart
    url = state.get("prometheus")
    return Snapshot.take(ports, versions, first,
                         alerts=monitor.alerts(url) if url else None)


def down(home: Path, timeout: float = 120.0) -> bool:
    """Stop the stack running from ``home``: SIGTERM to ``flywheel up``, which stops its
    children; or, if ``up`` is gone (killed), its orphaned children and the broker it
    started. False if nothing was running."""
    state = _read(home)
    if state is None:
        return False
    if _owner_alive(home):
        pid = int(state["pid"])
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _owner_alive(home):
                return True
            time.sleep(0.5)
        raise TimeoutError(f"flywheel up (pid {pid}) did not stop within {timeout:.0f} s")
    try:  # no up may start while what the dead one left is being stopped
        owner = Owner(home)
    except ConfigError:  # an up took the home meanwhile: it is the one to stop
        return down(home, timeout)
    try:
        _stop_orphans(home, _read(home) or state, timeout)
    finally:
        owner.release()
    return True


def _stop_orphans(home: Path, state: dict[str, Any], timeout: float) -> None:
    left = orphans_of(state)
    for pgid in left.values():  # services finish their batch in flight and commit
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_group_alive(g) for g in left.values()):
        time.sleep(0.5)
    for pgid in left.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    if state.get("started_broker"):
        local_kafka.stop(home / "kafka")
    clear_state(home)

