"""Running the runtime under test: in a thread (in-process) or as a real service process, and
killing such a process mid-stream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.common.config import ServiceSettings
from services.common.runtime import StreamRuntime
from tests.kafka import Broker, wait_until

REPO = Path(__file__).resolve().parents[2]


def settings(
    bootstrap: str, service: str, *, prefix: str = "flywheel.", **runtime: Any
) -> ServiceSettings:
    return ServiceSettings(
        service=service, instance_id="i0",
        kafka={"bootstrap_servers": bootstrap, "topic_prefix": prefix},
        runtime={"lag_interval_seconds": 0.2, **runtime},
        metrics={"enabled": False},
    )


class InThread:
    """Runs ``runtime.run()`` in a thread; ``error`` holds what it raised, if anything."""

    def __init__(self, runtime: StreamRuntime) -> None:
        self.runtime = runtime
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.runtime.run()
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> InThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.runtime.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "runtime did not stop within 30 s"


def spawn_relay(
    bootstrap: str, *, service: str, prefix: str, inputs: list[str], output: str,
    log: Path, **runtime: Any,
) -> subprocess.Popen[bytes]:
    """Start ``python -m services run relay`` as its own process, configured by environment."""
    env = {
        "FLYWHEEL_SERVICE": service,
        "FLYWHEEL_INPUT_TOPICS": json.dumps(inputs),
        "FLYWHEEL_OUTPUT_TOPIC": output,
        "FLYWHEEL_MESSAGE_TYPE": "Task",
    } | {f"FLYWHEEL_RUNTIME__{k.upper()}": str(v) for k, v in runtime.items()}
    return spawn_service(bootstrap, ["relay"], prefix=prefix, instance="relay-0", log=log,
                         env=env)


def spawn_service(
    bootstrap: str, command: list[str], *, prefix: str, instance: str, log: Path,
    env: dict[str, str] | None = None, verb: str = "run",
) -> subprocess.Popen[bytes]:
    """Start ``python -m services <verb> <command...>`` as its own process."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    full |= {
        "FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "FLYWHEEL_KAFKA__TOPIC_PREFIX": prefix,
        "FLYWHEEL_INSTANCE_ID": instance,
        "FLYWHEEL_METRICS__PORT": "0",
        "FLYWHEEL_RUNTIME__LAG_INTERVAL_SECONDS": "0.5",
        **(env or {}),
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services", verb, *command], cwd=REPO, env=full,
            stdout=out, stderr=subprocess.STDOUT,
        )


def freeze_mid_transaction(
    kafka: Broker, proc: subprocess.Popen[bytes], *, group: str, inputs: list[str],
    outputs: list[str], more: Callable[[], bool], at_least: int = 1, timeout: float = 180,
) -> int:
    """Stop ``proc`` (SIGSTOP) inside a transaction: records of it are in ``outputs``, not yet
    committed, and at least ``at_least`` records of ``inputs`` are left after its group's
    committed offsets. Returns how many are left. The caller kills the process, or signals it
    and sends SIGCONT.

    A signal timed against a stream races it: on a fast machine the stream may be over, on a
    slow one not begun. So this waits until an open transaction shows on ``outputs``, freezes
    the process and looks again, twice, while nothing of its own can move. If the transaction
    was committed meanwhile the process is resumed and caught at a later one; when its input runs
    short, ``more()`` gives it more (False: there is none, and the test fails).
    """
    deadline = time.monotonic() + timeout

    def opened() -> bool:
        return any(kafka.end_offsets(t, "read_uncommitted") != kafka.end_offsets(t)
                   for t in outputs)

    def left() -> int:
        return sum(kafka.left(group, t) for t in inputs)

    def moment() -> str | None:
        if proc.poll() is not None:
            return "exited"
        if opened():
            return "open"
        return "short" if left() < at_least else None

    while True:
        seen = wait_until(moment, max(1.0, deadline - time.monotonic()),
                          f"{group} to open a transaction")
        assert seen != "exited", f"{group}: the process exited ({proc.returncode})"
        if seen == "open":
            os.kill(proc.pid, signal.SIGSTOP)
            # Looked at twice: a commit already on its way to the broker when the process
            # stopped would complete between the two and show as a difference.
            now = (opened(), left())
            if now[0] and now[1] >= at_least and (opened(), left()) == now:
                return now[1]
            os.kill(proc.pid, signal.SIGCONT)
        if left() < at_least:
            assert more(), f"{group}: never caught in a transaction with its input to hand"


def kill_mid_transaction(
    kafka: Broker, proc: subprocess.Popen[bytes], *, group: str, inputs: list[str],
    outputs: list[str], more: Callable[[], bool], timeout: float = 180,
) -> int:
    """SIGKILL ``proc`` inside a transaction (see :func:`freeze_mid_transaction`); returns the
    input records it left uncommitted."""
    left = freeze_mid_transaction(kafka, proc, group=group, inputs=inputs, outputs=outputs,
                                  more=more, timeout=timeout)
    proc.kill()
    proc.wait(30)
    return left


class Feed:
    """Records into a topic a chunk at a time, so a process under test has more input to come
    until the test says so."""

    def __init__(self, kafka: Broker, topic: str, records: list[tuple[bytes, bytes]],
                 chunk: int) -> None:
        self.kafka, self.topic, self.records, self.chunk = kafka, topic, records, chunk
        self.sent = 0

    def more(self) -> bool:
        """Produce the next chunk; False if every record was produced already."""
        part = self.records[self.sent:self.sent + self.chunk]
        self.kafka.produce(self.topic, part)
        self.sent += len(part)
        return bool(part)

    def rest(self) -> None:
        while self.more():
            pass
