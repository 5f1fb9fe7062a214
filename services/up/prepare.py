"""Everything ``flywheel up`` does before the first service starts: the policy files, a check
of every service's settings, Prometheus, the topics and the seed model (trained while the
local broker starts, then published).

A profile that is wrong fails here, with the section named, before anything runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from services import registry
from services.cluster import local_broker as local_kafka
from services.cluster import topics as topic_ops
from services.common.config import KafkaSettings
from services.common.errors import ConfigError
from services.common.signing import DecisionKeys, Signer, Verifier
from services.up import monitor
from services.up.profile import POLICY_FIELD, SERVICES, Profile
from services.up.view import read_checkpoints

Say = Callable[[str], None]


def write_policies(profile: Profile) -> dict[str, Path]:
    """The profile's policies as files (inline ones written under ``<home>/policies``)."""
    out = {}
    for service, value in profile.policies.items():
        if service not in POLICY_FIELD:
            raise ConfigError(f"policies: unknown service {service!r}; one of "
                              f"{sorted(POLICY_FIELD)}")
        if isinstance(value, Path):
            out[service] = value
            continue
        target = profile.home / "policies" / f"{service}.yaml"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(yaml.safe_dump(value, sort_keys=False), encoding="utf-8")
        out[service] = target
    return out


def validate(profile: Profile, kafka: dict[str, Any], policy_files: dict[str, Path]
             ) -> dict[str, Any]:
    """Every service's settings and policy, checked before anything starts; the settings by
    service."""
    from services.common.policy import load_policy
    from services.filter.policy import FilterPolicy
    from services.router.policy import RoutingPolicy
    from services.scorer.stage import ScoringConfig

    kinds: dict[str, type[Any]] = {"scorer": ScoringConfig, "filter": FilterPolicy,
                                   "router": RoutingPolicy}
    for service, path in policy_files.items():
        load_policy(kinds[service], path)
    placeholder = {"model_path": "x", "base_model_path": "x"}
    checked = {}
    for service in SERVICES:
        cls = registry.SERVICES[service].settings_class()
        fields = {k: v for k, v in placeholder.items() if k in cls.model_fields}
        try:
            checked[service] = cls(**{**fields, **section(profile, service), "kafka": kafka})
        except ValidationError as exc:  # named, never echoed: the input holds secrets
            raise ConfigError(f"profile section {service!r}: " + "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                for e in exc.errors(include_input=False, include_url=False))) from exc
    # Every row of every task file, so a bad line is named now, with nothing published.
    from services.envs.heldout import suite_tasks
    from services.envs.tasksets import load

    for spec in checked["feeder"].tasksets:
        load(spec)
    suite_tasks(checked["gate"].held_out)
    return checked


def say_precision(checked: dict[str, Any], say: Say) -> None:
    """The dtype each model service will compute in on this machine, and why: ``auto``
    chooses by the device (:mod:`services.models.precision`)."""
    from services.models.precision import choose, detect
    from services.trainer.train import resolve_dtype

    generator, gate, optim = checked["generator"], checked["gate"], checked["trainer"].optim
    parts = []
    if generator.backend == "vllm" and generator.vllm.dtype == "auto":
        parts.append("generator auto (vLLM's own on a GPU, else as below)")
    else:
        dtype = generator.vllm.dtype if generator.backend == "vllm" \
            else generator.transformers.dtype
        parts.append(f"generator {_chosen(choose(dtype, 'cpu').dtype, dtype)}")
    parts.append(f"gate {_chosen(choose(gate.dtype, 'cpu').dtype, gate.dtype)}")
    parts.append(f"trainer {_chosen(resolve_dtype(optim).dtype, optim.dtype)}")
    machine = detect("cpu")
    why = ("computes bfloat16 natively" if machine.native_bfloat16 else
           "has no native bfloat16 (no avx512_bf16, amx_bf16 or bf16 flag): auto is float32")
    say(f"precision: {', '.join(parts)}; {machine.describe()} {why}")


def _chosen(dtype: str, asked: str) -> str:
    return f"{dtype} (auto)" if asked == "auto" else f"{dtype} (set)"


def section(profile: Profile, service: str) -> dict[str, Any]:
    """A service's settings as the profile gives them; the feeder also gets the gate's
    held-out suite, so it keeps those tasks off ``tasks``."""
    fields = profile.section(service)
    if service == "feeder":
        fields.setdefault("held_out", profile.gate.get("held_out", {}))
    return fields


def start_monitor(profile: Profile, say: Say) -> monitor.Prometheus | None:
    """A Prometheus for the stack when the profile wants one and the machine has it."""
    settings = profile.prometheus
    program = settings.program()
    if program is None:
        say("prometheus: not installed, not started (alert rules and dashboards: "
            "deploy/prometheus, deploy/grafana)" if settings.enabled is None else
            "prometheus: off")
        return None
    if not local_kafka.bindable(settings.port):
        if settings.enabled:
            raise ConfigError(f"prometheus.port {settings.port} is in use (another "
                              "Prometheus?); choose another in the profile")
        say(f"prometheus: port {settings.port} is in use, not started (set "
            "prometheus.port in the profile)")
        return None
    prometheus = monitor.Prometheus(settings, program, profile.home)
    say(f"prometheus: {prometheus.url} (alert rules: deploy/prometheus/alerts.yml; "
        "dashboards: deploy/grafana)")
    return prometheus


def apply_topics(settings: KafkaSettings, say: Say) -> None:
    report = topic_ops.apply(topic_ops.admin_client(settings),
                             topic_ops.load(prefix=settings.topic_prefix))
    say(f"topics: {len(report.changes)} changes under {settings.topic_prefix!r}")


Seed = tuple[str, list[Any], dict[str, float]]
"""A seed model just written to the store: its URI, manifest and held-out metrics."""


def train_seed(profile: Profile, say: Say) -> Seed | None:
    """Version 0 of a profile without a model folder, bootstrapped (a tiny model trained on
    easy data) into the store; None when the store has it already. Needs no broker, so
    ``flywheel up`` starts its local one meanwhile."""
    from services.envs.heldout import gate_dtype, gate_guard, gate_headline
    from services.gate.evaluate import evaluate
    from services.seed_model import make_seed_model
    from services.trainer.store import CheckpointStore

    p = profile
    store = CheckpointStore(p.checkpoint_url)
    if not store.local:
        raise ConfigError("bootstrapping needs a local checkpoint store; give the profile "
                          "a model_path for a remote one")
    if 0 in store.versions():
        say(f"seed model: {store.uri(0)} (exists)")
        return None
    held = gate_headline(p.gate)
    say(f"seed model: training a tiny model on {p.seed_model.samples:,} samples of easy "
        f"{p.seed_model.env} data ...")
    seed = make_seed_model(p.seed_model, p.checkpoint_url, p.model_name,
                     evaluate=lambda f: evaluate(f, held, dtype=gate_dtype(p.gate)),
                     held_out=gate_guard(p.gate))
    say(f"seed model: held-out pass rate {seed[2].get('pass_rate', 0):.3f}")
    return seed


def publish_seed(profile: Profile, settings: KafkaSettings, say: Say,
                 trained: Seed | None, keys: DecisionKeys) -> Path:
    """Version 0 promoted on ``checkpoints``, so the gate, the generators and the trainer all
    start from it: the seed just ``trained``, or the store's when the topic has no decision
    on version 0 yet."""
    from services.seed_model import publish_promoted
    from services.trainer.store import MANIFEST_FILE, CheckpointStore

    p = profile
    folder = Path(CheckpointStore(p.checkpoint_url).uri(0))
    if trained is not None:
        uri, manifest, metrics = trained
    else:
        verifier = Verifier.load(keys.public_key)
        if any(e.version == 0
               for e in read_checkpoints(settings, p.model_name, verifier).decided()):
            return folder
        document = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        from schemas import FileDigest
        manifest = [FileDigest(**f) for f in document["files"]]
        metrics = document.get("metrics", {})
        uri = str(folder)
    publish_promoted(settings, settings.topic("checkpoints"), p.model_name, uri, manifest,
                     metrics, Signer.load(keys.signing_key))
    say("seed model: published as promoted version 0")
    return folder
