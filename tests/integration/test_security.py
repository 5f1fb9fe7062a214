"""SASL and ACLs on a broker that enforces them (SASL_PLAINTEXT, SCRAM-SHA-512, only the admin a
super user): each service's ACLs are derived from what it reads and writes and applied once; a
service checks its own access before it starts and stops at once, saying what to fix, when its
credentials are missing or wrong or an ACL it needs is absent; no password reaches its output.

The whole flywheel running as these principals is ``test_flywheel.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from confluent_kafka.admin import AclBindingFilter

from services import registry
from services.cluster import access
from services.cluster import topics as topic_ops
from services.common.config import KafkaSettings
from services.common.errors import AccessDenied
from tests.conftest import SecureCluster

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
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
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
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
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
