"""A Docker engine and the images docker-compose.yml runs, on a machine without a registry.

- :func:`engine`: the running Docker engine, or ``dockerd`` started (and stopped after) when
  none runs. ``tests/tools.sh`` installs Debian's docker.io, docker-compose and mmdebstrap.
- :func:`base_images`: ``python:3.11-slim`` (the Dockerfile's base) when it is here or can be
  pulled; otherwise a stand-in built with ``mmdebstrap`` from Debian's packages (its python3
  is 3.11) with a virtualenv on the PATH, as the official image has pip's. This machine's CA
  bundle goes into the stand-in, never into deploy/Dockerfile: HTTPS (pip) leaves through an
  intercepting proxy here. A second base, Debian's JRE, carries the Kafka and Prometheus
  stand-ins. Each root file system is cached as a tarball keyed by its inputs.
- :func:`third_party_images`: the stand-ins for apache/kafka (the jars ``flywheel kafka
  install`` resolves) and prom/prometheus (the binary of Debian's package), which
  ``compose.test.yml`` names.
- :class:`WheelServer`: the CPU torch wheel of ``../shared/wheels`` as a package index on
  127.0.0.1, for the model image's ``TORCH_INDEX`` (its build runs on the host network).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from services.cluster import local_broker

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BASE = "python:3.11-slim"
JRE = "flywheel-test/jre:bookworm"
KAFKA = "flywheel-test/kafka:4.4.0"
PROMETHEUS = "flywheel-test/prometheus:debian"
MIRROR = "http://deb.debian.org/debian"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
KEY_LABEL = "io.dataflywheel.test.key"

# The root file systems of the stand-in bases: mmdebstrap's arguments (after the suite).
ROOTFS = {
    BASE: ["--variant=minbase", "--include=python3,python3-venv,ca-certificates",
           "--customize-hook=chroot \"$1\" python3 -m venv /usr/local/python",
           "--customize-hook=chroot \"$1\" /usr/local/python/bin/pip --version"],
    JRE: ["--variant=minbase", "--include=openjdk-17-jre-headless,wget,ca-certificates"],
}
ENV = {BASE: ["PATH=/usr/local/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
              "/sbin:/bin", "LANG=C.UTF-8"],
       JRE: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "LANG=C.UTF-8"]}


def run(*args: str, timeout: float = 600, check: bool = True, **kwargs: object
        ) -> subprocess.CompletedProcess[str]:
    """A command, its output kept; a failure names the command and its last output."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False,
                          **kwargs)  # type: ignore[call-overload]
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args[:6])} ... exited {done.returncode}:\n"
                             f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


def docker(*args: str, timeout: float = 600, check: bool = True
           ) -> subprocess.CompletedProcess[str]:
    return run("docker", *args, timeout=timeout, check=check)


def running() -> bool:
    return docker("info", timeout=30, check=False).returncode == 0


@contextlib.contextmanager
def engine(log: Path) -> Iterator[bool]:
    """A Docker engine for the block; yields whether this call started ``dockerd`` (then
    stopped, with what it started, when the block ends, whatever happens in it)."""
    if running():
        yield False
        return
    if shutil.which("dockerd") is None:
        raise AssertionError("dockerd is not installed: `make test` installs Debian's docker.io "
                             "(tests/tools.sh); else install Docker")
    if os.geteuid() != 0:
        raise AssertionError("no Docker engine runs and starting one needs root")
    with log.open("ab") as out:
        proc = subprocess.Popen(["dockerd", "--pidfile", str(log.with_suffix(".pid"))],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not running():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"dockerd did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)  # polling the engine's own answer, not a guess at its start
        yield True
    finally:
        proc.send_signal(signal.SIGTERM)  # dockerd stops its containers and containerd
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cache_dir() -> Path:
    folder = local_broker.cache_dir() / "containers"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _key(image: str) -> str:
    """What the image's root file system is made of: mmdebstrap's arguments, its version and
    the CA bundle copied in."""
    h = hashlib.sha256(json.dumps([image, ROOTFS[image], ENV[image], MIRROR]).encode())
    h.update(run("mmdebstrap", "--version").stdout.encode())
    if image == BASE and CA_BUNDLE.is_file():
        h.update(CA_BUNDLE.read_bytes())
    return h.hexdigest()[:16]


def _label(image: str) -> str | None:
    done = docker("image", "inspect", "--format",
                  "{{ index .Config.Labels \"" + KEY_LABEL + "\" }}", image, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


@dataclass
class Built:
    image: str
    how: str  # "present", "pulled", "cached tarball", "mmdebstrap"
    seconds: float


def base_image(image: str, pull: bool) -> Built:
    """``image`` ready in the engine: present, pulled (the official one), or the stand-in."""
    started = time.monotonic()
    key = _key(image)
    label = _label(image)
    if label is not None and (label == key or label == ""):  # "": the real image
        return Built(image, "present", time.monotonic() - started)
    if label is None and pull and docker("pull", image, timeout=600,
                                         check=False).returncode == 0:
        return Built(image, "pulled", time.monotonic() - started)
    tarball = cache_dir() / f"{image.replace('/', '_').replace(':', '_')}-{key}.tar"
    how = "cached tarball"
    if not tarball.is_file():
        how = "mmdebstrap"
        if shutil.which("mmdebstrap") is None:
            raise AssertionError(f"{image} cannot be pulled and mmdebstrap is not installed "
                                 "(tests/tools.sh installs it)")
        partial = tarball.with_name(f"partial-{os.getpid()}-{tarball.name}")
        hooks = []
        if image == BASE and CA_BUNDLE.is_file():  # this machine's trust, the test's only
            hooks = [f"--customize-hook=copy-in {CA_BUNDLE} /etc/ssl/certs",
                     "--customize-hook=printf '[global]\\ncert = /etc/ssl/certs/"
                     "ca-certificates.crt\\n' > \"$1/etc/pip.conf\""]
        run("mmdebstrap", *ROOTFS[image], *hooks, "bookworm", str(partial), MIRROR,
            timeout=900)
        partial.rename(tarball)
        for old in tarball.parent.glob(tarball.name.rsplit("-", 1)[0] + "-*.tar"):
            if old != tarball:  # an earlier key's
                old.unlink()
    changes = [f"--change=ENV {e}" for e in ENV[image]] + [
        f"--change=LABEL {KEY_LABEL}={key}"]
    docker("import", *changes, str(tarball), image, timeout=600)
    return Built(image, how, time.monotonic() - started)


def base_images() -> list[Built]:
    """Both bases, built at once: the Dockerfile's (pulled if it can be) and the JRE."""
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(base_image, BASE, True), pool.submit(base_image, JRE, False)]
        return [j.result() for j in jobs]


def third_party_images(work: Path) -> list[Built]:
    """The Kafka and Prometheus stand-ins (``compose.test.yml`` names them)."""
    libs, _ = local_broker.install()
    out = []
    kafka = work / "kafka-context"
    shutil.copytree(HERE / "kafka", kafka)
    shutil.copytree(libs, kafka / "libs", ignore=shutil.ignore_patterns(".complete"))
    shutil.copy(local_broker.KAFKA_DIR / "log4j2.properties", kafka)
    prometheus = work / "prometheus-context"
    shutil.copytree(HERE / "prometheus", prometheus)
    program = shutil.which("prometheus")
    if program is None:
        raise AssertionError("prometheus is not installed (tests/tools.sh installs it)")
    shutil.copy(program, prometheus / "prometheus")
    for image, context in ((KAFKA, kafka), (PROMETHEUS, prometheus)):
        started = time.monotonic()
        build(context, image)
        out.append(Built(image, "docker build", time.monotonic() - started))
    return out


def build(context: Path, image: str, *args: str) -> None:
    # The classic builder: no BuildKit frontend image to pull, as docker-compose v1 builds.
    run("docker", "build", "--tag", image, *args, str(context), timeout=1800,
        env={**os.environ, "DOCKER_BUILDKIT": "0"})


def image_size(image: str) -> int:
    return int(docker("image", "inspect", "--format", "{{.Size}}", image).stdout)


class WheelServer:
    """A package index on 127.0.0.1 holding the wheels of ``folder`` (pip reads a directory
    listing per project as its simple page)."""

    def __init__(self, folder: Path, work: Path) -> None:
        self.root = work / "index"
        for wheel in folder.glob("*.whl"):
            project = wheel.name.split("-")[0].lower().replace("_", "-")
            (self.root / project).mkdir(parents=True, exist_ok=True)
            os.symlink(wheel.resolve(), self.root / project / wheel.name)
        handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                    directory=str(self.root))
        handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
