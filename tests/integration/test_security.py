"""SASL and ACLs on a broker that enforces them (SASL_PLAINTEXT, SCRAM-SHA-512, only the admin a
super user): each service's ACLs are derived from what it reads and writes and applied once; a
service checks its own access before it starts and stops at once, saying what to fix, when its
credentials are missing or wrong or an ACL it needs is absent; no password reaches its output.

The whole flywheel running as these principals is ``test_flywheel.py``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AclBindingFilter

from schemas import CheckpointEvent
from services import registry
from services.cluster import access
from services.cluster import topics as topic_ops
from services.common.config import KafkaSettings
from services.common.errors import AccessDenied
from tests.conftest import SecureCluster
from tests.signing import service_env

pytestmark = pytest.mark.integration


def _prepare(cluster: SecureCluster, prefix: str) -> list[access.Grant]:
    admin = cluster.broker.admin()
    topic_ops.apply(admin, topic_ops.load(prefix=prefix))
    wanted = access.all_grants(prefix)
    created = access.apply(admin, wanted)  # the cluster-wide ones may be there already
    assert {g for g in wanted if g.resource != "cluster"} <= set(created)
    return wanted


def _settings(cluster: SecureCluster, user: str, prefix: str, **more: Any) -> KafkaSettings:
    return KafkaSettings(**cluster.kafka(user, topic_prefix=prefix, **more))


def _without(cluster: SecureCluster, grant: access.Grant) -> None:
    b = grant.binding()
    admin = cluster.broker.admin()  # must outlive its futures
    deleted = admin.delete_acls([AclBindingFilter(
        b.restype, b.name, b.resource_pattern_type, b.principal, b.host, b.operation,
        b.permission_type)])
    for future in deleted.values():
        assert len(future.result()) == 1


def test_every_service_is_granted_what_it_needs_once(secure_kafka: SecureCluster,
                                                     uid: str) -> None:
    prefix = f"sec{uid}."
    wanted = _prepare(secure_kafka, prefix)
    admin = secure_kafka.broker.admin()
    assert access.apply(admin, wanted) == []  # a second apply changes nothing
    principals = {g.principal for g in wanted}
    assert principals == {f"User:{name}" for name in registry.SERVICES}
    for name, service in registry.SERVICES.items():
        access.preflight(_settings(secure_kafka, name, prefix), service, prefix + name)

    # Least privilege: one service's principal cannot act as another.
    with pytest.raises(AccessDenied, match=rf"User:generator is not allowed .*WRITE on topic "
                       rf"{prefix}scored.*READ on group {prefix}scorer"):
        access.preflight(_settings(secure_kafka, "generator", prefix),
                         registry.SERVICES["scorer"], prefix + "scorer")

    # One ACL gone is named; applying again restores exactly that one.
    gone = next(g for g in wanted if g.principal == "User:trainer" and g.operation == "READ"
                and g.name == prefix + "accepted.rl")
    _without(secure_kafka, gone)
    with pytest.raises(AccessDenied, match=rf"User:trainer is not allowed READ on topic "
                       rf"{prefix}accepted\.rl\."):
        access.preflight(_settings(secure_kafka, "trainer", prefix),
                         registry.SERVICES["trainer"], prefix + "trainer")
    assert access.apply(admin, wanted) == [gone]


def _run(service: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``flywheel run SERVICE`` with only these FLYWHEEL_* variables; it must stop by itself."""
    base = service_env()
    return subprocess.run([sys.executable, "-m", "services", "run", service],
                          env=base | env | {"FLYWHEEL_METRICS__ENABLED": "false"},
                          capture_output=True, text=True, timeout=300)


def test_a_service_without_its_access_stops_at_once_and_says_why(
        secure_kafka: SecureCluster, uid: str) -> None:
    prefix = f"sec{uid}."
    wanted = _prepare(secure_kafka, prefix)
    password = secure_kafka.passwords["scorer"]
    env = {"FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS": secure_kafka.broker.bootstrap,
           "FLYWHEEL_KAFKA__TOPIC_PREFIX": prefix,
           "FLYWHEEL_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
           "FLYWHEEL_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
           "FLYWHEEL_KAFKA__SASL_USERNAME": "scorer"}

    # No password: a settings error naming the variable, before any connection.
    done = _run("scorer", env)
    assert done.returncode == 2, done.stderr
    assert "FLYWHEEL_KAFKA__SASL_PASSWORD not set" in done.stderr, done.stderr

    # A wrong password: the handshake's refusal, not a retry loop until broker_down_seconds.
    wrong = "not-the-password-" + uid
    done = _run("scorer", env | {"FLYWHEEL_KAFKA__SASL_PASSWORD": wrong})
    assert done.returncode == 1, done.stderr
    assert "authentication as User:scorer failed" in done.stderr, done.stderr
    assert wrong not in done.stdout + done.stderr

    # The right password, one ACL missing: the service names it and stops.
    gone = next(g for g in wanted if g.principal == "User:scorer" and g.operation == "WRITE"
                and g.name == prefix + "scored")
    _without(secure_kafka, gone)
    done = _run("scorer", env | {"FLYWHEEL_KAFKA__SASL_PASSWORD": password})
    assert done.returncode == 1, done.stderr
    assert f"User:scorer is not allowed WRITE on topic {prefix}scored" in done.stderr, \
        done.stderr
    assert "flywheel acls apply" in done.stderr
    assert password not in done.stdout + done.stderr
    assert access.apply(secure_kafka.broker.admin(), wanted) == [gone]


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = service_env()
    return subprocess.run([sys.executable, "-m", "services", *args], env=base | env,
                          capture_output=True, text=True, timeout=120)


def test_an_operator_adds_a_principal_and_grants_it_from_the_command_line(
        secure_kafka: SecureCluster, uid: str) -> None:
    prefix = f"cli{uid}."
    admin = secure_kafka.broker.admin()
    topic_ops.apply(admin, topic_ops.load(prefix=prefix))
    user, password = f"scorer-{uid}", f"pw-{uid}-secret"
    env = {"FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS": secure_kafka.broker.bootstrap,
           "FLYWHEEL_KAFKA__TOPIC_PREFIX": prefix,
           "FLYWHEEL_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
           "FLYWHEEL_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
           "FLYWHEEL_KAFKA__SASL_USERNAME": secure_kafka.admin[0],
           "FLYWHEEL_KAFKA__SASL_PASSWORD": secure_kafka.admin[1]}
    done = _cli("acls", "user", user, env=env | {"FLYWHEEL_NEW_USER_PASSWORD": password})
    assert done.returncode == 0, done.stderr
    mapping = ("--user", f"scorer={user}")
    done = _cli("acls", "list", *mapping, env=env)
    assert done.returncode == 0 and "missing" in done.stdout, done.stdout + done.stderr
    done = _cli("acls", "apply", *mapping, env=env)
    assert done.returncode == 0, done.stderr
    scorer = [g for g in access.all_grants(prefix, {"scorer": user})
              if g.principal == f"User:{user}"]
    assert "ACLs created" in done.stderr, done.stderr
    assert {g.binding() for g in scorer} <= access.existing(admin)
    done = _cli("acls", "list", *mapping, env=env)
    assert done.returncode == 0 and "missing" not in done.stdout, done.stdout
    as_user = KafkaSettings(**secure_kafka.kafka(topic_prefix=prefix) | {
        "sasl_username": user, "sasl_password": password})
    access.preflight(as_user, registry.SERVICES["scorer"], prefix + "scorer")
    for out in (done.stdout, done.stderr):
        assert password not in out and secure_kafka.admin[1] not in out


def test_a_promotion_forged_by_the_trainers_principal_moves_no_reader(
        secure_kafka: SecureCluster, uid: str, tmp_path: Path) -> None:
    """The trainer's principal may write to `checkpoints` (its candidates), so the broker
    takes a `promoted` event from it. The gate's signature is what tells a decision: the
    generator's follower and reloader, the trainer's lineage and the filter's staleness
    reference keep to the gate's promotion of v1 (each on its own principal), and the gate
    dead-letters the forgery with the reason, its reference and floor unchanged."""
    from confluent_kafka import Producer

    from services.common.checkpoints import CheckpointFollower, LatestPromoted
    from services.common.config import ServiceSettings
    from services.common.runtime import StreamRuntime
    from services.common.state import StateStore
    from services.gate.stage import GateStage
    from services.generator.reload import Reloader
    from services.models.engines import TransformersEngine
    from services.models.episodes import ModelVersion
    from services.models.manifest import build_manifest
    from services.models.tiny import tiny_model
    from services.trainer.lineage import Decisions
    from tests.integration.runners import InThread
    from tests.kafka import wait_until
    from tests.signing import signer, verifier
    from tests.unit.test_gate import _outcomes, _result

    prefix = f"forge{uid}."
    _prepare(secure_kafka, prefix)
    base = tiny_model(tmp_path / "base")
    for name in ("v1", "v2"):  # sound weights both: only the signature tells them apart
        shutil.copytree(base, tmp_path / name)
    topic = prefix + "checkpoints"

    def event(version: int, status: str) -> CheckpointEvent:
        folder = tmp_path / f"v{version}"
        return CheckpointEvent(model="tiny", version=version, parent_version=version - 1,
                               uri=str(folder), manifest=build_manifest(folder),
                               status=status)  # type: ignore[arg-type]

    def write_as_trainer(*events: CheckpointEvent) -> None:
        producer = Producer(_settings(secure_kafka, "trainer", prefix).client_config())
        errors: list[Any] = []
        for e in events:
            producer.produce(topic, e.to_bytes(), b"tiny",
                             on_delivery=lambda err, _m: errors.append(err) if err else None)
        assert producer.flush(30) == 0 and errors == [], errors  # the broker takes them

    gs = ServiceSettings(service="gate", instance_id="g0", metrics={"enabled": False},
                         kafka=secure_kafka.kafka("gate", topic_prefix=prefix),
                         runtime={"batch_max_records": 1})
    table = {"base": _outcomes(10), "v1": _outcomes(60), "v2": _outcomes(90)}
    gate = GateStage(state=StateStore(gs.topic("gate.state")), output_topic=topic,
                     root=tmp_path, base={"tiny": (0, base)}, signer=signer(),
                     verifier=verifier(),
                     evaluate=lambda folder: {"held_out": _result(table[folder.name])})
    forged = event(2, "promoted")
    with InThread(StreamRuntime(gs, gate, [topic])) as running:
        write_as_trainer(event(1, "candidate"))
        wait_until(lambda: any(CheckpointEvent.from_bytes(m.value()).status == "promoted"
                               for m in secure_kafka.broker.read_all(topic))
                   or running.error is not None, 120, "the gate's promotion of v1")
        write_as_trainer(forged)
        wait_until(lambda: len(secure_kafka.broker.read_all(prefix + "dlq")) == 1
                   or running.error is not None, 60, "the forgery dead-lettered")
        assert running.error is None, running.error
    [letter] = secure_kafka.broker.read_all(prefix + "dlq")
    assert letter.value() == forged.to_bytes()
    reason = dict(letter.headers() or [])["flywheel-error-message"].decode()
    assert "is not signed by the gate" in reason, reason
    # The gate's state as its changelog holds it: the reference and floor v1 left.
    changes = [m for m in secure_kafka.broker.read_all(prefix + "gate.state")
               if m.key() == b"promoted/tiny"]
    reference = json.loads(changes[-1].value())
    assert reference["version"] == 1 and reference["best"]["held_out/pass_rate"] == 0.6

    # Each reader on its own principal, from the topic's start.
    engine = TransformersEngine(base)
    reloader = Reloader(engine, tmp_path, ModelVersion("tiny", 0), base)
    decisions, latest = Decisions("tiny"), LatestPromoted()
    dropped: list[str] = []
    for user, listener in (("generator", reloader), ("trainer", decisions),
                           ("filter", latest)):
        follower = CheckpointFollower(
            _settings(secure_kafka, user, prefix), topic, listener, verifier=verifier(),
            on_invalid=dropped.append)
        try:
            follower.catch_up()
        finally:
            follower.stop()
    assert dropped == ["unsigned"] * 3
    assert reloader.apply_pending() and reloader.serving.version == 1
    assert not reloader.apply_pending()  # nothing newer is waiting: v2 was never offered
    assert set(decisions.promoted) == {1} and latest.get("tiny") == 1
