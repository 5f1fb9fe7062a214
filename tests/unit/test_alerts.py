"""The alert rules under deploy/prometheus, checked and unit-tested by promtool itself."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def _promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_the_rules_parse(promtool: str) -> None:
    done = _promtool(promtool, "check", "rules", str(RULES / "alerts.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_rule_passes_its_promtool_unit_test(promtool: str) -> None:
    done = _promtool(promtool, "test", "rules", str(RULES / "alerts_test.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_unit_test_that_sees_it_fire_and_not_fire() -> None:
    rules = yaml.safe_load((RULES / "alerts.yml").read_text(encoding="utf-8"))
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((RULES / "alerts_test.yml").read_text(encoding="utf-8"))["tests"]
    fired: set[str] = set()
    silent: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
    assert alerts - fired == set(), "alerts no test sees firing"
    assert alerts - silent == set(), "alerts no test sees silent"


def test_a_broken_expectation_fails(promtool: str, tmp_path: Path) -> None:
    """The unit tests can fail: the same file with one alert expected early does."""
    text = (RULES / "alerts_test.yml").read_text(encoding="utf-8")
    broken = text.replace("- {eval_time: 3m, alertname: FlywheelServiceDown, exp_alerts: []}",
                          "- {eval_time: 1m, alertname: FlywheelServiceDown, exp_alerts: "
                          "[{exp_labels: {severity: critical}}]}")
    assert broken != text
    (tmp_path / "alerts.yml").write_text((RULES / "alerts.yml").read_text(encoding="utf-8"))
    (tmp_path / "alerts_test.yml").write_text(broken)
    done = _promtool(promtool, "test", "rules", str(tmp_path / "alerts_test.yml"))
    assert done.returncode != 0 and "FlywheelServiceDown" in done.stdout + done.stderr


def test_the_server_config_parses_with_its_rules(promtool: str) -> None:
    done = _promtool(promtool, "check", "config", str(RULES / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
