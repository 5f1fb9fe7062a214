"""A real single-node Apache Kafka broker (KRaft) for laptops, development and CI, without Docker.

- ``install``: Maven copies the jars pinned in ``deploy/kafka/pom.xml`` into a cache folder
  keyed by the pom's hash (``~/.cache/flywheel/kafka/<hash>/libs``); skipped when present.
- ``start``: renders ``deploy/kafka/server.properties`` into the data folder, formats KRaft
  storage on first use, starts ``kafka.Kafka`` detached, and returns once the broker answers a
  metadata request. Starting a broker that is already running from that folder is a no-op.
- ``start(sasl=(admin, password))``: the client listener is SASL_PLAINTEXT with SCRAM-SHA-512
  and ACLs are enforced (``deploy/kafka/sasl.properties``); ``admin`` is created at format time
  and is the only super user. Service principals and their ACLs are added over the admin API
  (``services.cluster.access``).
- ``stop``: SIGTERM (a clean shutdown flushes logs and releases the controller), SIGKILL only
  after a timeout.

Java 17+ and Maven must be on PATH. Heap: ``KAFKA_HEAP_OPTS`` as with Kafka's own scripts.

Over 300 lines: installing, formatting (plain or SASL), starting, probing and stopping one
broker, and the free-port helpers its callers need, are one lifecycle.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from string import Template
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from services.common.config import DEPLOY_DIR
from services.common.errors import BrokerError

log = logging.getLogger(__name__)

KAFKA_DIR = DEPLOY_DIR / "kafka"
POM = KAFKA_DIR / "pom.xml"
DEFAULT_HEAP = "-Xms256m -Xmx1g"


def cache_dir() -> Path:
    base = os.environ.get("FLYWHEEL_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(base) / "flywheel" if base else Path.home() / ".cache" / "flywheel"


def default_data_dir() -> Path:
    return Path(os.environ.get("FLYWHEEL_HOME", ".flywheel")) / "kafka"


def libs_dir(cache: Path | None = None) -> Path:
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:12]
    return (cache or cache_dir()) / "kafka" / digest / "libs"


def install(cache: Path | None = None) -> tuple[Path, bool]:
    """Copy the broker's jars into the cache. Returns (libs folder, whether anything ran)."""
    libs = libs_dir(cache)
    if (libs / ".complete").is_file():
        return libs, False
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError("Maven (mvn) is not on PATH; install it (Debian: apt-get install maven)")
    tmp = libs.with_name(f"libs.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
        f"-DoutputDirectory={tmp}", "-DincludeScope=runtime",
    ]
    log.info("resolving Kafka jars: %s", shlex.join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not any(tmp.glob("kafka_2.13-*.jar")):
        output = done.stdout[-4000:] + done.stderr[-4000:]
        raise BrokerError(f"mvn failed ({done.returncode}):\n{output}")
    (tmp / ".complete").write_text(POM.read_text(encoding="utf-8"), encoding="utf-8")
    shutil.rmtree(libs, ignore_errors=True)
    tmp.rename(libs)
    return libs, True


@dataclass
class LocalBroker:
    """A broker started from a data folder; its state is kept in ``<data_dir>/broker.json``."""

    data_dir: str
    pid: int
    port: int
    controller_port: int
    sasl_admin: str | None = None
    """The super user of a SASL broker (its password is never written here)."""

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def connection(self, password: str | None = None) -> dict[str, Any]:
        """librdkafka properties to reach this broker (as its admin, on a SASL broker)."""
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap}
        if self.sasl_admin is not None:
            conf |= _sasl_conf(self.sasl_admin, password)
        return conf


Credentials = tuple[str, str]
"""(username, password) of a SCRAM-SHA-512 principal."""


def _sasl_conf(user: str, password: str | None) -> dict[str, Any]:
    return {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": user, "sasl.password": password or ""}


def _check_credentials(user: str, password: str) -> None:
    """What the JAAS line and the SCRAM format argument can carry unescaped."""
    if not user or not re.fullmatch(r"[A-Za-z0-9._-]+", user):
        raise BrokerError(f"SASL admin name {user!r}: use letters, digits, '.', '_' or '-'")
    if len(password) < 8 or any(c in password for c in '"\\\n\r,=[]'):
        raise BrokerError("SASL admin password: at least 8 characters, none of "
                          "'\"', '\\', ',', '=', '[', ']' or a line break")


def status(data_dir: Path | None = None) -> LocalBroker | None:
    """The broker running from ``data_dir``, or None."""
    state = (data_dir or default_data_dir()) / "broker.json"
    if not state.is_file():
        return None
    broker = LocalBroker(**json.loads(state.read_text(encoding="utf-8")))
    return broker if _is_kafka(broker.pid) else None


def start(
    data_dir: Path | None = None, port: int = 9092, *, libs: Path | None = None,
    wait_seconds: float = 120.0, sasl: Credentials | None = None,
) -> tuple[LocalBroker, bool]:
    """Start a broker (or find the one running). Returns (broker, whether it was started now).

    ``sasl``: the admin's (username, password) of a SASL broker. A folder formatted with SASL
    is always started with it, so its ACLs are never bypassed by a plain start.
    """
    data = (data_dir or default_data_dir()).resolve()
    running = status(data)
    if running is not None:
        return running, False
    marker = data / "sasl-admin"
    if sasl is not None:
        _check_credentials(*sasl)
        if marker.is_file() and marker.read_text(encoding="utf-8") != sasl[0]:
            raise BrokerError(f"{data} was formatted with SASL admin "
                              f"{marker.read_text(encoding='utf-8')!r}, not {sasl[0]!r}")
    elif marker.is_file():
        raise BrokerError(f"{data} is a SASL broker: start it with its admin's credentials "
                          "(FLYWHEEL_KAFKA__SASL_USERNAME and FLYWHEEL_KAFKA__SASL_PASSWORD)")
    java = shutil.which("java")
    if java is None:
        raise BrokerError("java is not on PATH; Kafka needs Java 17 or newer")
    libs = libs or libs_dir()
    if not (libs / ".complete").is_file():
        raise BrokerError(f"Kafka jars not installed in {libs}; run `flywheel kafka install`")
    _require_free(port)
    controller_port = free_port()
    data.mkdir(parents=True, exist_ok=True)
    props = data / "server.properties"
    text = (KAFKA_DIR / "server.properties").read_text(encoding="utf-8")
    if sasl is not None:
        text += "\n" + (KAFKA_DIR / "sasl.properties").read_text(encoding="utf-8")
    # It holds the admin's password on a SASL broker: readable by its owner only.
    props.touch(mode=0o600)
    props.chmod(0o600)
    props.write_text(
        Template(text).substitute(
            port=port, controller_port=controller_port, log_dir=data / "logs",
            admin=sasl[0] if sasl else "", password=sasl[1] if sasl else "",
        ),
        encoding="utf-8",
    )
    log4j = KAFKA_DIR / "log4j2.properties"
    classpath = ["-cp", f"{libs}/*", f"-Dlog4j2.configurationFile={log4j}"]
    if not (data / "logs" / "meta.properties").is_file():
        cluster_id = _cluster_id()
        scram = ["--add-scram", f"SCRAM-SHA-512=[name={sasl[0]},password={sasl[1]}]"] \
            if sasl else []
        fmt = subprocess.run(
            [java, *classpath, "kafka.tools.StorageTool", "format", "-t", cluster_id,
             "-c", str(props), *scram],
            capture_output=True, text=True, check=False,
        )
        if fmt.returncode != 0:
            output = fmt.stdout[-3000:] + fmt.stderr[-3000:]
            if sasl:
                output = output.replace(sasl[1], "**********")
            raise BrokerError(f"formatting KRaft storage failed:\n{output}")
        if sasl:
            marker.write_text(sasl[0], encoding="utf-8")
    heap = shlex.split(os.environ.get("KAFKA_HEAP_OPTS", DEFAULT_HEAP))
    logfile = data / "broker.log"
    with logfile.open("ab") as out:
        proc = subprocess.Popen(
            [java, *heap, "-XX:+UseG1GC", "-Djava.awt.headless=true", *classpath,
             "kafka.Kafka", str(props)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives the CLI; Ctrl-C in the terminal does not reach it
        )
    broker = LocalBroker(str(data), proc.pid, port, controller_port,
                         sasl[0] if sasl else None)
    (data / "broker.json").write_text(json.dumps(asdict(broker)), encoding="utf-8")
    deadline = time.monotonic() + wait_seconds
    while not _answers(broker.connection(sasl[1] if sasl else None)):
        if proc.poll() is not None:
            raise BrokerError(f"broker exited with {proc.returncode}; log tail:\n{_tail(logfile)}")
        if time.monotonic() > deadline:
            stop(data)
            raise BrokerError(
                f"broker did not answer within {wait_seconds:.0f} s:\n{_tail(logfile)}"
            )
        time.sleep(0.25)
    return broker, True


def stop(data_dir: Path | None = None, timeout: float = 60.0) -> bool:
    """Stop the broker running from ``data_dir``. Returns whether one was running."""
    broker = status(data_dir)
    if broker is None:
        return False
    os.kill(broker.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _is_kafka(broker.pid):
        if time.monotonic() > deadline:
            log.warning("broker %d did not stop in %.0f s; killing it", broker.pid, timeout)
            os.kill(broker.pid, signal.SIGKILL)
        time.sleep(0.2)
    return True


def _cluster_id() -> str:
    """A KRaft cluster id: a random UUID in URL-safe base64, never starting with '-' (the
    storage tool would read it as an option; Kafka's own Uuid.randomUuid() avoids it too)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


@contextlib.contextmanager
def temporary(sasl: Credentials | None = None) -> Iterator[LocalBroker]:
    """A throwaway broker (jars installed if missing) in a temporary folder on a free port,
    stopped on exit: for test sessions and benchmarks."""
    install()
    with tempfile.TemporaryDirectory(prefix="flywheel-kafka-") as data:
        broker, _ = start(Path(data), free_port(), sasl=sasl)
        try:
            yield broker
        finally:
            stop(Path(data))


def _answers(client_config: dict[str, Any]) -> bool:
    admin = AdminClient(client_config | {"logger": _QUIET})
    try:
        md = admin.list_topics(timeout=1.0)
    except KafkaException:
        return False
    return bool(md.brokers)


def _is_kafka(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if b"kafka.Kafka" not in cmdline:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # exited in between
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is not running


def _require_free(port: int) -> None:
    if not bindable(port):
        raise BrokerError(f"port {port} is in use; choose another with --port")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a process about to start (see
    :func:`free_ports`)."""
    return free_ports(1)


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive TCP ports free on 127.0.0.1 right now, below the
    kernel's ephemeral range. A port from that range (what binding port 0 gives) can be taken
    by any outgoing connection's local end in the seconds before the process meant to bind it
    has started: seen as a service of the end-to-end test failing with "Address already in
    use" while the other services connected to the broker."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(1000):
        first = random.randrange(10_000, low - count)
        if all(bindable(port) for port in range(first, first + count)):
            return first
    raise OSError(f"no {count} consecutive free ports between 10000 and {low}")


def bindable(port: int) -> bool:
    """Whether a server (they set SO_REUSEADDR) could listen on ``port`` now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


_QUIET = logging.getLogger("flywheel.librdkafka.probe")
_QUIET.propagate = False
_QUIET.addHandler(logging.NullHandler())
