"""A service's settings from a profile, as ``FLYWHEEL_*`` variables: what ``flywheel up`` starts
each process with, and what ``flywheel run NAME --profile FILE`` (a container, a pod) reads, so
that compose, Kubernetes and ``up`` run the same held-out suite, policies and settings."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from services.common.config import KafkaSettings
from services.up import prepare
from services.up.profile import POLICY_FIELD, Profile, public


def service_fields(profile: Profile, service: str, base_path: Path | str,
                   policy_files: dict[str, Path]) -> dict[str, Any]:
    """A service's settings as a profile gives them, with the model and the checkpoint store
    it starts from (``base_path``: version 0's folder) and its policy file: what ``flywheel
    up`` runs it with, and ``flywheel run NAME --profile`` (a container, a pod) too."""
    p = profile
    root = str(Path(p.checkpoint_url).resolve()) if "://" not in p.checkpoint_url \
        else p.checkpoint_url
    model = {
        "generator": {"model_path": str(base_path), "model_name": p.model_name,
                      "base_version": 0, "checkpoint_root": root},
        "trainer": {"base_model_path": str(base_path), "model_name": p.model_name,
                    "base_version": 0, "checkpoint_url": p.checkpoint_url},
        "gate": {"base_model_path": str(base_path), "model_name": p.model_name,
                 "base_version": 0, "checkpoint_root": root},
    }
    fields = {**prepare.section(p, service), **model.get(service, {})}
    if service in policy_files:
        fields[POLICY_FIELD[service]] = str(policy_files[service])
    return fields


def settings_env(fields: dict[str, Any]) -> dict[str, str]:
    """Settings as the ``FLYWHEEL_*`` variables a service reads them from."""
    env = {}
    for key, value in fields.items():
        if value is None:  # the setting's default
            continue
        env[f"FLYWHEEL_{key.upper()}"] = (json.dumps(value, default=str)
                                          if isinstance(value, dict | list) else str(value))
    return env


def profile_env(profile: Profile, service: str) -> dict[str, str]:
    """``flywheel run NAME --profile FILE``: the service's ``FLYWHEEL_*`` variables from the
    profile, as ``flywheel up`` would set them for its one process: its section, the gate's
    held-out suite (the feeder), the policy (inline ones written to a temporary folder), the
    model (version 0 of the profile's store, or its ``model_path``), the cluster's public
    settings and the first metrics port. No secret: those stay in the environment."""
    inline = {k: v for k, v in profile.policies.items() if not isinstance(v, Path)}
    files = {k: v for k, v in profile.policies.items() if isinstance(v, Path)}
    if service in inline:
        folder = Path(tempfile.mkdtemp(prefix="flywheel-policy-"))
        files |= prepare.write_policies(profile.model_copy(
            update={"home": folder, "policies": {service: inline[service]}}))
    base: Path | str = ""  # a stream stage's image has no torch, nor the store's module
    if service in ("generator", "trainer", "gate"):
        from services.trainer.store import CheckpointStore

        base = profile.model_path or CheckpointStore(profile.checkpoint_url).uri(0)
    env = settings_env(service_fields(profile, service, base, files))
    return env | {"FLYWHEEL_KAFKA": json.dumps(public(KafkaSettings(**profile.kafka))),
                  "FLYWHEEL_METRICS__PORT": str(profile.metrics_port)}
