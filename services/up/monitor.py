"""Prometheus for ``flywheel up``: the same configuration and alert rules as a deployment
(``deploy/prometheus/``), pointed at the local services.

When the profile's ``prometheus.enabled`` is on (by default: when a ``prometheus`` binary is on
the PATH), ``flywheel up`` writes ``<home>/prometheus/prometheus.yml`` from
``deploy/prometheus/prometheus.yml`` (its scrape and rule intervals from the profile, the rule
file ``deploy/prometheus/alerts.yml``), lists every service's ``/metrics`` endpoint in the
file-based discovery file ``<home>/prometheus/targets/flywheel.json``, and supervises the
server like the services (its log in ``<home>/logs/prometheus.log``, its data in
``<home>/prometheus/data``). The live view reads the firing alerts from its HTTP API.
"""

from __future__ import annotations

import json
import shutil
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from services.common.config import DEPLOY_DIR
from services.common.errors import ConfigError
from services.up.supervisor import ProcessSpec

CONFIG = DEPLOY_DIR / "prometheus" / "prometheus.yml"
RULES = DEPLOY_DIR / "prometheus" / "alerts.yml"
TARGETS = "targets/flywheel.json"


class PrometheusProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = Field(default=None, description="Run Prometheus with the stack; "
                                 "none: when the binary is installed.")
    binary: str = Field(default="prometheus", description="The server: a path or a name on "
                        "the PATH.")
    port: int = Field(default=9090, ge=1024, description="Its web UI and HTTP API port.")
    scrape_interval: str = Field(default="5s", pattern=r"^[0-9]+(ms|s|m)$",
                                 description="Scrape and rule evaluation interval.")
    retention: str = Field(default="7d", pattern=r"^[0-9]+[smhdwy]$",
                           description="How long its local data is kept.")

    def program(self) -> str | None:
        """The binary to run, or None when Prometheus is off. Asked for but missing: an
        error that says how to install it."""
        if self.enabled is False:
            return None
        found = shutil.which(self.binary)
        if found is None and self.enabled:
            raise ConfigError(f"prometheus.enabled is on but {self.binary!r} is not installed "
                              "(Debian: apt-get install prometheus; or set prometheus.binary)")
        return found


@dataclass
class Prometheus:
    """One local Prometheus server for a stack living in ``home``."""

    settings: PrometheusProfile
    program: str
    home: Path

    @property
    def folder(self) -> Path:
        return self.home / "prometheus"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    def write_config(self, ports: dict[str, int]) -> Path:
        """prometheus.yml and the discovery file for the processes in ``ports`` (name ->
        /metrics port); returns the configuration's path."""
        config: dict[str, Any] = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
        interval = self.settings.scrape_interval
        config["global"] |= {"scrape_interval": interval, "evaluation_interval": interval}
        config["rule_files"] = [str(RULES)]
        (job,) = config["scrape_configs"]
        job["file_sd_configs"] = [{"files": [str(self.folder / "targets" / "*.json")],
                                   "refresh_interval": interval}]
        targets = [{"targets": [f"127.0.0.1:{port}"],
                    "labels": {"service": name.split("-")[0], "instance": name}}
                   for name, port in ports.items()]
        (self.folder / "targets").mkdir(parents=True, exist_ok=True)
        (self.folder / TARGETS).write_text(json.dumps(targets, indent=1), encoding="utf-8")
        path = self.folder / "prometheus.yml"
        path.write_text("# Written by `flywheel up` from deploy/prometheus/prometheus.yml.\n"
                        + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return path

    def spec(self, ports: dict[str, int]) -> ProcessSpec:
        config = self.write_config(ports)
        return ProcessSpec("prometheus", [
            self.program, f"--config.file={config}",
            f"--storage.tsdb.path={self.folder / 'data'}",
            f"--storage.tsdb.retention.time={self.settings.retention}",
            f"--web.listen-address=127.0.0.1:{self.settings.port}"])

    def api(self, path: str, timeout: float = 2.0, **params: str) -> Any:
        return api(self.url, path, timeout, **params)

    def alerts(self) -> list[dict[str, Any]] | None:
        return alerts(self.url)


def api(url: str, path: str, timeout: float = 2.0, **params: str) -> Any:
    """``data`` of a successful answer of the HTTP API at ``url``; raises OSError or
    ValueError otherwise."""
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{url}/api/v1/{path}{query}", timeout=timeout) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise ValueError(f"{path}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]


def alerts(url: str) -> list[dict[str, Any]] | None:
    """Pending and firing alerts, or None when the server does not answer (yet)."""
    try:
        return list(api(url, "alerts", timeout=0.5)["alerts"])
    except (OSError, ValueError):
        return None
