"""Running the runtime under test: in a thread (in-process) or as a real service process, and
killing such a process mid-stream."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from services.common.config import ServiceSettings
from services.common.runtime import StreamRuntime
from tests.kafka import Broker, wait_until
from tests.signing import service_env

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
    """Runs ``runtime.run()`` in a thread; ``error`` holds what it raised, if anything, and
    leaving the ``with`` block raises it (unless the block itself raised)."""

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

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.stop(raising=kind is None)

    def stop(self, *, raising: bool = True) -> None:
        """Stop the runtime and wait for its thread; with ``raising``, raise what it raised.
        Stopping twice (by hand, then by leaving the ``with`` block) is harmless."""
        self.runtime.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "runtime did not stop within 30 s"
        if raising and self.error is not None:
            raise AssertionError(f"the runtime raised: {self.error!r}") from self.error


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
    env: dict[str, str] | None = None, verb: str = "run", group: bool = False,
    launcher: list[str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``python -m services <verb> <command...>`` as its own process; with ``group``,
    leading a process group of its own, so that :func:`stopped` and :func:`kill_group` reach
    the processes it starts (a replay's workers) too. ``launcher``: options of ``python -m
    torch.distributed.run`` (torchrun), which then starts the service's ranks."""
    full = service_env()
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
            [sys.executable, *(["-m", "torch.distributed.run", *launcher] if launcher
                               else []), "-m", "services", verb, *command], cwd=REPO, env=full,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=group,
        )


@contextmanager
def stopped(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    """``proc`` (its whole group, if it leads one) stopped (SIGSTOP) for the block, so what
    it has written can be read while it cannot change it; resumed (SIGCONT) after the block
    unless it ended in it."""
    send = os.killpg if os.getpgid(proc.pid) == proc.pid else os.kill
    send(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        if proc.poll() is None:
            send(proc.pid, signal.SIGCONT)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group ``proc`` leads (started with ``group=True``)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def frozen_mid_transaction(
    kafka: Broker, proc: subprocess.Popen[bytes], *, group: str, inputs: list[str],
    outputs: list[str], more: Callable[[], bool], at_least: int = 1, timeout: float = 180,
) -> Iterator[int]:
    """``proc`` stopped for the block inside a transaction, after it has committed at least
    one: records of the open transaction are in ``outputs``, and at least ``at_least`` records
    of ``inputs`` are left after its group's committed offsets (yielded). The block kills the
    process, or signals it; it is resumed after the block unless it ended.

    A signal timed against a stream races it: on a fast machine the stream may be over, on a
    slow one not begun. So this waits until an open transaction shows on ``outputs``, stops
    the process, and looks twice at what only it can change (its outputs' end offsets, read
    committed and uncommitted, and its group's committed offsets). A request it sent just
    before it stopped completes within the broker's request time, far less than the half
    second a look takes, and shows as a difference; then, or if the transaction was committed
    meanwhile, the process is resumed and caught at a later one. When its input runs short,
    ``more()`` gives it more (False: there is none, and the test fails).
    """
    deadline = time.monotonic() + timeout

    def look() -> tuple[dict[str, Any], dict[str, dict[int, int]]]:
        ends = {t: (kafka.end_offsets(t, "read_uncommitted"), kafka.end_offsets(t))
                for t in outputs}
        return ends, {t: kafka.committed(group, t) for t in inputs}

    def opened(ends: dict[str, Any]) -> bool:
        return any(uncommitted != committed for uncommitted, committed in ends.values())

    def left(offsets: dict[str, dict[int, int]]) -> int:
        return sum(len(kafka.read_all(t, start=offsets[t])) for t in inputs)

    def moment() -> str | None:
        if proc.poll() is not None:
            return "exited"
        ends, offsets = look()
        if not any(sum(o.values()) for o in offsets.values()):
            return None  # no transaction committed yet
        if opened(ends):  # before the slower count of what is left
            return "open"
        return "short" if left(offsets) < at_least else None

    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{group}: not caught in a transaction in {timeout:.0f} s"
        seen = wait_until(moment, remaining, f"{group} to open a transaction")
        assert seen != "exited", f"{group}: the process exited ({proc.returncode})"
        if seen == "short":
            assert more(), f"{group}: never caught in a transaction with its input to hand"
            continue
        with stopped(proc):
            first = look()
            n = left(first[1])
            if opened(first[0]) and n >= at_least and look() == first:
                yield n
                return


def kill_mid_transaction(
    kafka: Broker, proc: subprocess.Popen[bytes], *, group: str, inputs: list[str],
    outputs: list[str], more: Callable[[], bool], timeout: float = 180,
) -> int:
    """SIGKILL ``proc`` inside a transaction (see :func:`frozen_mid_transaction`); returns the
    input records it left uncommitted."""
    with frozen_mid_transaction(kafka, proc, group=group, inputs=inputs, outputs=outputs,
                                more=more, timeout=timeout) as left:
        proc.kill()  # a stopped process takes SIGKILL
        proc.wait(30)
    return left


class Feed:
    """Records into a topic a chunk at a time, so a process under test has more input to come
    until the test says so."""

    def __init__(self, kafka: Broker, topic: str, records: list[tuple[bytes, bytes]],
                 chunk: int) -> None:
        self.kafka, self.topic, self.records, self.chunk = kafka, topic, records, chunk
        self.sent = 0

    def more(self, chunks: int = 1) -> bool:
        """Produce the next ``chunks`` chunks; False if every record was produced already."""
        part = self.records[self.sent:self.sent + chunks * self.chunk]
        self.kafka.produce(self.topic, part)
        self.sent += len(part)
        return bool(part)

    def rest(self) -> None:
        while self.more():
            pass


def ready(port: int) -> bool:
    """Whether the service on ``port`` answers /readyz with 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextmanager
def http_server(folder: Path, failing: set[str] | None = None
                ) -> Iterator[tuple[str, list[str]]]:
    """``folder`` served read-only over HTTP on localhost (the standard library's file
    server): its base URL, and the paths requested so far. A path in ``failing`` (which the
    caller may change while it runs) is answered 503."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    requested: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            requested.append(self.path)
            if self.path in (failing or ()):
                self.send_error(503, "unavailable")
                return
            super().do_GET()

        def do_HEAD(self) -> None:
            if self.path in (failing or ()):
                self.send_error(503, "unavailable")
                return
            super().do_HEAD()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()


def torchrun_ranks(pid: int) -> dict[int, int]:
    """The pids of the ranks torchrun ``pid`` started, by rank (RANK in their environment,
    read from /proc: not through the code under test)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != pid:
                continue
            env = dict(kv.split("=", 1) for kv in (stat.parent / "environ").read_bytes()
                       .decode(errors="replace").split("\0") if "=" in kv)
            if "RANK" in env:
                found[int(env["RANK"])] = int(stat.parent.name)
    return found
