"""The Prometheus `flywheel up` runs: the deployment's configuration and rules, local targets."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from services.common.errors import ConfigError
from services.up.monitor import RULES, Prometheus, PrometheusProfile


def test_the_local_config_is_the_deployments_with_the_stacks_targets(
        tmp_path: Path, promtool: str) -> None:
    prom = Prometheus(PrometheusProfile(scrape_interval="2s"), "prometheus", tmp_path)
    path = prom.write_config({"feeder": 9401, "generator-0": 9402, "generator-1": 9403})
    done = subprocess.run([promtool, "check", "config", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout + done.stderr
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert config["global"]["scrape_interval"] == "2s"
    assert config["rule_files"] == [str(RULES)]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "flywheel" and job["honor_labels"] is True
    targets = json.loads((tmp_path / "prometheus" / "targets" / "flywheel.json").read_text())
    assert targets[1] == {"targets": ["127.0.0.1:9402"],
                          "labels": {"service": "generator", "instance": "generator-0"}}
    assert [t["labels"]["service"] for t in targets] == ["feeder", "generator", "generator"]
    spec = prom.spec({"feeder": 9401})
    assert spec.name == "prometheus" and f"--config.file={path}" in spec.argv


def test_prometheus_is_used_when_installed_and_required_only_when_asked_for() -> None:
    missing = "no-such-prometheus-binary"
    assert PrometheusProfile(binary=missing).program() is None  # auto: not installed, off
    assert PrometheusProfile(enabled=False).program() is None
    with pytest.raises(ConfigError, match="apt-get install prometheus"):
        PrometheusProfile(enabled=True, binary=missing).program()
