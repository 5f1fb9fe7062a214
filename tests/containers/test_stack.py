"""docker-compose.yml for real: the images built from deploy/Dockerfile as they ship, the whole
stack up in a Docker engine until a generator container serves a promoted version, Prometheus
in compose scraping every service, the filter and the trainer killed mid-stream and brought
back by their restart policy with nothing lost or repeated, and nothing left after ``down``.

The Docker engine is the machine's, or ``dockerd`` started here and stopped after. Images that
cannot be pulled (no registry here) are stood in for by local builds (engine.py) through
compose.test.yml; Grafana cannot be built here and is left out. Every wait is on something
the system reports (a container's state, a Prometheus query, a topic's offsets), never a
sleep. Figures (build and rebuild seconds, image sizes, time to the first promoted version,
the accounting's counts) are printed: ``pytest -s tests/containers``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from schemas import CheckpointEvent
from services.cluster.local_broker import free_ports
from services.registry import SERVICES
from tests.accounting import Accounting, account
from tests.containers import engine
from tests.containers.engine import ROOT, docker, run
from tests.kafka import Broker, wait_until

PROJECT = "flywheel-test"
FILES = ("-f", "docker-compose.yml", "-f", "tests/containers/compose.test.yml")
# Everything but Grafana, whose image cannot be built here.
RUN = ("kafka", "keys", "seed", *SERVICES, "prometheus")
STREAM_IMAGE, MODEL_IMAGE = "flywheel-stream", "flywheel-model"
WHEELS = Path(os.environ.get("WHEELS", ROOT.parent / "shared" / "wheels"))
PREFIX = "flywheel."  # the topic prefix of the compose profile (the default)
KILLED = ("filter", "trainer")
FIGURES: dict[str, Any] = {}

pytestmark = pytest.mark.timeout(2400)


@dataclass
class Compose:
    env: dict[str, str]
    started: float = 0.0
    seen: dict[str, Any] = field(default_factory=dict)

    def __call__(self, *args: str, timeout: float = 1800, check: bool = True
                 ) -> subprocess.CompletedProcess[str]:
        return run("docker-compose", "-p", PROJECT, *FILES, *args, timeout=timeout,
                   check=check, cwd=ROOT, env={**os.environ, **self.env})

    def container(self, service: str) -> dict[str, Any]:
        ident = self("ps", "-q", service).stdout.split()
        assert len(ident) == 1, (service, ident)
        return json.loads(docker("inspect", ident[0]).stdout)[0]

    def logs(self, service: str) -> str:
        return self("logs", "--no-color", "--tail", "60", service, check=False).stdout

    @property
    def kafka(self) -> Broker:
        return Broker(f"localhost:{self.env['FLYWHEEL_KAFKA_PORT']}")

    def prometheus(self, path: str, **query: str) -> Any:
        url = (f"http://127.0.0.1:{self.env['FLYWHEEL_PROMETHEUS_PORT']}/api/v1/{path}?"
               + urllib.parse.urlencode(query))
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]


def _project_objects() -> dict[str, list[str]]:
    label = f"label=com.docker.compose.project={PROJECT}"
    return {"containers": docker("ps", "-aq", "--filter", label).stdout.split(),
            "volumes": docker("volume", "ls", "-q", "--filter", label).stdout.split(),
            "networks": docker("network", "ls", "-q", "--filter", label).stdout.split()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The engine for the module: the machine's, or one started here (stopped at the end,
    after the stack's ``down``)."""
    folder = tmp_path_factory.mktemp("containers")
    with engine.engine(folder / "dockerd.log") as started:
        FIGURES["dockerd started here"] = started
        yield folder


@pytest.fixture(scope="module")
def images(work: Path) -> Iterator[Compose]:
    """The base images, the stand-ins and the project's two images (built by compose from
    deploy/Dockerfile)."""
    began = time.monotonic()
    bases = engine.base_images()
    stand_ins = engine.third_party_images(work)
    FIGURES["base images"] = {b.image: f"{b.how}, {b.seconds:.1f} s" for b in bases}
    FIGURES["stand-ins"] = {b.image: f"{b.seconds:.1f} s" for b in stand_ins}
    first = free_ports(3)
    kafka, prometheus, grafana = first, first + 1, first + 2
    env = {"FLYWHEEL_KAFKA_PORT": str(kafka), "FLYWHEEL_PROMETHEUS_PORT": str(prometheus),
           "FLYWHEEL_GRAFANA_PORT": str(grafana)}
    wheels = None
    if any(WHEELS.glob("torch-*.whl")):  # else TORCH_INDEX's default, PyTorch's index
        wheels = engine.WheelServer(WHEELS, work)
        env["FLYWHEEL_TEST_TORCH_INDEX"] = wheels.url
    compose = Compose(env)
    try:
        compose("down", "-v", "--remove-orphans", check=False)  # an earlier run's, if any
        started = time.monotonic()
        compose("build")
        FIGURES["build seconds (both images)"] = round(time.monotonic() - started, 1)
        FIGURES["images ready after (s)"] = round(time.monotonic() - began, 1)
        yield compose
    finally:
        if wheels is not None:
            wheels.close()
        compose("down", "-v", "--remove-orphans", check=False)  # also when a test failed
        print("\ncontainer figures:", json.dumps(FIGURES, indent=1))


@pytest.fixture(scope="module")
def stack(images: Compose) -> Compose:
    images.started = time.monotonic()
    try:
        images("up", "-d", *RUN)
    except AssertionError:
        for name in ("seed", "kafka", "keys"):
            print(f"--- {name}\n{images.logs(name)}")
        raise
    FIGURES["up -d returned after (s)"] = round(time.monotonic() - images.started, 1)
    return images


def test_images_worth_shipping(images: Compose, work: Path) -> None:
    sizes = {name: engine.image_size(name) for name in (STREAM_IMAGE, MODEL_IMAGE)}
    FIGURES["image sizes (MB)"] = {k: round(v / 1e6) for k, v in sizes.items()}

    def probe(image: str, script: str) -> subprocess.CompletedProcess[str]:
        return docker("run", "--rm", "--entrypoint", "python", image, "-c", script,
                      check=False)

    # The stream image has no torch; the model image has.
    find = "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"
    assert probe(STREAM_IMAGE, find).returncode == 1
    assert probe(MODEL_IMAGE, find).returncode == 0
    for image in (STREAM_IMAGE, MODEL_IMAGE):
        # Not root, and the source is not the user's to change; only the build context
        # .dockerignore lets through is in it.
        script = ("import os, pathlib, sys\n"
                  "assert os.getuid() == 10001, os.getuid()\n"
                  "for p in ('/app/services/filter/stage.py', '/app/deploy/topics.yaml'):\n"
                  "    assert not os.access(p, os.W_OK), p\n"
                  "assert not os.access('/app/services', os.W_OK)\n"
                  "for p in ('.git', '.venv', '.flywheel', 'tests', 'results'):\n"
                  "    assert not pathlib.Path('/app', p).exists(), p\n"
                  "for p in ('/data/checkpoints', '/keys/signing', '/keys/public'):\n"
                  "    assert os.access(p, os.W_OK), p\n"
                  "import services.cli\n")
        done = probe(image, script)
        assert done.returncode == 0, (image, done.stderr[-2000:])

    # A one-line change to a service rebuilds only the source layers, from the cache.
    context = work / "rebuild"
    context.mkdir()
    for name in ("pyproject.toml", "README.md", ".dockerignore"):
        shutil.copy(ROOT / name, context / name)
    for name in ("schemas", "services", "bench", "deploy"):
        shutil.copytree(ROOT / name, context / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    stage = context / "services" / "filter" / "stage.py"
    stage.write_text(stage.read_text(encoding="utf-8") + "# a one-line change\n",
                     encoding="utf-8")
    seconds = {}
    for target, image in (("stream", STREAM_IMAGE), ("model", MODEL_IMAGE)):
        tag = f"flywheel-test/rebuild-{target}"
        started = time.monotonic()
        engine.build(context, tag, "--file", str(context / "deploy" / "Dockerfile"),
                     "--target", target, *(
                         ["--network", "host", "--build-arg",
                          f"TORCH_INDEX={images.env['FLYWHEEL_TEST_TORCH_INDEX']}"]
                         if "FLYWHEEL_TEST_TORCH_INDEX" in images.env else []))
        seconds[target] = round(time.monotonic() - started, 1)
        try:
            before, after = (json.loads(docker("image", "inspect", "--format",
                                               "{{json .RootFS.Layers}}", i).stdout)
                             for i in (image, tag))
        finally:
            docker("rmi", tag, check=False)
        assert len(before) == len(after)
        # Every layer but the source's two (its copy and its install) is the one cached.
        assert before[:-2] == after[:-2], target
        assert before[-2] != after[-2], target
    FIGURES["rebuild after a one-line change (s)"] = seconds


def _served_version(stack: Compose) -> int:
    result = stack.prometheus("query", query="max(flywheel_generator_policy_version)")["result"]
    return int(float(result[0]["value"][1])) if result else -1


def _failing(stack: Compose) -> str | None:
    """A flywheel container that keeps failing (restarted more than twice), with its logs."""
    for name in SERVICES:
        state = stack.container(name)
        if state["RestartCount"] > 2:
            return f"{name} restarted {state['RestartCount']} times:\n{stack.logs(name)}"
    return None


def test_a_generator_container_serves_a_promoted_version(stack: Compose) -> None:
    def promoted() -> int | None:
        failing = _failing(stack)
        assert failing is None, failing
        version = _served_version(stack)
        return version if version >= 1 else None

    version = wait_until(promoted, 1500, "a generator container serving a promoted version "
                         "beyond v0 (Prometheus: flywheel_generator_policy_version)",
                         interval=2.0)
    FIGURES["first promoted version served after up (s)"] = round(
        time.monotonic() - stack.started, 1)
    # The decision is on `checkpoints`, signed by the gate.
    events = [CheckpointEvent.from_bytes(m.value())
              for m in stack.kafka.read_all(PREFIX + "checkpoints")]
    promoted_versions = {e.version for e in events if e.status == "promoted"}
    assert version in promoted_versions
    assert all(e.signature for e in events if e.status == "promoted")


def test_prometheus_in_compose_scrapes_every_service(stack: Compose) -> None:
    def scraped() -> set[str] | None:
        targets = stack.prometheus("targets", state="active")["activeTargets"]
        up = {t["labels"].get("service") for t in targets if t["health"] == "up"}
        return up if set(SERVICES) <= up else None

    wait_until(scraped, 300, f"Prometheus scraping {sorted(SERVICES)} (targets up)",
               interval=2.0)
    # The series come from the services themselves, labelled by them.
    result = stack.prometheus("query", query="count by (service) (up{job=\"flywheel\"} == 1)")
    assert {r["metric"]["service"] for r in result["result"]} >= set(SERVICES)


def test_killed_containers_come_back_and_nothing_is_lost(stack: Compose) -> None:
    kafka = stack.kafka
    decided = (PREFIX + "filtered", PREFIX + "rejected")

    def total(topics: tuple[str, ...]) -> int:
        return sum(sum(kafka.end_offsets(t).values()) for t in topics)

    def candidates() -> int:
        return sum(1 for m in kafka.read_all(PREFIX + "checkpoints")
                   if CheckpointEvent.from_bytes(m.value()).status == "candidate")

    restarts = {}
    for name in KILLED:
        before = stack.container(name)
        # Mid-stream: while records flow (the filter deciding).
        mark = total(decided)
        wait_until(lambda mark=mark: total(decided) > mark, 600, "the filter deciding",
                   interval=1.0)
        pid = before["State"]["Pid"]
        assert pid > 0
        # A crash, as the kernel's OOM killer or a segfault would end it: `docker kill` is a
        # stop by hand, which no restart policy undoes.
        run("kill", "-KILL", str(pid))

        def back(name: str = name, count: int = before["RestartCount"]) -> bool:
            state = stack.container(name)
            return state["RestartCount"] > count and state["State"]["Running"] and \
                state["State"].get("Health", {}).get("Status") == "healthy"

        wait_until(back, 600, f"{name} restarted by its policy, and healthy", interval=1.0)
        restarts[name] = stack.container(name)["RestartCount"]
    # Both work again: the filter decides, the trainer writes a new candidate.
    mark, made = total(decided), candidates()
    wait_until(lambda: total(decided) > mark, 600, "the restarted filter deciding",
               interval=1.0)
    wait_until(lambda: candidates() > made, 900, "a candidate from the restarted trainer",
               interval=2.0)
    FIGURES["restart counts"] = restarts
    # Quiet, then an independent accounting of every topic.
    stack("stop", *SERVICES, timeout=600)
    counts = account(Accounting(kafka, PREFIX))
    FIGURES["accounting after the kills"] = counts
    assert counts["raw scored"] > 0 and counts["decided"] > 0 and counts["candidates"] >= 2


def test_down_leaves_nothing(images: Compose) -> None:
    """No container, volume or network of the project, and none of its containers' processes
    (each container's first process, whose end ends every other in its namespace)."""
    containers = images("ps", "-q").stdout.split()
    pids = [p for c in containers
            if (p := json.loads(docker("inspect", c).stdout)[0]["State"]["Pid"]) > 0]
    assert containers and pids
    images("down", "-v", "--remove-orphans")
    left = _project_objects()
    assert left == {k: [] for k in left}, left
    assert [p for p in pids if _alive(p)] == []
