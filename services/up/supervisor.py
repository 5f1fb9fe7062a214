"""Supervised processes: start, watch, restart with back-off, stop cleanly.

Each service of a local flywheel runs as its own process (``python -m services run ...``),
as it would in a cluster, with its output appended to ``<logs>/<name>.log``. A process that
exits while the supervisor is running is restarted after a back-off that doubles with every
quick failure (``initial_backoff`` up to ``max_backoff``) and resets once a run has lasted
``healthy_after`` seconds. :meth:`Supervisor.stop` sends SIGTERM to every process (services
finish their batch in flight and commit), waits ``grace`` seconds, then SIGKILLs what is left.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class ProcessSpec:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    """On top of this process's environment."""
    hide: tuple[str, ...] = ()
    """Variables of this process's environment the child does not inherit (secrets)."""


@dataclass
class Supervised:
    spec: ProcessSpec
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = 0.0
    next_start: float = 0.0
    last_exit: int | None = None

    @property
    def state(self) -> str:
        if self.proc is not None and self.proc.poll() is None:
            return "running"
        return "backoff" if self.next_start > time.monotonic() else "stopped"


class Supervisor:
    def __init__(self, specs: list[ProcessSpec], logs: Path, *, initial_backoff: float = 1.0,
                 max_backoff: float = 30.0, healthy_after: float = 30.0,
                 grace: float = 30.0,
                 on_spawn: Callable[[str, int], None] | None = None) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"process names must be unique: {names}")
        self.children = {s.name: Supervised(s) for s in specs}
        self.logs = logs
        self.initial_backoff, self.max_backoff = initial_backoff, max_backoff
        self.healthy_after, self.grace = healthy_after, grace
        self.on_spawn = on_spawn
        """Told (name, pid) of every process started: each leads its own process group."""
        self.running = False

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.running = True
        for child in self.children.values():
            self._spawn(child)

    def poll(self) -> None:
        """Restart what exited, when its back-off has passed. Call it regularly."""
        if not self.running:
            return
        now = time.monotonic()
        for child in self.children.values():
            proc = child.proc
            if proc is not None and proc.poll() is not None:
                child.last_exit = proc.returncode
                lived = now - child.started_at
                child.backoff = (self.initial_backoff if lived >= self.healthy_after
                                 or child.backoff == 0
                                 else min(self.max_backoff, child.backoff * 2))
                child.next_start = now + child.backoff
                child.proc = None
                log.warning("%s exited with %s after %.1f s; restarting in %.1f s",
                            child.spec.name, proc.returncode, lived, child.backoff)
            if child.proc is None and now >= child.next_start:
                child.restarts += 1
                self._spawn(child)

    def stop(self) -> dict[str, int | None]:
        """SIGTERM all, wait up to ``grace``, SIGKILL the rest; exit codes by name."""
        self.running = False
        for child in self.children.values():
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        codes: dict[str, int | None] = {}
        for name, child in self.children.items():
            proc = child.proc
            if proc is None:
                codes[name] = child.last_exit
                continue
            try:
                codes[name] = proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", name, self.grace)
                proc.kill()
                codes[name] = proc.wait(10)
        return codes

    def _spawn(self, child: Supervised) -> None:
        spec = child.spec
        with (self.logs / f"{spec.name}.log").open("ab") as out:
            child.proc = subprocess.Popen(
                spec.argv, env={**{k: v for k, v in os.environ.items() if k not in spec.hide},
                                **spec.env}, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        child.started_at = time.monotonic()
        log.info("started %s (pid %d)", spec.name, child.proc.pid)
        if self.on_spawn is not None:
            self.on_spawn(spec.name, child.proc.pid)
