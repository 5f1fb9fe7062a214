"""Running the runtime under test: in a thread (in-process) or as a real service process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from services.common.config import ServiceSettings
from services.common.runtime import StreamRuntime

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
