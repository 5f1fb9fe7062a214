"""``flywheel up`` SIGKILLed: its children and its broker outlive it; ``flywheel down`` still
finds and stops every one of them (process groups recorded in the state file, the home's lock
telling a dead ``up`` from a live one), and a new ``up`` refuses to start beside them. The
trainer runs on 2 ranks: its torchrun starts them in sessions of their own, and they go too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.cluster.local_broker import free_port, free_ports
from services.common.errors import ConfigError
from services.models.tiny import tiny_model
from services.up.control import Owner
from services.up.profile import Profile
from services.up.stack import Stack
from tests.integration.runners import torchrun_ranks
from tests.kafka import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.fault]


def _alive(pgid: int) -> bool:
    """A member of the group runs, by ``ps`` (independent of the code under test); a zombie,
    exited but not reaped by whoever adopted it, does not count."""
    listing = subprocess.run(["ps", "-e", "-o", "pgid=,stat="], capture_output=True,
                             text=True, check=True).stdout
    return any(int(group) == pgid and not state.startswith("Z")
               for group, state in (line.split() for line in listing.splitlines()))


def _running(pid: int) -> bool:
    try:
        return not Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] \
            .startswith("Z")
    except OSError:
        return False


def _flywheel(*args: str, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "services", *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def test_down_stops_the_children_and_broker_a_killed_up_left(tmp_path: Path) -> None:
    home = tmp_path / "home"
    profile = Profile(model_path=tiny_model(tmp_path / "model"), home=home,
                      checkpoint_url=str(tmp_path / "store"), broker_port=free_port(),
                      prometheus={"enabled": False})  # type: ignore[arg-type]
    profile.trainer = {**profile.trainer, "ranks": 2}
    profile.metrics_port = free_ports(profile.processes)
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(json.loads(profile.model_dump_json())))
    log = tmp_path / "up.log"
    up = _flywheel("up", "--profile", str(path), "--no-view", log=log)
    state_file = home / "up.json"

    def children() -> dict[str, int]:
        if not state_file.is_file():
            return {}
        state = json.loads(state_file.read_text())
        return {n: c["pgid"] for n, c in state.get("children", {}).items()}

    try:
        wait_until(lambda: len(children()) == profile.processes or up.poll() is not None,
                   300, "every service started")
        assert up.poll() is None, log.read_text()[-3000:]
        groups = children()
        wait_until(lambda: len(torchrun_ranks(groups["trainer"])) == 2
                   or up.poll() is not None, 120, "the trainer's 2 ranks started by torchrun")
        ranks = list(torchrun_ranks(groups["trainer"]).values())
        broker = json.loads((home / "kafka" / "broker.json").read_text())["pid"]
        up.send_signal(signal.SIGKILL)
        up.wait(30)
    finally:
        if up.poll() is None:
            up.kill()
    # What a killed up leaves: every child and the broker, still running.
    assert all(_alive(g) for g in groups.values()), groups
    assert all(_running(r) for r in ranks)
    assert _alive(broker)

    again = _flywheel("up", "--profile", str(path), "--no-view", log=tmp_path / "again.log")
    assert again.wait(120) != 0
    assert "left by a killed" in (tmp_path / "again.log").read_text()

    down = subprocess.run([sys.executable, "-m", "services", "down", "--home", str(home)],
                          capture_output=True, text=True, timeout=300)
    assert down.returncode == 0 and "stopped" in down.stderr, down.stderr
    assert not [n for n, g in groups.items() if _alive(g)]
    assert not [r for r in ranks if _running(r)]
    assert not _alive(broker)
    assert not state_file.exists()


def test_a_seed_model_failing_while_the_broker_starts_leaves_no_broker(tmp_path: Path) -> None:
    """The local broker starts on a thread beside the seed model's training: when the
    training fails, ``up`` waits for that start to end and stops the broker it started."""
    home = tmp_path / "home"
    profile = Profile(home=home, checkpoint_url=str(tmp_path / "store"),
                      broker_port=free_port(), prometheus={"enabled": False},  # type: ignore[arg-type]
                      bootstrap={"env": "word_problems"})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="arithmetic environment"):
        Stack(profile).prepare(say=lambda _line: None)
    started = json.loads((home / "kafka" / "broker.json").read_text())["pid"]
    assert not _running(started)
    assert not (home / "up.json").exists()
    Owner(home).release()  # the home's lock was released too: a new up may take it
