"""docker-compose.yml without a Docker engine: valid by the Compose Specification's JSON Schema
(the copy check-jsonschema ships), and every command, FLYWHEEL_* variable, port and path it
names exists in the code: each service's environment is loaded by its real settings class."""

from __future__ import annotations

import importlib.resources
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from services.registry import SERVICES
from services.up.environment import profile_env, service_fields, settings_env
from services.up.profile import POLICY_FIELD, Profile, load_profile
from tests.deployment import load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
IMAGES = {"flywheel-stream": "stream", "flywheel-model": "model"}
METRICS_PORT = 9400
PROFILE = "/app/deploy/profiles/compose.yaml"


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _schema() -> dict[str, Any]:
    vendored = importlib.resources.files("check_jsonschema") / "builtin_schemas" / "vendor"
    return json.loads((vendored / "compose-spec.json").read_text(encoding="utf-8"))


def _errors(document: dict[str, Any]) -> list[str]:
    schema = _schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(document)]


def _in_repo(path: str) -> Path:
    """A path inside an image (/app/...) or relative to the compose file, in this checkout."""
    return ROOT / path.removeprefix("/app/").removeprefix("./")


def _flywheel() -> dict[str, dict[str, Any]]:
    """The services that run one of our images."""
    return {name: s for name, s in _compose()["services"].items()
            if s.get("image") in IMAGES}


def test_the_file_is_valid_by_the_compose_specification() -> None:
    assert _errors(_compose()) == []


def test_the_validation_can_fail() -> None:
    broken = _compose()
    broken["services"]["kafka"]["prots"] = ["9092:9092"]  # a typo: not a Compose key
    broken["services"]["gate"]["depends_on"] = {"seed": {"condition": "when_ready"}}
    errors = _errors(broken)
    assert any("prots" in e for e in errors), errors
    assert any("depends_on" in e for e in errors), errors


def test_every_long_running_service_is_a_flywheel_service_with_its_image() -> None:
    services = _flywheel()
    runs = {name: s for name, s in services.items() if "command" in s}
    assert set(runs) == set(SERVICES), "compose runs every service of `flywheel up`"
    model = {"generator", "trainer", "gate"}  # the ones that import torch
    for name, service in runs.items():
        assert service["command"] == [name, "--profile", PROFILE]
        assert service["image"] == ("flywheel-model" if name in model else "flywheel-stream")
        assert service["restart"] == "unless-stopped"
        probe = " ".join(service["healthcheck"]["test"])
        assert f":{METRICS_PORT}/healthz" in probe
        # The image's files are read-only; /tmp a tmpfs; /data the one volume written.
        assert service["read_only"] is True and service["tmpfs"] == ["/tmp"]
        writable = {v.split(":")[1] for v in service["volumes"] if not v.endswith(":ro")}
        assert writable <= {"/data"}, (name, writable)


def test_every_image_target_exists_in_the_dockerfile() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text(encoding="utf-8")
    stages = set(re.findall(r"^FROM \S+ AS (\w+)$", dockerfile, re.MULTILINE))
    for service in _compose()["services"].values():
        if "build" in service:
            assert service["build"]["target"] in stages
            assert _in_repo(service["build"]["dockerfile"]).is_file()
            assert IMAGES[service["image"]] == service["build"]["target"]
    assert 'ENTRYPOINT ["flywheel", "run"]' in dockerfile
    assert re.search(r"^USER flywheel$", dockerfile, re.MULTILINE)


def test_one_shot_commands_exist() -> None:
    from typer.main import get_command

    from services.cli import app

    cli = get_command(app)
    words = _compose()["services"]["seed"]["entrypoint"]
    assert words == ["flywheel", "seed-model", "--profile", PROFILE]
    assert words[1] in cli.commands  # type: ignore[attr-defined]
    assert _in_repo(PROFILE).is_file()


def _container_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Service ``name``'s settings in its container: the profile's (``flywheel run NAME
    --profile``), under the variables compose sets."""
    service = _flywheel()[name]
    environment = {k: str(v) for k, v in service["environment"].items()}
    for variable, value in environment.items():
        if value.startswith("/app/"):
            assert _in_repo(value).exists(), f"{name}: {variable}={value}"
    from_profile = profile_env(load_profile(_in_repo(PROFILE)), name)
    return load_settings(name, from_profile | environment, monkeypatch)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_each_service_environment_loads_into_its_settings(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every FLYWHEEL_* variable is a field of the service's settings (a typo would be
    silently ignored, settings allow extras), and the values validate."""
    settings = _container_settings(name, monkeypatch)
    assert settings.kafka.bootstrap_servers == "kafka:19092"
    assert settings.metrics.port == METRICS_PORT


# What a deployment sets for itself: where the broker, the keys, the model and the store are.
DEPLOYMENT = {"kafka", "instance_id", "metrics", "decisions", "model_path", "base_model_path",
              "checkpoint_root", "checkpoint_url", *POLICY_FIELD.values()}


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_compose_runs_what_flywheel_up_runs(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One source of truth: each container's settings are those `flywheel up` gives the
    service (the embedded profile), held-out suite and policy included, but for where things
    are. Drift fails here: a section in the compose profile, a variable in compose."""
    embedded = Profile()
    base = "/store/v000000"
    up_env = settings_env(service_fields(embedded, name, base, {}))
    if name in POLICY_FIELD:
        up_env |= profile_env(embedded, name)  # the embedded policy, as a file
    up = load_settings(name, up_env, monkeypatch)
    mine = _container_settings(name, monkeypatch)
    assert mine.model_dump(exclude=DEPLOYMENT) == up.model_dump(exclude=DEPLOYMENT)
    if name in POLICY_FIELD:
        assert _policy(mine, POLICY_FIELD[name]) == _policy(up, POLICY_FIELD[name])


def _policy(settings: Any, field: str) -> Any:
    path = getattr(settings, field)
    return None if path is None else yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def test_the_seed_job_reads_the_services_profile() -> None:
    """The seed model, the topics (the seed job applies them) and the services: one profile,
    one broker."""
    profile = load_profile(_in_repo(PROFILE))
    assert profile.kafka["bootstrap_servers"] == "kafka:19092"
    assert profile.metrics_port == METRICS_PORT
    assert profile.model_dump(exclude={"name", "kafka", "checkpoint_url", "home",
                                       "metrics_port"}) == \
        Profile().model_dump(exclude={"name", "kafka", "checkpoint_url", "home",
                                      "metrics_port"})


def test_prometheus_and_grafana_mount_what_exists() -> None:
    services = _compose()["services"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert _in_repo(source).is_dir(), volume
    config = services["prometheus"]["command"][0].removeprefix("--config.file=")
    local = ROOT / "deploy" / "prometheus" / Path(config).name
    scrape = yaml.safe_load(local.read_text(encoding="utf-8"))
    discovered = scrape["scrape_configs"][0]["dns_sd_configs"][0]
    assert set(discovered["names"]) == set(SERVICES)
    assert discovered["port"] == METRICS_PORT
    assert scrape["rule_files"] == ["alerts.yml"]


def test_the_feeder_keeps_the_gates_held_out_tasks_off_tasks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Held-out hygiene as `flywheel up` has it: the feeder gets the gate's suite."""
    gate = _container_settings("gate", monkeypatch).held_out
    assert gate and _container_settings("feeder", monkeypatch).held_out == gate
