"""The Grafana dashboards under deploy/grafana: generated from code, every query parsed by
Prometheus's own parser (promtool), every metric one the services export."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"


def _module() -> Any:
    spec = importlib.util.spec_from_file_location("dashboards", GRAFANA / "dashboards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every target of every committed dashboard."""
    out = []
    for path in sorted((GRAFANA / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text(encoding="utf-8"))["panels"]:
            out += [(path.name, panel["title"], t["expr"]) for t in panel["targets"]]
    return out


def _exported() -> set[str]:
    """Metric names the services declare (prometheus_client constructors in the source)."""
    names: set[str] = set()
    for source in (ROOT / "services").rglob("*.py"):
        names |= set(re.findall(r'"(flywheel_[a-z0-9_]+)"', source.read_text(encoding="utf-8")))
    return names


def test_the_committed_json_is_what_the_code_generates() -> None:
    rendered = _module().render()
    committed = {p.name: p.read_text(encoding="utf-8")
                 for p in (GRAFANA / "dashboards").glob("*.json")}
    assert committed == rendered, "run `python deploy/grafana/dashboards.py`"
    assert set(rendered) == {"flow.json", "quality.json", "learning.json", "fleet.json",
                             "health.json"}


def test_every_queried_metric_is_exported_by_a_service() -> None:
    exported = _exported()
    assert "flywheel_runtime_records_consumed_total" in exported  # the scan finds metrics
    for name, title, expr in _queries():
        for metric in re.findall(r"\b(flywheel_[a-z0-9_]+)", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", metric)
            assert metric in exported or base in exported, f"{name} / {title}: {metric}"


def test_panels_are_well_formed() -> None:
    for path in (GRAFANA / "dashboards").glob("*.json"):
        board = json.loads(path.read_text(encoding="utf-8"))
        assert board["uid"] == f"flywheel-{path.stem}"
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), path.name
        assert [v["name"] for v in board["templating"]["list"]] == ["datasource"]
        for panel in board["panels"]:
            assert panel["targets"], (path.name, panel["title"])
            assert panel["datasource"]["uid"] == "${datasource}"
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), (path.name, panel["title"])


def test_promtool_parses_every_query(promtool: str, tmp_path: Path) -> None:
    """Each query becomes a recording rule ($__rate_interval as 1m), which `promtool check
    rules` parses with the server's PromQL parser."""
    queries = _queries()
    assert len(queries) > 20
    rules = [{"record": f"flywheel:panel_{i}",
              "expr": expr.replace("$__rate_interval", "1m")}
             for i, (_, _, expr) in enumerate(queries)]
    (tmp_path / "panels.yml").write_text(yaml.safe_dump({"groups": [{"name": "panels",
                                                                     "rules": rules}]}))
    done = subprocess.run([promtool, "check", "rules", str(tmp_path / "panels.yml")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_refuses_a_broken_query(promtool: str, tmp_path: Path) -> None:
    """The check above can fail: an unbalanced query is refused."""
    (tmp_path / "bad.yml").write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "flywheel:bad", "expr": "sum by (service (rate(up[1m]))"}]}]}))
    done = subprocess.run([promtool, "check", "rules", str(tmp_path / "bad.yml")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0


def test_provisioning_files_parse() -> None:
    paths = sorted((GRAFANA / "provisioning").rglob("*.yml"))
    assert [p.parent.name for p in paths] == ["dashboards", "datasources"]
    for path in paths:
        assert yaml.safe_load(path.read_text(encoding="utf-8"))["apiVersion"] == 1, path
