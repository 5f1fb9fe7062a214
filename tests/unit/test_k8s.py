"""deploy/k8s without a cluster: every manifest valid by the Kubernetes API's own schemas
(kubernetes-validate, strict: an unknown field is an error), and every command, FLYWHEEL_*
variable, port, path and reference in them exists: each workload's environment is loaded by
its service's real settings class."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import ValidationError

from services.registry import SERVICES
from services.up.environment import profile_env
from services.up.profile import load_profile
from tests.deployment import load_settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
VERSION = "1.37.0"
MODEL = {"generator", "trainer", "gate"}  # the services that import torch
METRICS_PORT = 9400
PROFILE = "/etc/flywheel/profile/profile.yaml"  # profile.yaml, from its ConfigMap
# What a pod's own variables may set: where the broker, the keys and the state are. Every
# other setting is profile.yaml's.
DEPLOYMENT = {"kafka", "metrics", "decisions", "state", "instance_id"}


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))


def _documents() -> list[dict[str, Any]]:
    docs = []
    for name in _kustomization()["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")) if d]
    return docs


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _documents() if d["kind"] == kind}


def _workloads() -> dict[str, dict[str, Any]]:
    """Every long-running flywheel service: its StatefulSet or Deployment."""
    return {**_by_kind("StatefulSet"), **_by_kind("Deployment")}


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def _environment(container: dict[str, Any]) -> dict[str, str]:
    """The container's variables: its ConfigMaps' (envFrom), then its own."""
    maps = _by_kind("ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:  # a Secret is the cluster's: not in the manifests
            env |= maps[source["configMapRef"]["name"]]["data"]
    env |= {e["name"]: e["value"] for e in container.get("env", [])}
    return env


def test_every_manifest_is_valid_by_the_kubernetes_schemas() -> None:
    docs = _documents()
    assert {d["kind"] for d in docs} >= {"StatefulSet", "Deployment", "PersistentVolumeClaim",
                                         "Job", "ConfigMap", "Service", "Namespace"}
    for doc in docs:
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_the_validation_can_fail() -> None:
    feeder = _by_kind("StatefulSet")["feeder"]
    _container(feeder)["livenesProbe"] = {"httpGet": {"path": "/healthz", "port": 9400}}
    with pytest.raises(ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(feeder, VERSION, strict=True)
    claim = _by_kind("PersistentVolumeClaim")["checkpoints"]
    claim["spec"]["accessModes"] = "ReadWriteMany"  # a string where a list belongs
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(claim, VERSION, strict=True)


def test_every_file_is_listed_and_every_listed_file_exists() -> None:
    kustomization = _kustomization()
    listed = set(kustomization["resources"]) | {
        f for g in kustomization["configMapGenerator"] for f in g["files"]}
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_workload_kinds_images_commands_and_probes() -> None:
    """Stream stages, trainer and gate are StatefulSets (a stable pod name is a stable
    transactional id); generators a Deployment; each runs `flywheel run <service>`."""
    workloads = _workloads()
    assert set(workloads) == set(SERVICES), "Kubernetes runs every service of `flywheel up`"
    assert set(_by_kind("Deployment")) == {"generator"}
    services = _by_kind("Service")
    for name, workload in workloads.items():
        container = _container(workload)
        # The ENTRYPOINT (`flywheel run`), the service, and the profile from its ConfigMap.
        assert container["args"] == [name, "--profile", PROFILE] and "command" not in container
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        assert volumes[mounts[str(Path(PROFILE).parent)]]["configMap"] == {
            "name": "flywheel-profile"}
        assert container["image"] == ("flywheel-model" if name in MODEL else "flywheel-stream")
        assert container["ports"] == [{"name": "metrics", "containerPort": METRICS_PORT}]
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert int(_environment(container)["FLYWHEEL_METRICS__PORT"]) == METRICS_PORT
        pod = workload["spec"]["template"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= pod["metadata"][
            "labels"].items()
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        if workload["kind"] == "StatefulSet":
            assert services[workload["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_each_workload_environment_loads_into_its_settings(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every FLYWHEEL_* variable is a setting of the service (settings allow extras, so a
    typo would be ignored), the values validate, and the paths exist: in the image (/app)
    or on the mounted volume (/data)."""
    workload = _workloads()[name]
    container = _container(workload)
    environment = _environment(container)
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    claims = _by_kind("PersistentVolumeClaim")
    for value in environment.values():
        if value.startswith("/app/"):
            assert (ROOT / value.removeprefix("/app/")).exists(), f"{name}: {value}"
        if value.startswith("/data/"):
            volume = volumes[mounts["/data"]]
            assert volume["persistentVolumeClaim"]["claimName"] in claims
    settings = _pod_settings(name, monkeypatch)
    assert settings.metrics.port == METRICS_PORT
    assert settings.kafka.bootstrap_servers == environment["FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS"]


def _pod_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Service ``name``'s settings in its pod: profile.yaml's (``flywheel run NAME
    --profile``), under the pod's variables; relative paths from /app, the image's working
    directory (this checkout's top here)."""
    monkeypatch.chdir(ROOT)
    from_profile = profile_env(load_profile(K8S / "profile.yaml"), name)
    return load_settings(name, from_profile | _environment(_container(_workloads()[name])),
                         monkeypatch)


def test_one_source_of_truth_the_pods_set_only_where_things_are() -> None:
    """Held-out suite, policies and settings come from profile.yaml alone: a variable of a
    pod (its own, or a ConfigMap's) that sets anything else is drift and fails here."""
    for name, workload in _workloads().items():
        for variable in _environment(_container(workload)):
            top = variable.removeprefix("FLYWHEEL_").lower().split("__")[0]
            assert top in DEPLOYMENT, f"{name}: {variable} belongs in profile.yaml"


def test_the_feeder_and_the_gate_share_one_held_out_suite(
        monkeypatch: pytest.MonkeyPatch) -> None:
    gate = _pod_settings("gate", monkeypatch).held_out
    assert gate and _pod_settings("feeder", monkeypatch).held_out == gate


def test_flywheel_up_runs_the_same_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    """`flywheel up --profile deploy/k8s/profile.yaml` accepts it: every service's settings,
    policy and held-out set check out before anything would start."""
    from services.up import prepare

    monkeypatch.chdir(ROOT)
    profile = load_profile(K8S / "profile.yaml")
    checked = prepare.validate(profile, {}, prepare.write_policies(profile))
    assert set(checked) == set(SERVICES)
    assert checked["trainer"].optim.device == "cuda"  # what the GPU pods train with


def test_the_topics_job_runs_an_existing_command() -> None:
    from typer.main import get_command

    from services.cli import app

    (job,) = _by_kind("Job").values()
    (container,) = job["spec"]["template"]["spec"]["containers"]
    words = container["command"]
    assert words[0] == "flywheel"
    command: Any = get_command(app)
    for word in words[1:]:
        command = command.commands[word]  # type: ignore[attr-defined]
    assert "FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS" in _environment(container)


def test_each_service_connects_as_its_own_principal_from_an_optional_secret() -> None:
    """Per service a Secret of its own (its SCRAM username and password), optional so that a
    cluster without SASL needs none; the topics job runs as an administrator."""
    for name, workload in _workloads().items():
        secrets = [s["secretRef"] for s in _container(workload).get("envFrom", [])
                   if "secretRef" in s]
        assert secrets == [{"name": f"flywheel-kafka-{name}", "optional": True}], name
    (job,) = _by_kind("Job").values()
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert {"secretRef": {"name": "flywheel-kafka-admin", "optional": True}} in \
        container["envFrom"]
