"""Who may do what on the cluster: ACLs per service principal, SCRAM users, and the check a
service makes of its own access before it starts.

The ACLs are derived from the service registry (what each service reads and writes), so they
cannot drift from the code. Per service principal (``User:<service>`` unless mapped):

- READ and DESCRIBE on every topic it reads, and on those it writes (a service reads back what
  it wrote: the feeder resumes its task-set cursors from ``tasks``, the filter and router
  restore their state from their changelogs);
- WRITE on every topic it writes;
- READ on consumer groups and WRITE and DESCRIBE on transactional ids whose names start with
  its group id (``<prefix><service>``: its group, its state-restore readers, its transactional
  producers ``<prefix><service>.<instance>``);
- DESCRIBE on the groups it watches (the feeder: the generators' group, for the backlog);
- IDEMPOTENT_WRITE on the cluster.

Operators' tools (``flywheel topics apply``, ``replay``, ``tasks publish``, the bootstrap of a
seed model) run as an administrator, not as a service principal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)
from rich.table import Table

from services import registry
from services.common.config import KafkaSettings
from services.common.errors import AccessDenied, ConfigError
from services.common.offsets import COORDINATOR_MOVING

log = logging.getLogger(__name__)

SCRAM_ITERATIONS = 8192
"""Kafka's own default for SCRAM-SHA-512 credentials (4096 is its minimum)."""


@dataclass(frozen=True, order=True)
class Grant:
    """One ACL: ``principal`` may do ``operation`` on the resource."""

    principal: str
    resource: str  # "topic", "group", "transactional_id", "cluster"
    name: str
    pattern: str  # "literal" or "prefixed"
    operation: str  # an AclOperation name: "READ", "WRITE", ...

    def binding(self) -> AclBinding:
        return AclBinding(_RESOURCE[self.resource], self.name, _PATTERN[self.pattern],
                          self.principal, "*", AclOperation[self.operation],
                          AclPermissionType.ALLOW)

    def __str__(self) -> str:
        pattern = "*" if self.pattern == "prefixed" else ""
        return f"{self.principal} {self.operation} {self.resource} {self.name}{pattern}"


_RESOURCE = {"topic": ResourceType.TOPIC, "group": ResourceType.GROUP,
             "transactional_id": ResourceType.TRANSACTIONAL_ID, "cluster": ResourceType.BROKER}
_PATTERN = {"literal": ResourcePatternType.LITERAL, "prefixed": ResourcePatternType.PREFIXED}


def principal_of(username: str) -> str:
    return f"User:{username}"


def grants(service: registry.Service, prefix: str, principal: str) -> list[Grant]:
    """Every ACL ``service`` needs, its topics named with ``prefix``."""
    out: set[Grant] = set()
    for topic in (*service.reads, *service.writes):
        for op in ("READ", "DESCRIBE"):
            out.add(Grant(principal, "topic", prefix + topic, "literal", op))
    for topic in service.writes:
        out.add(Grant(principal, "topic", prefix + topic, "literal", "WRITE"))
    own = prefix + service.name
    out.add(Grant(principal, "group", own, "prefixed", "READ"))
    out.add(Grant(principal, "group", own, "prefixed", "DESCRIBE"))
    for op in ("WRITE", "DESCRIBE"):
        out.add(Grant(principal, "transactional_id", own, "prefixed", op))
    for other in service.watches_groups:
        out.add(Grant(principal, "group", prefix + other, "literal", "DESCRIBE"))
    out.add(Grant(principal, "cluster", "kafka-cluster", "literal", "IDEMPOTENT_WRITE"))
    return sorted(out)


def all_grants(prefix: str, users: dict[str, str] | None = None) -> list[Grant]:
    """The ACLs of every service; ``users`` maps a service to its username (default: the
    service's name)."""
    users = users or {}
    unknown = set(users) - set(registry.SERVICES)
    if unknown:
        raise ConfigError(f"unknown services {sorted(unknown)}; known: "
                          f"{', '.join(registry.SERVICES)}")
    return [g for name, s in registry.SERVICES.items()
            for g in grants(s, prefix, principal_of(users.get(name, name)))]


def admin_client(kafka: KafkaSettings) -> AdminClient:
    return AdminClient(kafka.client_config())


def existing(admin: AdminClient, timeout: float = 30.0) -> set[AclBinding]:
    """Every ACL on the cluster (the caller must be allowed to describe them)."""
    # None matches any name, principal and host (the stubs say str).
    anything: Any = None
    match_all = AclBindingFilter(ResourceType.ANY, anything, ResourcePatternType.ANY,
                                 anything, anything, AclOperation.ANY, AclPermissionType.ANY)
    return set(admin.describe_acls(match_all, request_timeout=timeout).result())


def table(grants: list[Grant], have: set[AclBinding], title: str) -> Table:
    """``flywheel acls list``'s view: every grant needed, and whether the cluster has it."""
    out = Table(title=title)
    for col in ("principal", "operation", "resource", "name", "present"):
        out.add_column(col)
    for g in grants:
        out.add_row(g.principal, g.operation, g.resource,
                    g.name + ("*" if g.pattern == "prefixed" else ""),
                    "yes" if g.binding() in have else "[red]missing[/]")
    return out


def apply(admin: AdminClient, wanted: Iterable[Grant], timeout: float = 30.0) -> list[Grant]:
    """Create the ACLs in ``wanted`` the cluster lacks; returns those created. ACLs it does
    not declare are left alone (another tenant's, an operator's)."""
    have = existing(admin, timeout)
    missing = [g for g in wanted if g.binding() not in have]
    if missing:
        results = admin.create_acls([g.binding() for g in missing], request_timeout=timeout)
        for future in results.values():
            future.result()
        # Returns once a broker reads them back: a service started next must find them.
        deadline = time.monotonic() + timeout
        while not {g.binding() for g in missing} <= existing(admin, timeout):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ACLs created but not visible after {timeout:.0f} s")
            time.sleep(0.1)
    return missing


def set_users(admin: AdminClient, passwords: dict[str, str], timeout: float = 30.0) -> None:
    """Create or change SCRAM-SHA-512 users."""
    if not passwords:
        return
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS)
    changes = [UserScramCredentialUpsertion(user, info, password.encode())
               for user, password in passwords.items()]
    for future in admin.alter_user_scram_credentials(
            changes, request_timeout=timeout).values():  # type: ignore[arg-type]
        future.result()


def preflight(kafka: KafkaSettings, service: registry.Service, group: str,
              wait_seconds: float = 15.0) -> None:
    """Fail fast, with what to fix, when this service cannot authenticate or lacks an ACL.

    Checked: the credentials (a SASL handshake), READ on the topics it reads, WRITE on those
    it writes, READ on its consumer group, and the topics' existence. A broker that does not
    answer within ``wait_seconds`` is not this check's business: the service starts and
    reports not-ready, as for any outage.
    """
    errors: list[KafkaError] = []
    admin = AdminClient(kafka.client_config() | {"error_cb": errors.append})
    who = principal_of(kafka.sasl_username) if kafka.sasl_username else "this client"
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            admin.list_topics(timeout=1.0)
            break
        except KafkaException:
            admin.poll(0)  # serves error_cb
            failed = [e for e in errors if e.code() == KafkaError._AUTHENTICATION]
            if failed:
                raise AccessDenied(
                    f"{service.name}: authentication as {who} failed "
                    f"({kafka.security_protocol} {kafka.sasl_mechanism or ''}): "
                    f"{failed[0].str()}. Check FLYWHEEL_KAFKA__SASL_USERNAME and "
                    "FLYWHEEL_KAFKA__SASL_PASSWORD.") from None
            if time.monotonic() > deadline:
                log.warning("access not checked: no broker answered in %.0f s", wait_seconds)
                return
    need: dict[str, set[AclOperation]] = {}
    for topic in service.reads:
        need.setdefault(kafka.topic(topic), set()).add(AclOperation.READ)
    for topic in service.writes:
        need.setdefault(kafka.topic(topic), set()).add(AclOperation.WRITE)
    futures = admin.describe_topics(TopicCollection(sorted(need)),
                                    include_authorized_operations=True,
                                    request_timeout=wait_seconds)
    denied: list[str] = []
    for topic, future in futures.items():
        try:
            reported = future.result().authorized_operations
        except KafkaException as exc:
            code = exc.args[0].code()
            if code == KafkaError.TOPIC_AUTHORIZATION_FAILED:
                denied.extend(f"{op.name} on topic {topic}" for op in sorted(
                    need[topic], key=lambda o: o.name))
                continue
            if code == KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise ConfigError(f"{service.name}: topic {topic} does not exist "
                                  "(`flywheel topics apply`)") from None
            # A slow or moving cluster: this check cannot tell; the clients will.
            log.warning("access to topic %s not checked: %s", topic, exc.args[0])
            continue
        if reported is None:  # a broker that does not say (before Kafka 2.3)
            continue
        allowed = set(reported)
        if AclOperation.ALL not in allowed:
            denied.extend(f"{op.name} on topic {topic}" for op in sorted(
                need[topic] - allowed, key=lambda o: o.name))
    if service.consumes_in_group and not _group_readable(admin, group, wait_seconds):
        denied.append(f"READ on group {group}")
    if denied:
        raise AccessDenied(
            f"{service.name}: {who} is not allowed {'; '.join(denied)}. Grant the service's "
            f"ACLs: `flywheel acls apply` (principal {who} for {service.name}).")


def _group_readable(admin: AdminClient, group: str, timeout: float) -> bool:
    """Whether this client may read ``group``; True when that cannot be known in ``timeout``
    (a coordinator still loading on a cluster just started: the consumer will tell)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        future = admin.describe_consumer_groups([group], include_authorized_operations=True,
                                                request_timeout=max(left, 1.0))[group]
        try:
            reported = future.result().authorized_operations
            return reported is None or bool(set(reported) & {AclOperation.READ,
                                                            AclOperation.ALL})
        except KafkaException as exc:
            code = exc.args[0].code()
            if code == KafkaError.GROUP_AUTHORIZATION_FAILED:
                return False
            if code not in COORDINATOR_MOVING | {KafkaError._TIMED_OUT}:
                raise
            if time.monotonic() > deadline:
                log.warning("access to group %s not checked: %s", group, exc.args[0])
                return True
            time.sleep(0.2)
